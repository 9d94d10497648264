"""Running one benchmark measurement in a fresh subprocess (its own peak RSS, imports, threads).

A benchmark script calls itself with `--child KIND ARGS...`; the child prints its result as the last
line of stdout, in JSON. Every child runs with `OMP_WAIT_POLICY=PASSIVE` unless the caller's
environment says otherwise: on a CPU shared with other jobs, spinning OpenMP threads made 2-thread
convolutions up to 20x slower (docs/benchmarks.md).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def run_child(script: str | Path, args: list[str], *, env: dict[str, str] | None = None,
              timeout: float = 3600) -> dict:
    """Run `python SCRIPT --child ARGS` with the project on PYTHONPATH; its last stdout line as JSON."""
    full_env = dict(os.environ, PYTHONPATH=str(PROJECT), OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                    **(env or {}))
    proc = subprocess.run([sys.executable, str(Path(script).resolve()), "--child", *args], env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def reply(result: dict) -> None:
    """The child's side: print `result` as the last stdout line, in the JSON `run_child` reads."""
    sys.stdout.write("\n" + json.dumps(result, default=float) + "\n")
