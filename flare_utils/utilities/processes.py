"""Nothing outlives a stage: the processes a stage's kernel starts die with the kernel or its runner.

jupyter_client (papermill's runner, JupyterLab) starts a kernel as the leader of a new session, so
every process the kernel starts (nnU-Net's preprocessing and augmentation workers) shares its process
group. `guard_kernel_process_group` adds a small watcher process to that group which kills the whole
group as soon as the kernel or the process that started it is gone: after a SIGKILL of
`flare-study run`, a crashed kernel or a kernel restart, no worker keeps its memory or writes into
the run folder afterwards. Outside such a kernel (a plain Python process) it does nothing.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

__all__ = ["pid_alive", "guard_kernel_process_group"]

_watcher: subprocess.Popen | None = None
POLL_SECONDS = 0.25


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie, exited but not yet reaped, counts
    as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # exists, owned by someone else
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except (OSError, IndexError):
        pass
    return True


def _leads_own_session() -> bool:
    return os.name == "posix" and os.getsid(0) == os.getpid()


def guard_kernel_process_group() -> bool:
    """Start (once per process) the watcher of this kernel's process group; True when one runs.

    Only a process that leads its own session, as jupyter_client starts kernels, is guarded: killing
    the group of any other process could reach processes that are not the stage's."""
    global _watcher
    if _watcher is not None and _watcher.poll() is None:
        return True
    if not _leads_own_session():
        return False
    _watcher = subprocess.Popen([sys.executable, "-m", __name__, str(os.getpid()), str(os.getppid())],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                close_fds=True)
    return True


def _watch(kernel: int, parent: int) -> None:
    """Kill this process group once `kernel` or `parent` is gone (runs in the watcher process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # "interrupt kernel" signals the whole group
    while pid_alive(kernel) and pid_alive(parent):
        time.sleep(POLL_SECONDS)
    os.killpg(os.getpgrp(), signal.SIGKILL)


if __name__ == "__main__":
    _watch(int(sys.argv[1]), int(sys.argv[2]))
