"""Progress of long work (epochs, cases) from inside a stage notebook to the study runner.

A notebook runs in a papermill kernel, a separate process whose output the runner only sees
when a cell finishes. Long loops therefore append one JSON line per step to the file named by
`FLARE_PROGRESS_FILE` (set by the runner; without it `report` does nothing), and the runner's
`ProgressWatcher` tails that file and draws a progress bar per task and writes the log.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, TextIO

ENV_VAR = "FLARE_PROGRESS_FILE"


def report(task: str, done: int, total: int | None, **info: Any) -> None:
    """Record that `done` of `total` steps of `task` are finished (`info`: a few JSON-able numbers)."""
    path = os.environ.get(ENV_VAR)
    if not path:
        return
    line = json.dumps({"t": round(time.time(), 3), "task": task, "done": int(done),
                       "total": None if total is None else int(total), **info}, default=str)
    try:
        with open(path, "a") as f:            # one short write per line: appends from one process stay whole
            f.write(line + "\n")
    except OSError:
        pass                                   # progress is a courtesy, never a reason to fail


def _info_text(event: dict[str, Any]) -> str:
    extra = {k: v for k, v in event.items() if k not in ("t", "task", "done", "total")}
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())


class ProgressWatcher:
    """Tail a progress file in a thread: one tqdm bar per task on `stream` (when given) and one
    log line per event through `log`."""

    def __init__(self, path: str | Path, *, stream: TextIO | None = None,
                 log: Callable[[str], None] | None = None, interval: float = 0.5):
        self.path, self.stream, self.log, self.interval = Path(path), stream, log, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flare-progress", daemon=True)
        self._offset = self.path.stat().st_size if self.path.exists() else 0
        self._bar = None
        self._task = None

    def __enter__(self) -> "ProgressWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()                     # the last lines
        self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _show(self, event: dict[str, Any]) -> None:
        task, done, total = event.get("task", "?"), event.get("done", 0), event.get("total")
        if self.log is not None:
            tail = _info_text(event)
            self.log(f"  {task}: {done}/{total if total is not None else '?'}" + (f" {tail}" if tail else ""))
        if self.stream is None:
            return
        from tqdm import tqdm
        if task != self._task:
            self._close_bar()
            self._task = task
            self._bar = tqdm(total=total, desc=task, file=self.stream, leave=True, dynamic_ncols=True)
        bar = self._bar
        if total is not None and bar.total != total:
            bar.total = total
        bar.n = done
        tail = _info_text(event)
        if tail:
            bar.set_postfix_str(tail, refresh=False)
        bar.refresh()

    def _poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return
        self._offset += end + 1
        for line in chunk[: end + 1].decode(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            self._show(event)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()
