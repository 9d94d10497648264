"""What a run was made with: params, package versions, git commit, device, seeds and the settings
that decide whether a re-run gives bit-identical results (`determinism`).

Written by the runner to `<run_dir>/provenance.json` at every invocation (the previous ones are
kept in `logs/`), so a report sent to a collaborator says exactly what produced it. What is and is
not reproducible: docs/reference/determinism.md.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from flare_utils.layout import PROJECT_ROOT

PACKAGES = ("flare-utils", "torch", "nnunetv2", "dynamic-network-architectures", "numpy", "nibabel",
            "SimpleITK", "papermill", "matplotlib", "pandas", "scipy", "batchgeneratorsv2", "edt",
            "batchgenerators", "scikit-image", "acvl-utils", "blosc2")


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


# Environment variables that change numbers or the settings that do (docs/reference/determinism.md)
DETERMINISM_ENV = ("FLARE_DETERMINISTIC", "nnUNet_n_proc_DA", "nnUNet_def_n_proc", "nnUNet_compile",
                   "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG", "ATEN_CPU_CAPABILITY",
                   "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_CBWR")

DETERMINISM_GUARANTEED = (
    "On CPU, a re-run of these params into a new run folder on the same machine, with the same package "
    "versions, training thread counts (training_threads) and augmentation worker counts (augmentation_workers), "
    "gives a bit-identical cohort, pseudo labels, selections, predicted label maps and metric CSVs (expected, "
    "not tested, on another machine with the same CPU model).")
DETERMINISM_NOT_GUARANTEED = (
    "another CPU type: oneDNN and PyTorch pick kernels by instruction set and cache sizes (cpu_capability; "
    "AVX2 and AVX-512 round convolutions differently), and training amplifies last-bit differences into "
    "other models",
    "another training thread count (null = all cores): convolution weight gradients are summed over threads",
    "another augmentation worker count: each worker draws from its own seed, so the batch stream changes",
    "other package versions (torch, numpy, scipy, batchgeneratorsv2, nnunetv2, ...)",
    "CUDA/MPS: cuDNN/cuBLAS algorithm choice and atomic additions; FLARE_DETERMINISTIC=1 (training config "
    "`deterministic`) uses torch's deterministic algorithms where they exist, ops without one only warn, and "
    "inference (nnU-Net's predictor turns cuDNN benchmarking on) is not covered",
    "a training resumed from a checkpoint: random number generator states are not saved in checkpoints",
)


def _cpu_capability() -> str | None:
    import torch
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:
        return None


def _onednn_version() -> str | None:
    import torch
    try:
        m = re.search(r"(?:MKL-DNN|oneDNN) v([0-9][^ \n]*)", torch.__config__.show())
    except Exception:           # noqa: BLE001 - a version string is never worth a failed run
        return None
    return m.group(1) if m else None


def _default_n_proc_da(resolved_device: str) -> int | None:
    """The trainers' augmentation worker count when `n_proc_da` is null (FlareTrainer.n_proc_da)."""
    try:
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
        n = int(get_allowed_n_proc_DA())
    except Exception:           # noqa: BLE001 - e.g. a bad nnUNet_n_proc_DA; the trainer will say so
        return None
    return min(n, 1) if resolved_device == "cpu" else n


def determinism_info(params: Any, resolved_device: str) -> dict[str, Any]:
    """The settings a bit-identical re-run needs, and what is (not) guaranteed."""
    import torch
    from flare_utils.training.config import deterministic_requested

    default_da = _default_n_proc_da(resolved_device)
    t, q, s = params.teacher, params.pseudo, params.student
    retrain = dict(q.retrain_config or {})

    def workers(n):
        return default_da if n is None else int(n)
    info: dict[str, Any] = {
        "guaranteed": DETERMINISM_GUARANTEED,
        "not_guaranteed": list(DETERMINISM_NOT_GUARANTEED),
        # FLARE_DETERMINISTIC=1, or the retraining's own `deterministic`; only GPUs have anything to switch
        "deterministic_mode": {"teacher": deterministic_requested(None),
                               "pseudo_retraining": deterministic_requested(retrain.get("deterministic")),
                               "student": deterministic_requested(None)},
        "cpu_capability": _cpu_capability(),
        "onednn": _onednn_version(),
        # torch threads of a stage that does not set them (inference, evaluation): torch's default here
        "torch_threads_default": torch.get_num_threads(),
        # torch threads of training (null: torch's default, i.e. the machine's cores)
        "training_threads": {"teacher": t.num_threads, "pseudo_retraining": retrain.get("num_threads", q.num_threads),
                             "student": s.num_threads},
        "augmentation_workers": {"teacher": workers(t.n_proc_da),
                                 "pseudo_retraining": workers(retrain.get("n_proc_da")),
                                 "student": workers(s.n_proc_da)},
        "env": {k: os.environ.get(k) for k in DETERMINISM_ENV},
        "note": "docs/reference/determinism.md",
    }
    if torch.cuda.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def collect(params: Any, command: str | None = None) -> dict[str, Any]:
    """Provenance of a run with `params` (a StudyParams)."""
    device = device_info(params.device)
    return {
        "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(sys.argv),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "packages": package_versions(),
        "git": git_state(),
        "device": device,
        "seeds": {"study": params.seed, "phantom": params.data.phantom.seed},
        "determinism": determinism_info(params, device["resolved"]),
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
