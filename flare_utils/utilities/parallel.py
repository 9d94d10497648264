"""One way to run independent per-case work in worker processes.

Workers are spawned, never forked: forking a process that already runs BLAS or torch threads can
deadlock. Results come back in task order; the first error is raised after pending tasks are
cancelled, and FlareInputError survives the trip (it pickles with its path and problem).
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_processes(fn: Callable[[T], R], tasks: Sequence[T], processes: int) -> list[R]:
    """`[fn(t) for t in tasks]`, in up to `processes` spawned workers (in-process when 1)."""
    n = max(1, min(int(processes), len(tasks)))
    if n == 1:
        return [fn(t) for t in tasks]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=n, mp_context=ctx) as ex:
        futures = [ex.submit(fn, t) for t in tasks]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
