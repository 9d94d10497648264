"""FLARE22 trainers for nnU-Net v2 and a Python API to train them.

Light to import: the trainer classes (which import nnunetv2 and torch) load on first access.

* `TrainingConfig` - budget/device/seed/loss/mirroring/transfer options (JSON via
  FLARE_TRAINING_CONFIG), see `flare_utils.training.config`.
* `FlareTrainer`, `FlareTeacherTrainer`, `FlareStudentTrainer` - nnU-Net trainer subclasses.
* `register_with_nnunet()` - make them visible to `nnUNetv2_train -tr NAME` / `nnUNetv2_predict`.
* `train`, `train_folds`, `read_learning_curves`, `read_validation_dice`, ... - notebook API.
* `write_splits`, `SplitSpec` - custom cross-validation splits.
* `load_transfer_weights`, `freeze_encoder_stages` - transfer-learning helpers.
"""
from __future__ import annotations

import importlib

from flare_utils.training.config import ENV_VAR, TrainingConfig
from flare_utils.training.splits import SplitSpec, known_case_ids, make_splits, read_splits, write_splits

_LAZY = {
    "FlareTrainer": ".base", "seed_everything": ".base", "resolve_device": "flare_utils.utilities.device",
    "FlareTeacherTrainer": ".trainers", "FlareStudentTrainer": ".trainers",
    "register_with_nnunet": ".registry", "unregister_from_nnunet": ".registry", "find_trainer": ".registry",
    "trainer_classes": ".registry", "TRAINER_MODULES": ".registry",
    "train": ".api", "train_folds": ".api", "results_folder": ".api", "read_learning_curves": ".api",
    "read_training_log": ".api", "read_validation_dice": ".api", "read_validation_cases": ".api",
    "training_config_of": ".api",
    "load_transfer_weights": ".transfer", "freeze_encoder_stages": ".transfer", "TransferReport": ".transfer",
}

__all__ = ["ENV_VAR", "TrainingConfig", "SplitSpec", "known_case_ids", "make_splits", "read_splits",
           "write_splits", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
