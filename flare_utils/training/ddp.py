"""Multi-GPU training through nnU-Net v2's own DDP (`nnUNetv2_train ... -num_gpus N`).

`launch(...)` follows nnU-Net's `run_training(num_gpus>1)` / `run_ddp` path: MASTER_ADDR /
MASTER_PORT, one spawned process per rank (`torch.multiprocessing.spawn`), in each rank
`init_process_group`, `get_trainer_from_args`, `maybe_load_checkpoint`, `run_training` and the
final validation (nnU-Net splits the validation cases over the ranks; rank 0 computes the
metrics and writes the checkpoints and logs). nnU-Net splits the plan's (global) batch size over
the ranks (`_set_batch_size_and_oversample`).

Differences from nnU-Net's own launcher, all outside nnU-Net's code:
- the FLARE training configuration (FLARE_TRAINING_CONFIG) and nnU-Net's folders are set in each
  rank explicitly (spawned processes only inherit what the parent's environment held at spawn);
- backend: CUDA uses nnU-Net's "nccl" and device cuda:<rank>; a config with `device: cpu` runs the
  ranks as CPU processes over "gloo" (for tests and debugging without a GPU - `FlareTrainer`
  keeps the device on cpu and wraps the network in DDP without device_ids);
- every rank seeds its data loading differently (`FlareTrainer.rank_seed`), reproducibly;
- a rank leaves with `os._exit` once its work is written, instead of tearing torch.distributed
  down at interpreter exit: there the DDP reducer can free a gloo process group while holding the
  GIL, whose worker thread, finishing a collective, waits for the GIL (a hang seen in CI-like
  runs); a failing rank's traceback reaches the caller through a file.

Details: docs/reference/training.md, docs/reference/distributed.md ("Multi-GPU training (DDP)").
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from flare_utils.errors import FlareInputError

RANK_INFO_NAME = "flare_ddp_rank{rank}.json"     # written by every rank into the fold folder
TIMEOUT_ENV = "FLARE_DDP_TIMEOUT_S"      # seconds a collective may wait (unset: torch's default, 30 min / 10 min nccl)
NNUNET_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def check_num_gpus(num_gpus: Any) -> int:
    """`num_gpus` as an int >= 1 (else a FlareInputError)."""
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 1:
        raise FlareInputError(None, f"num_gpus must be an integer >= 1 (1: one process, no DDP), got {num_gpus!r}")
    return int(num_gpus)


def backend_for(device: str) -> str:
    """The process-group backend of a config `device` for DDP: nccl (cuda/auto) or gloo (cpu)."""
    if device == "cpu":
        return "gloo"
    if device in ("cuda", "auto"):
        return "nccl"
    raise FlareInputError(None, f"multi-GPU (DDP) training needs device 'cuda' or 'auto' (or 'cpu' for CPU ranks "
                                f"over gloo, for tests); got device {device!r}")


def rank_batch_sizes(global_batch_size: int, world_size: int) -> list[int]:
    """nnU-Net's split of the global batch over the ranks (`_set_batch_size_and_oversample`)."""
    b, w = int(global_batch_size), int(world_size)
    if b < w:
        raise FlareInputError(None, f"the batch size ({b}) is smaller than num_gpus ({w}); every rank needs at least "
                                    f"one sample: lower num_gpus or raise the batch size")
    return [b // w + (1 if (b // w) * w + i < b else 0) for i in range(w)]


def rank_secondary_counts(global_batch_size: int, n_secondary: int, world_size: int) -> list[int]:
    """How many of the `n_secondary` samples of a global batch (pseudo-labelled / unlabelled) each
    rank draws: the secondary samples are spread evenly over the global batch positions, and each
    rank owns a contiguous block of positions as in nnU-Net's batch split. The sum is exactly
    `n_secondary`, so the global pseudo share is the single-process one."""
    sizes = rank_batch_sizes(global_batch_size, world_size)
    b, k = int(global_batch_size), int(n_secondary)
    mask = [(i + 1) * k // b > i * k // b for i in range(b)]
    out, lo = [], 0
    for s in sizes:
        out.append(sum(mask[lo:lo + s]))
        lo += s
    return out


def _free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def check_launch(num_gpus: int, device: str, global_batch_size: int, trainer_cls: type) -> str:
    """Clear errors before spawning anything; returns the backend."""
    num_gpus = check_num_gpus(num_gpus)
    backend = backend_for(device)
    if backend == "nccl":
        import torch
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if num_gpus > n:
            raise FlareInputError(None, f"num_gpus={num_gpus} but {n} CUDA device(s) are visible "
                                        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                                        f"lower num_gpus (CPU ranks over gloo need device 'cpu' in the training "
                                        f"configuration)")
    else:
        from flare_utils.training.base import FlareTrainer
        if not issubclass(trainer_cls, FlareTrainer):
            raise FlareInputError(None, f"CPU DDP (device 'cpu', gloo) needs a FLARE trainer; {trainer_cls.__name__} "
                                        f"would move to cuda:<rank> as nnU-Net's trainer does")
    if not getattr(trainer_cls, "supports_ddp", True):
        raise FlareInputError(None, f"{trainer_cls.__name__} does not support DDP training (num_gpus must be 1)")
    rank_batch_sizes(global_batch_size, num_gpus)
    return backend


def launch(dataset_id: int | str, configuration: str, fold: int | str, trainer: str, plans_identifier: str,
           config_file: str | Path, num_gpus: int, backend: str, continue_training: bool = False,
           final_validation: bool = True) -> None:
    """Spawn `num_gpus` ranks and train (see module docstring); returns when every rank is done.
    A failing rank raises a RuntimeError here with the rank's traceback; torch terminates the
    other ranks."""
    import torch.multiprocessing as mp

    from flare_utils.training.config import ENV_VAR
    from flare_utils.utilities.environment import environment

    env = {k: os.environ[k] for k in NNUNET_VARIABLES if os.environ.get(k)}
    env[ENV_VAR] = str(config_file)
    env["MASTER_ADDR"] = os.environ.get("MASTER_ADDR") or "localhost"
    env["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(_free_port())
    errors = Path(tempfile.mkdtemp(prefix="flare_ddp_"))
    try:
        with environment(**env):     # inherited by the spawned ranks; also set again in each rank
            mp.spawn(_run_rank, args=(str(dataset_id), configuration, fold, trainer, plans_identifier, env,
                                      int(num_gpus), backend, bool(continue_training), bool(final_validation),
                                      str(errors)),
                     nprocs=int(num_gpus), join=True)
    except mp.ProcessExitedException as e:
        f = errors / f"rank{e.error_index}.txt"
        detail = f.read_text() if f.is_file() else f"exit code {e.exit_code}"
        raise RuntimeError(f"DDP training: rank {e.error_index} failed:\n{detail}") from None
    finally:
        shutil.rmtree(errors, ignore_errors=True)


def _run_rank(rank: int, dataset_id: str, configuration: str, fold, trainer: str, plans_identifier: str,
              env: dict, world_size: int, backend: str, continue_training: bool, final_validation: bool,
              errors: str) -> None:
    code = 0
    try:
        _train_rank(rank, dataset_id, configuration, fold, trainer, plans_identifier, env, world_size, backend,
                    continue_training, final_validation)
    except BaseException:
        code = 1
        text = traceback.format_exc()
        sys.stderr.write(text)
        Path(errors, f"rank{rank}.txt").write_text(text)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)         # not the interpreter's teardown of torch.distributed (module docstring)


def _train_rank(rank: int, dataset_id: str, configuration: str, fold, trainer: str, plans_identifier: str,
                env: dict, world_size: int, backend: str, continue_training: bool, final_validation: bool) -> None:
    os.environ.update(env)
    import torch
    import torch.distributed as dist
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    from flare_utils.layout import _refresh_nnunet_paths
    from flare_utils.training.registry import find_trainer

    _refresh_nnunet_paths()
    timeout = os.environ.get(TIMEOUT_ENV)
    kwargs = {"timeout": datetime.timedelta(seconds=float(timeout))} if timeout else {}
    dist.init_process_group(backend, rank=rank, world_size=world_size, **kwargs)
    if backend == "nccl":
        torch.cuda.set_device(torch.device("cuda", dist.get_rank()))
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
    find_trainer(trainer)
    t = get_trainer_from_args(dataset_id, configuration, fold, trainer, plans_identifier, continue_training,
                              device=device)
    maybe_load_checkpoint(t, continue_training, False, None)
    t.run_training()
    if final_validation:
        t.perform_actual_validation(False)
    dist.barrier()             # every rank's files are written before any rank leaves


def read_rank_info(fold_folder: str | Path) -> list[dict]:
    """The per-rank records (`flare_ddp_rank<r>.json`) of a DDP-trained fold, by rank."""
    files = sorted(Path(fold_folder).glob("flare_ddp_rank*.json"), key=lambda p: int(p.stem[len("flare_ddp_rank"):]))
    return [json.loads(f.read_text()) for f in files]
