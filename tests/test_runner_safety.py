"""Run-folder lock and clean interruption (issue 15)."""
from __future__ import annotations

import json
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
