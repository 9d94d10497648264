"""One Dask task per case, results as they complete, and the model each worker builds only once.

`map_cases` submits `fn(item)` for every (name, item), impure (a case is work with effects, never
deduplicated by Dask) and with `retries` re-runs of a task that raised; a task whose worker died
is moved to another worker by the scheduler. The caller gets (name, result) as cases finish, on
whichever worker, so it can record each case as it comes (one process writes the records).

A task can run twice (its worker died after the work, before the result came back), so a task
must be idempotent: check whether its output is already there, complete and made by the same
producer, and then only report it. Outputs are written atomically (temporary file, rename), so an
output that exists is complete.

`cached(key, factory)` holds, in each worker process, what `factory()` built for `key` (a model
with its weights), for the tasks that follow; one task uses it at a time.
"""
from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence, TypeVar

from flare_utils.errors import FlareInputError

__all__ = ["map_cases", "map_ordered", "cached", "cache_info", "next_index", "worker_name", "factory_token",
           "DEFAULT_RETRIES"]

T = TypeVar("T")
R = TypeVar("R")
DEFAULT_RETRIES = 2

# ----------------------------------------------------------------------------------------------
# Worker side

_GUARD = threading.Lock()
_CACHE: "OrderedDict[Hashable, Any]" = OrderedDict()
_LOCKS: dict[Hashable, threading.Lock] = {}
_BUILDS: dict[Hashable, int] = {}
_COUNTERS: dict[Hashable, int] = {}


@contextlib.contextmanager
def cached(key: Hashable, factory: Callable[[], T], keep: int = 1) -> Iterator[T]:
    """The object `factory()` made for `key` in this process, built on first use and kept for the
    next tasks; one user at a time (a predictor is not thread-safe). At most `keep` objects stay:
    the least recently used one is dropped when a new key comes (a round's model replaces the last
    round's)."""
    with _GUARD:
        lock = _LOCKS.setdefault(key, threading.Lock())
    with lock:
        with _GUARD:
            obj = _CACHE.get(key)
            if obj is not None:
                _CACHE.move_to_end(key)
        if obj is None:
            obj = factory()
            with _GUARD:
                _BUILDS[key] = _BUILDS.get(key, 0) + 1
                _CACHE[key] = obj
                _CACHE.move_to_end(key)
                while len(_CACHE) > max(1, int(keep)):
                    _CACHE.popitem(last=False)
        yield obj


def cache_info() -> dict[str, Any]:
    """This process's cache: {"pid", "keys" (kept now), "builds" (times each key was built)}."""
    with _GUARD:
        return {"pid": os.getpid(), "keys": [repr(k) for k in _CACHE],
                "builds": {repr(k): n for k, n in _BUILDS.items()}}


def next_index(key: Hashable) -> int:
    """1, 2, 3, ... per `key` in this process: a worker's n-th case of a round (memory records)."""
    with _GUARD:
        _COUNTERS[key] = _COUNTERS.get(key, 0) + 1
        return _COUNTERS[key]


def worker_name() -> str | None:
    """The Dask worker running this task (None outside a worker)."""
    try:
        from distributed import get_worker
        return str(get_worker().name)
    except (ImportError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# Client side

def factory_token(factory: Callable, what: str = "predictor factory") -> str:
    """What tells one factory from another in a worker's cache: a hash of its pickled bytes. A
    factory that cannot be pickled cannot reach the workers: a clear error before any task."""
    import hashlib

    import cloudpickle
    try:
        data = cloudpickle.dumps(factory)
    except Exception as e:            # noqa: BLE001 - whatever pickling raises, the cause is the factory
        raise FlareInputError(None, f"{what} {factory!r} cannot be sent to Dask workers "
                                    f"({type(e).__name__}: {e}); use a module-level function") from e
    return hashlib.sha256(data).hexdigest()[:16]


def map_cases(client, fn: Callable[[Any], T], items: Iterable[tuple[str, Any]], *, key_prefix: str,
              retries: int = DEFAULT_RETRIES, progress: Callable[[int, int, str], None] | None = None
              ) -> Iterator[tuple[str, T]]:
    """Run `fn(item)` on the cluster for every (name, item), one task each; yield (name, result) as
    tasks complete (`progress(done, total, name)` is called before each). The first task that fails
    (after `retries` re-runs) cancels the others and its error is raised here (the cases done by
    then stay done: tasks write their own outputs)."""
    from distributed import as_completed
    token = uuid.uuid4().hex[:8]
    futures = {}
    for name, item in items:
        f = client.submit(fn, item, key=f"{key_prefix}-{name}-{token}", pure=False, retries=int(retries))
        futures[f] = name
    if not futures:
        return
    try:
        for n, f in enumerate(as_completed(list(futures)), start=1):
            result = f.result()
            if progress is not None:
                progress(n, len(futures), futures[f])
            yield futures[f], result
    finally:                         # an error, or the caller stopped early: nothing left running for it
        pending = [f for f in futures if not f.done()]
        if pending:
            client.cancel(pending)


def map_ordered(fn: Callable[[T], R], tasks: Sequence[T], *, client=None, processes: int = 1,
                key_prefix: str = "case", retries: int = DEFAULT_RETRIES) -> list[R]:
    """`[fn(t) for t in tasks]` in task order: one task each on the client's cluster when `client` is
    given, else in `processes` local worker processes (`flare_utils.utilities.parallel.map_processes`).
    For per-case work without outputs of its own (tables): the first error is raised."""
    if client is None:
        from flare_utils.utilities.parallel import map_processes
        return map_processes(fn, tasks, processes)
    results: dict[int, R] = {}
    for i, r in map_cases(client, fn, ((str(i), t) for i, t in enumerate(tasks)), key_prefix=key_prefix,
                          retries=retries):
        results[int(i)] = r
    return [results[i] for i in range(len(tasks))]
