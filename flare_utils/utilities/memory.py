"""This process's memory: resident set size now, and its lifetime peak (MiB)."""
from __future__ import annotations

import os
import sys

try:
    import resource
except ImportError:  # pragma: no cover (Windows)
    resource = None

MIB = 1024.0 * 1024.0


def current_rss_mib() -> float:
    """Resident set size of this process now (MiB; NaN where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except (OSError, ValueError, IndexError):  # not Linux
        try:
            import psutil
            return psutil.Process().memory_info().rss / MIB
        except Exception:
            return float("nan")


def peak_rss_mib(who: str = "RUSAGE_SELF") -> float | None:
    """Lifetime peak RSS (ru_maxrss) of this process, or of its waited-for children with
    who="RUSAGE_CHILDREN" (MiB; None where getrusage does not exist)."""
    if resource is None:
        return None
    v = resource.getrusage(getattr(resource, who)).ru_maxrss
    return v / MIB if sys.platform == "darwin" else v / 1024.0  # bytes on macOS, KiB on Linux
