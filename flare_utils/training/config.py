"""Training configuration shared by the Python API and the stock `nnUNetv2_train` command.

nnU-Net builds trainers with a fixed signature, so the FLARE trainers read their budget and
options from ONE JSON file named by the environment variable `FLARE_TRAINING_CONFIG`; without it
they use `TrainingConfig()` defaults (nnU-Net's own: 1000 epochs x 250 iterations).
`flare_utils.training.train(...)` writes such a file and sets the variable for you. Unknown keys
and wrong types are errors; subclasses of `TrainingConfig` (a dataclass) add keys for their
trainers (`config_class`).

Details: docs/reference/training.md
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flare_utils.data.io import atomic_write_text, read_json_object
from flare_utils.errors import FlareInputError
from flare_utils.utilities.typed import coerce

ENV_VAR = "FLARE_TRAINING_CONFIG"
DETERMINISTIC_ENV = "FLARE_DETERMINISTIC"      # "1": `deterministic` on where the config leaves it None
CONFIG_FILE_NAME = "flare_training_config.json"
LOSSES = ("dice_ce", "dice", "ce")
DEFAULT_LR = {"sgd": 1e-2, "adamw": 3e-3}      # nnU-Net's SGD rate; AdamW's that learns the demo fastest


def deterministic_requested(flag: bool | None) -> bool:
    """`TrainingConfig.deterministic`; None: whether the environment sets FLARE_DETERMINISTIC=1."""
    if flag is not None:
        return bool(flag)
    return os.environ.get(DETERMINISTIC_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class TrainingConfig:
    """Budget and options of one FLARE trainer run (see module docstring)."""
    # budget (nnU-Net defaults)
    num_epochs: int = 1000
    num_iterations_per_epoch: int = 250
    num_val_iterations_per_epoch: int = 50
    # reproducibility: seeds python `random`, numpy and torch (network init, patch sampling,
    # augmentation; augmentation workers get seed-derived seeds). None: not seeded.
    seed: int | None = 0
    # deterministic GPU kernels (CUDA/MPS): torch's deterministic algorithms (warn only), cuDNN
    # deterministic without benchmarking, no torch.compile unless `compile` says so; nothing to
    # switch on CPU. None: on when the environment sets FLARE_DETERMINISTIC=1.
    # docs/reference/determinism.md
    deterministic: bool | None = None
    # device: "auto" keeps the device nnU-Net passed (nnUNetv2_train -device, default cuda) when it
    # exists, else falls back cuda -> mps -> cpu; "cpu"/"cuda"/"mps" force one.
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # CPU resources. num_threads: torch intra-op threads (None: leave torch's setting).
    # n_proc_da: data-augmentation worker processes (0 = in the main process, nnU-Net's
    # SingleThreadedAugmenter; None: nnU-Net's get_allowed_n_proc_DA(), i.e. nnUNet_n_proc_DA,
    # capped to 1 on CPU). export_processes: processes of the final validation's export/metrics
    # pools (nnU-Net uses 8; None: min(2, cpu count)).
    num_threads: int | None = None
    n_proc_da: int | None = None
    export_processes: int | None = None
    # optimisation (nnU-Net defaults: SGD nesterov momentum 0.99, poly lr). "adamw" is nnU-Net's own
    # nnUNetTrainerAdam recipe (AdamW, amsgrad, poly lr): it learns in hundreds rather than thousands
    # of iterations, which the CPU demo needs; give it a smaller initial_lr (e.g. 3e-3).
    optimizer: Literal["sgd", "adamw"] = "sgd"
    initial_lr: float | None = None        # None: the optimizer's default (DEFAULT_LR)
    weight_decay: float = 3e-5
    oversample_foreground_percent: float = 0.33
    loss: Literal["dice_ce", "dice", "ce"] = "dice_ce"
    # augmentation / inference mirroring: None = the trainer's default (teacher on, student off)
    mirroring: bool | None = None
    # final validation: False switches test-time mirroring off (None/True: as the checkpoint says)
    validation_mirroring: bool | None = None
    # transfer learning: nnU-Net checkpoint (or plain state dict) to initialise from; parameters
    # whose name contains one of `init_exclude` are not loaded; shape mismatches are skipped.
    init_checkpoint: str | None = None
    init_exclude: list[str] = field(default_factory=list)
    freeze_encoder_stages: int = 0
    # checkpoints / misc
    save_every: int = 50
    final_validation: bool = True          # used by flare_utils.training.train()
    compile: bool | None = None            # torch.compile; None: nnU-Net's rule (env nnUNet_compile, never CPU)

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.initial_lr is None else float(self.initial_lr)

    def validate(self, where: str | Path | None = None) -> "TrainingConfig":
        def bad(msg):
            raise FlareInputError(where, msg)
        # (nnU-Net's epoch-end bookkeeping needs at least one validation iteration)
        for k in ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch"):
            if getattr(self, k) < 1:
                bad(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("num_threads", "export_processes"):
            v = getattr(self, k)
            if v is not None and v < 1:
                bad(f"{k} must be >= 1 or null, got {v}")
        if self.n_proc_da is not None and self.n_proc_da < 0:
            bad(f"n_proc_da must be >= 0 or null, got {self.n_proc_da}")
        if self.freeze_encoder_stages < 0:
            bad("freeze_encoder_stages must be >= 0")
        if not 0.0 <= self.oversample_foreground_percent <= 1.0:
            bad("oversample_foreground_percent must be in [0, 1]")
        if self.initial_lr is not None and self.initial_lr <= 0:
            bad("initial_lr must be > 0")
        if self.save_every < 1:
            bad("save_every must be >= 1")
        if self.init_checkpoint is not None and not Path(self.init_checkpoint).is_file():
            raise FlareInputError(self.init_checkpoint, "init_checkpoint not found")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str | Path | None = None):
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise FlareInputError(where, f"unknown training option(s) {unknown}; allowed: {sorted(names)}")
        try:
            kwargs = {k: coerce(v, hints[k], k) for k, v in data.items()}
        except FlareInputError as e:
            raise FlareInputError(where, e.problem) from None
        return cls(**kwargs).validate(where)

    @classmethod
    def from_json(cls, path: str | Path):
        return cls.from_dict(read_json_object(path, f"training configuration (named by {ENV_VAR})"), Path(path))

    @classmethod
    def from_env(cls):
        """The configuration named by FLARE_TRAINING_CONFIG, else the defaults."""
        p = os.environ.get(ENV_VAR)
        return cls.from_json(p) if p else cls().validate()

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    def replace(self, **changes):
        return dataclasses.replace(self, **changes).validate()
