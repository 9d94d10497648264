"""The FLARE22 teacher and student trainers (nnU-Net v2 trainer classes).

Both are `FlareTrainer`s (budget, device, seed, loss, transfer init and freezing from the
`TrainingConfig`); they differ in their defaults:

* `FlareTeacherTrainer` (big "accurate" model, 5-fold CV on the labelled cases): nnU-Net's recipe
  unchanged - mirroring on in augmentation and test-time inference, Dice+CE, SGD nesterov 0.99,
  poly lr.
* `FlareStudentTrainer` (small "efficient" model): mirroring off in the training augmentation and
  `inference_allowed_mirroring_axes = None`, so nnU-Net's predictor (nnUNetv2_predict) does no
  test-time mirroring with its checkpoints.

nnU-Net finds them by class name once `flare_utils.training.register_with_nnunet()` has run
(`nnUNetv2_train ... -tr FlareStudentTrainer`).
"""
from __future__ import annotations

from flare_utils.training.base import FlareTrainer

__all__ = ["FlareTrainer", "FlareTeacherTrainer", "FlareStudentTrainer"]


class FlareTeacherTrainer(FlareTrainer):
    """Teacher: nnU-Net's default recipe (mirroring on), configured by TrainingConfig."""
    default_mirroring = True


class FlareStudentTrainer(FlareTrainer):
    """Student: no mirroring in training augmentation nor at inference."""
    default_mirroring = False
