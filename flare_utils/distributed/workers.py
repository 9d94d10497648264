"""What each Dask worker process is set up with: its torch threads and its one GPU.

One worker per GPU, each pinned to its device through `CUDA_VISIBLE_DEVICES` (so "cuda" inside the
worker is its own GPU, and nothing of ours needs a device index):

- LocalCluster on a GPU machine: the parent gives worker i the environment of
  `gpu_environments` (GPU i of the visible ones, round robin when there are more workers than GPUs),
  through the nanny that starts the worker process — before anything in it imports torch.
- SLURM with several GPUs per job (one worker process per GPU): SLURM makes the job's GPUs visible to
  every process of the job; `WorkerSetup` narrows each worker to the GPU of its slot (the `-<i>` that
  `dask worker --nworkers N` appends to the worker's name), again before torch is imported.

Torch threads: the nanny starts workers with OMP_NUM_THREADS=1 (Dask's default); `WorkerSetup` sets
the number asked for, also in a worker that the nanny restarted after a crash.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Sequence

from distributed import WorkerPlugin

__all__ = ["visible_gpus", "gpu_environments", "worker_slot", "pinned_visible", "setup_environment", "WorkerSetup",
           "PIN_GPUS_ENV"]

PIN_GPUS_ENV = "FLARE_DASK_PIN_GPUS"      # set in a SLURM job's script: narrow each worker to one GPU


def _parse_visible(value: str | None) -> list[str] | None:
    """The entries of a CUDA_VISIBLE_DEVICES value; None when unset ("" and "-1" hide every GPU)."""
    if value is None:
        return None
    entries = [v.strip() for v in value.split(",") if v.strip()]
    return [] if not entries or entries[0] == "-1" else entries


def visible_gpus(device: str = "auto", environ: dict[str, str] | None = None) -> list[str]:
    """The GPUs this process may give its workers, as CUDA_VISIBLE_DEVICES entries: none when
    `device` is not a CUDA one ("cpu", "mps") or CUDA is absent; else the entries of this process's
    CUDA_VISIBLE_DEVICES, or "0".."n-1" for the n devices torch sees."""
    if str(device) not in ("auto", "cuda") and not str(device).startswith("cuda:"):
        return []
    env = os.environ if environ is None else environ
    entries = _parse_visible(env.get("CUDA_VISIBLE_DEVICES"))
    try:
        import torch
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:          # pragma: no cover - torch is a dependency
        n = 0
    if n == 0:
        return []
    return entries[:n] if entries is not None else [str(i) for i in range(n)]


def gpu_environments(n_workers: int, gpus: Sequence[str]) -> list[dict[str, str]]:
    """The environment of each of `n_workers` local workers: worker i sees only GPU
    `gpus[i % len(gpus)]`; no GPUs: nothing is set (CPU workers)."""
    if not gpus:
        return [{} for _ in range(int(n_workers))]
    return [{"CUDA_VISIBLE_DEVICES": str(gpus[i % len(gpus)])} for i in range(int(n_workers))]


def worker_slot(name: object) -> int:
    """A worker's index among the workers of its job or LocalCluster: LocalCluster names them 0, 1, ...,
    `dask worker --nworkers N --name JOB` names them JOB-0 .. JOB-(N-1); anything else is slot 0."""
    if isinstance(name, int) and not isinstance(name, bool):
        return name
    s = str(name)
    if s.isdigit():
        return int(s)
    m = re.search(r"-(\d+)$", s)
    return int(m.group(1)) if m else 0


def pinned_visible(visible: str | None, slot: int) -> str | None:
    """CUDA_VISIBLE_DEVICES for the worker of `slot` when the job shows it `visible` (several GPUs):
    the one GPU of its slot (round robin); None: leave as it is (unset, or one GPU or none)."""
    entries = _parse_visible(visible)
    if not entries or len(entries) < 2:
        return None
    return entries[slot % len(entries)]


def setup_environment(environ: dict[str, str], name: object, *, pin_gpus: bool, torch_threads: int | None,
                      torch_imported: bool) -> dict[str, str]:
    """The environment variables a worker named `name` sets on itself (`WorkerSetup`): its one GPU
    when `pin_gpus` (or FLARE_DASK_PIN_GPUS=1 in its job) and torch is not imported yet (CUDA reads
    the variable once), and the thread counts of OpenMP / MKL / OpenBLAS (torch's intra-op pool)."""
    out: dict[str, str] = {}
    if (pin_gpus or environ.get(PIN_GPUS_ENV) == "1") and not torch_imported:
        one = pinned_visible(environ.get("CUDA_VISIBLE_DEVICES"), worker_slot(name))
        if one is not None:
            out["CUDA_VISIBLE_DEVICES"] = one
    if torch_threads:
        out.update({var: str(int(torch_threads)) for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                              "OPENBLAS_NUM_THREADS")})
    return out


class WorkerSetup(WorkerPlugin):
    """Run in every worker process (also one the nanny restarted): `setup_environment`, and
    torch's thread count when torch is loaded already."""

    name = "flare-worker-setup"

    def __init__(self, torch_threads: int | None = None, pin_gpus: bool = False):
        self.torch_threads = torch_threads
        self.pin_gpus = pin_gpus

    def setup(self, worker) -> None:
        torch = sys.modules.get("torch")
        os.environ.update(setup_environment(dict(os.environ), worker.name, pin_gpus=self.pin_gpus,
                                            torch_threads=self.torch_threads, torch_imported=torch is not None))
        if torch is not None and self.torch_threads:
            torch.set_num_threads(int(self.torch_threads))
