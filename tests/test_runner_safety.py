"""Run-folder lock and clean interruption (issue 15)."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess

import pytest

from flare_utils.errors import FlareInputError
from flare_utils.study import cli
from flare_utils.study.lock import lock_path, run_lock


def _write_lock(root, pid):
    lock_path(root).write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                           "started": "2026-01-01T00:00:00", "command": "flare-study run p.yaml"}))


def test_live_holder_refuses(tmp_path):
    child = subprocess.Popen(["sleep", "30"])
    try:
        _write_lock(tmp_path, child.pid)
        with pytest.raises(FlareInputError) as ei:
            with run_lock(tmp_path, "second"):
                pass
        msg = str(ei.value)
        assert f"pid {child.pid}" in msg and "2026-01-01T00:00:00" in msg and "flare-study run p.yaml" in msg
        assert json.loads(lock_path(tmp_path).read_text())["pid"] == child.pid   # untouched
    finally:
        child.kill()
        child.wait()


def test_dead_holder_is_taken_over_and_released(tmp_path):
    child = subprocess.Popen(["true"])
    child.wait()
    _write_lock(tmp_path, child.pid)
    messages = []
    with run_lock(tmp_path, "mine", log=messages.append) as info:
        assert json.loads(lock_path(tmp_path).read_text())["command"] == "mine"
        assert info["command"] == "mine"
    assert any("stale lock" in m and str(child.pid) in m for m in messages)
    assert not lock_path(tmp_path).exists()


def test_lock_released_on_keyboard_interrupt(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with run_lock(tmp_path, "x"):
            raise KeyboardInterrupt
    assert not lock_path(tmp_path).exists()


def test_run_study_refuses_second_writer(tmp_path):
    from flare_utils.study.runner import run_study
    run = tmp_path / "run"
    run.mkdir()
    child = subprocess.Popen(["sleep", "30"])
    try:
        _write_lock(run, child.pid)
        with pytest.raises(FlareInputError, match=f"pid {child.pid}"):
            run_study({"name": "t", "run_dir": str(run), "stages": ["convert"]}, log=None, index=False)
    finally:
        child.kill()
        child.wait()


def test_cli_ctrl_c_one_line(monkeypatch, capsys):
    def boom(args):
        e = KeyboardInterrupt()
        e.flare_unit = "teacher"
        raise e
    import argparse
    monkeypatch.setattr(cli, "build_parser", lambda: type("P", (), {
        "parse_args": lambda self, argv: argparse.Namespace(func=boom)})())
    assert cli.main(["run", "x.yaml"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["interrupted during stage 'teacher'; run the same command again to resume "
                   "(complete stages are skipped)"]


_KERNEL_CELL = """
import multiprocessing as mp, os, time
from flare_utils.utilities.processes import guard_kernel_process_group
guarded = guard_kernel_process_group()

def _sleep():
    time.sleep(300)

worker = mp.get_context("fork").Process(target=_sleep)   # like nnU-Net's augmentation workers
worker.start()
with open(PID_FILE + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {worker.pid} {guarded}")
os.replace(PID_FILE + ".tmp", PID_FILE)
time.sleep(300)
"""

_RUNNER = """
import sys, papermill as pm
pm.execute_notebook(sys.argv[1], sys.argv[2], parameters={"PID_FILE": sys.argv[3]}, kernel_name="python3",
                    language="python", progress_bar=False)
"""


def _wait_gone(pids, seconds):
    import time
    from flare_utils.utilities.processes import pid_alive
    end = time.monotonic() + seconds
    while time.monotonic() < end and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if pid_alive(p)]


@pytest.mark.parametrize("kill", ["runner", "kernel"])
def test_stage_workers_die_with_a_killed_runner_or_kernel(tmp_path, kill):
    """SIGKILL of the process running a notebook (or of its kernel) leaves no worker of the kernel
    alive: the kernel's process group is killed by its watcher (issue 15 §4)."""
    import signal
    import sys
    import time

    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("PID_FILE = ''", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(_KERNEL_CELL)]
    nbformat.write(nb, str(tmp_path / "stage.ipynb"))
    pid_file = tmp_path / "pids"
    runner = subprocess.Popen([sys.executable, "-c", _RUNNER, str(tmp_path / "stage.ipynb"),
                               str(tmp_path / "out.ipynb"), str(pid_file)], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kernel = worker = None
    try:
        end = time.monotonic() + 120
        while not pid_file.exists() and time.monotonic() < end and runner.poll() is None:
            time.sleep(0.1)
        kernel, worker, guarded = pid_file.read_text().split()
        kernel, worker = int(kernel), int(worker)
        assert guarded == "True"          # papermill's kernel leads its own session
        os.kill(runner.pid if kill == "runner" else kernel, signal.SIGKILL)
        if kill == "runner":
            runner.wait()
        assert _wait_gone([worker, kernel], 15) == []
    finally:
        for p in (worker, kernel):
            if p:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        runner.kill()
        runner.wait()


def test_guard_does_nothing_outside_a_kernel():
    from flare_utils.utilities.processes import guard_kernel_process_group
    if os.getsid(0) == os.getpid():
        pytest.skip("this test process leads its own session")
    assert guard_kernel_process_group() is False
