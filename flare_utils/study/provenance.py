"""What a run was made with: params, package versions, git commit, device and seeds.

Written by the runner to `<run_dir>/provenance.json` at every invocation (the previous ones are
kept in `logs/`), so a report sent to a collaborator says exactly what produced it.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from flare_utils.layout import PROJECT_ROOT

PACKAGES = ("flare-utils", "torch", "nnunetv2", "dynamic-network-architectures", "numpy", "nibabel",
            "SimpleITK", "papermill", "matplotlib", "pandas", "scipy", "batchgeneratorsv2", "edt")


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = None
    return out


def git_state(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """Commit and dirty flag of the project checkout (None where it is not a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(requested: str) -> dict[str, Any]:
    """The device a stage will use for `requested` ("auto" resolves like the trainers do)."""
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if requested == "auto":
        resolved = "cuda" if gpu else ("mps" if getattr(torch.backends, "mps", None)
                                       and torch.backends.mps.is_available() else "cpu")
    else:
        resolved = requested
    return {"requested": requested, "resolved": resolved, "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "gpu": gpu, "cuda": torch.version.cuda, "torch_threads": torch.get_num_threads()}


def collect(params: Any, command: str | None = None) -> dict[str, Any]:
    """Provenance of a run with `params` (a StudyParams)."""
    return {
        "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(sys.argv),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "packages": package_versions(),
        "git": git_state(),
        "device": device_info(params.device),
        "seeds": {"study": params.seed, "phantom": params.data.phantom.seed},
        "params": params.to_dict(),
    }


def write(run_dir: str | Path, params: Any, command: str | None = None) -> Path:
    """Write `<run_dir>/provenance.json`; an earlier one moves to `logs/provenance-<time>.json`."""
    from flare_utils.data.io import atomic_write_text
    run_dir = Path(run_dir)
    target = run_dir / "provenance.json"
    if target.is_file():
        try:
            old = json.loads(target.read_text()).get("started", "")
        except (json.JSONDecodeError, AttributeError):
            old = ""
        stamp = "".join(c for c in old if c.isalnum()) or str(int(target.stat().st_mtime))
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        os.replace(target, run_dir / "logs" / f"provenance-{stamp}.json")
    return atomic_write_text(target, json.dumps(collect(params, command), indent=1, default=str))
