"""One writer per run folder: `<run>/.flare_lock`, created atomically (O_CREAT|O_EXCL), holding
the holder's pid, host, start time and command. A lock whose holder is a dead process on this
host is stale and is taken over (with a log message); a live holder refuses the second writer."""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Iterator

from flare_utils.errors import FlareInputError
from flare_utils.utilities.processes import pid_alive

LOCK_NAME = ".flare_lock"


def lock_path(run_root: Path) -> Path:
    return Path(run_root) / LOCK_NAME


def read_lock(run_root: Path) -> dict | None:
    try:
        return json.loads(lock_path(run_root).read_text())
    except (OSError, ValueError):
        return None


def holder_alive(info: dict | None) -> bool:
    """True when the lock's holder may still be running (other hosts: assumed alive)."""
    if not info:
        return False
    if info.get("host") != socket.gethostname():
        return True
    try:
        return pid_alive(int(info.get("pid", -1)))
    except (TypeError, ValueError):
        return False


def _create(path: Path, info: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    return True


@contextlib.contextmanager
def run_lock(run_root: Path, command: str | None = None,
             log: Callable[[str], None] | None = None) -> Iterator[dict]:
    """Hold the run folder's lock for the block; released on any exit (also KeyboardInterrupt)."""
    run_root = Path(run_root)
    run_root.mkdir(parents=True, exist_ok=True)
    path = lock_path(run_root)
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": command or " ".join(sys.argv)}
    for _ in range(3):
        if _create(path, info):
            break
        old = read_lock(run_root)
        if old is not None and holder_alive(old):
            raise FlareInputError(run_root, f"another run is writing this run folder: pid {old.get('pid')} on "
                                            f"{old.get('host')}, started {old.get('started')}, command "
                                            f"'{old.get('command')}'; wait for it to finish (or stop it)")
        if log is not None:
            who = (f"pid {old.get('pid')}, started {old.get('started')}, command '{old.get('command')}'"
                   if old else "unreadable lock file")
            log(f"taking over a stale lock {path} (its holder is gone: {who})")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        raise FlareInputError(path, "could not take the run folder's lock")
    try:
        yield info
    finally:
        cur = read_lock(run_root)
        if cur is not None and cur.get("pid") == info["pid"] and cur.get("started") == info["started"]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
