"""Noisy student: stronger augmentation, labelled:pseudo = 1:3 minibatches, then a labelled fine-tune.

`FlareNoisyStudentTrainer` is a `FlarePseudoLabelTrainer` with `pseudo_share` 0.75 (1:3 holds
exactly only for a batch size that is a multiple of 4, e.g. `batch_size: 4`) and the noisy-student
paper's strong augmentation (`STRONG_AUGMENTATION`); `FlareFineTuneTrainer` then fine-tunes on the
labelled cases only from the student's checkpoint (`init_checkpoint` required) at a lower learning
rate. `train_noisy_student(...)` runs both stages fold by fold.

Details: docs/reference/pseudo_label_training.md
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from batchgeneratorsv2.helpers.scalar_type import RandomScalar
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import (
    MultiplicativeBrightnessTransform,
)
from batchgeneratorsv2.transforms.intensity.contrast import (
    BGContrast,
    ContrastTransform,
)
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.nnunet.random_binary_operator import (
    ApplyRandomBinaryOperatorTransform,
)
from batchgeneratorsv2.transforms.nnunet.remove_connected_components import (
    RemoveRandomConnectedComponentFromOneHotEncodingTransform,
)
from batchgeneratorsv2.transforms.nnunet.seg_to_onehot import (
    MoveSegAsOneHotToDataTransform,
)
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import (
    SimulateLowResolutionTransform,
)
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import (
    DownsampleSegForDSTransform,
)
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import (
    Convert2DTo3DTransform,
    Convert3DTo2DTransform,
)
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
from batchgeneratorsv2.transforms.utils.seg_to_regions import (
    ConvertSegmentationToRegionsTransform,
)
from nnunetv2.training.data_augmentation.compute_initial_patch_size import (
    get_patch_size,
)

from flare_utils.errors import FlareInputError
from flare_utils.training.base import FlareTrainer
from flare_utils.training.config import TrainingConfig
from flare_utils.training.with_pseudo_labels import FlarePseudoLabelTrainer, PseudoLabelConfig, _BatchSizeMixin

__all__ = [
    "STRONG_AUGMENTATION",
    "FineTuneConfig",
    "FlareFineTuneTrainer",
    "FlareNoisyStudentTrainer",
    "NoisyStudentConfig",
    "StrongAugmentation",
    "strong_training_transforms",
    "student_checkpoint",
    "train_noisy_student",
]


@dataclass(frozen=True)
class StrongAugmentation:
    """Ranges (Table 5 of the noisy-student paper) and application probabilities (nnU-Net's)."""
    rotation_deg: float = 30.0
    p_rotation: float = 0.2
    scaling: tuple[float, float] = (0.7, 1.4)
    p_scaling: float = 0.2
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_noise: float = 0.1
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    p_blur: float = 0.2
    brightness: tuple[float, float] = (0.7, 1.3)
    p_brightness: float = 0.15
    contrast: tuple[float, float] = (0.65, 1.5)
    p_contrast: float = 0.15
    low_resolution_zoom: tuple[float, float] = (0.5, 1.0)
    p_low_resolution: float = 0.25
    gamma: tuple[float, float] = (0.7, 1.5)
    p_gamma: float = 0.3
    p_gamma_inverted: float = 0.1
    mirroring: bool = True

    @property
    def rotation_rad(self) -> tuple[float, float]:
        a = self.rotation_deg / 180.0 * math.pi
        return (-a, a)

    def to_dict(self):
        return asdict(self)


STRONG_AUGMENTATION = StrongAugmentation()


def strong_training_transforms(patch_size, rotation_for_DA: RandomScalar, deep_supervision_scales,
                               mirror_axes, do_dummy_2d_data_aug: bool, use_mask_for_norm=None,
                               is_cascaded: bool = False, foreground_labels=None, regions=None,
                               ignore_label=None, aug: StrongAugmentation = STRONG_AUGMENTATION) -> BasicTransform:
    """nnU-Net's training pipeline (same structure and order) with the strong parameters."""
    t = []
    if do_dummy_2d_data_aug:
        ignore_axes = (0,)
        t.append(Convert3DTo2DTransform())
        patch_size_spatial = patch_size[1:]
    else:
        patch_size_spatial = patch_size
        ignore_axes = None
    t.append(SpatialTransform(
        patch_size_spatial, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
        p_rotation=aug.p_rotation, rotation=rotation_for_DA, p_scaling=aug.p_scaling, scaling=tuple(aug.scaling),
        p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False, border_mode_seg="constant",
        padding_value_seg=-1))
    if do_dummy_2d_data_aug:
        t.append(Convert2DTo3DTransform())
    t.append(RandomTransform(GaussianNoiseTransform(
        noise_variance=tuple(aug.noise_variance), p_per_channel=1, synchronize_channels=True),
        apply_probability=aug.p_noise))
    t.append(RandomTransform(GaussianBlurTransform(
        blur_sigma=tuple(aug.blur_sigma), synchronize_channels=False, synchronize_axes=False,
        p_per_channel=0.5, benchmark=True), apply_probability=aug.p_blur))
    t.append(RandomTransform(MultiplicativeBrightnessTransform(
        multiplier_range=BGContrast(tuple(aug.brightness)), synchronize_channels=False, p_per_channel=1),
        apply_probability=aug.p_brightness))
    t.append(RandomTransform(ContrastTransform(
        contrast_range=BGContrast(tuple(aug.contrast)), preserve_range=True, synchronize_channels=False,
        p_per_channel=1), apply_probability=aug.p_contrast))
    t.append(RandomTransform(SimulateLowResolutionTransform(
        scale=tuple(aug.low_resolution_zoom), synchronize_channels=False, synchronize_axes=True,
        ignore_axes=ignore_axes, allowed_channels=None, p_per_channel=0.5),
        apply_probability=aug.p_low_resolution))
    t.append(RandomTransform(GammaTransform(
        gamma=BGContrast(tuple(aug.gamma)), p_invert_image=1, synchronize_channels=False, p_per_channel=1,
        p_retain_stats=1), apply_probability=aug.p_gamma_inverted))
    t.append(RandomTransform(GammaTransform(
        gamma=BGContrast(tuple(aug.gamma)), p_invert_image=0, synchronize_channels=False, p_per_channel=1,
        p_retain_stats=1), apply_probability=aug.p_gamma))
    if mirror_axes is not None and len(mirror_axes) > 0:
        t.append(MirrorTransform(allowed_axes=mirror_axes))
    if use_mask_for_norm is not None and any(use_mask_for_norm):
        t.append(MaskImageTransform(apply_to_channels=[i for i in range(len(use_mask_for_norm)) if use_mask_for_norm[i]],
                                    channel_idx_in_seg=0, set_outside_to=0))
    t.append(RemoveLabelTansform(-1, 0))
    if is_cascaded:
        if foreground_labels is None:
            raise FlareInputError(None, "cascaded training needs foreground_labels")
        t.append(MoveSegAsOneHotToDataTransform(source_channel_idx=1, all_labels=foreground_labels,
                                                remove_channel_from_source=True))
        t.append(RandomTransform(ApplyRandomBinaryOperatorTransform(
            channel_idx=list(range(-len(foreground_labels), 0)), strel_size=(1, 8), p_per_label=0.5),
            apply_probability=0.4))
        t.append(RandomTransform(RemoveRandomConnectedComponentFromOneHotEncodingTransform(
            channel_idx=list(range(-len(foreground_labels), 0)), fill_with_other_class_p=0,
            dont_do_if_covers_more_than_x_percent=0.15, p_per_label=0.5), apply_probability=0.2))
    if regions is not None:
        t.append(ConvertSegmentationToRegionsTransform(
            regions=list(regions) + [ignore_label] if ignore_label is not None else regions, channel_in_seg=0))
    if deep_supervision_scales is not None:
        t.append(DownsampleSegForDSTransform(ds_scales=deep_supervision_scales))
    return ComposeTransforms(t)


class _StrongAugmentationMixin:
    """Strong augmentation for a FlareTrainer: +-30 deg rotation and the Table-5 pipeline."""
    augmentation: StrongAugmentation = STRONG_AUGMENTATION

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        _, dummy_2d, _, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.augmentation.mirroring:
            mirror_axes = None
            self.inference_allowed_mirroring_axes = None
        rot = self.augmentation.rotation_rad
        patch_size = self.configuration_manager.patch_size
        dim = len(patch_size)
        # nnU-Net's own rule for the larger crop that rotation/scaling needs (its scale range too)
        initial_patch_size = get_patch_size(patch_size[-dim:], rot, rot, rot, (0.85, 1.25))
        if dummy_2d:
            initial_patch_size[0] = patch_size[0]
        return rot, dummy_2d, initial_patch_size, mirror_axes

    @staticmethod
    def get_training_transforms(patch_size: np.ndarray | tuple[int], rotation_for_DA: RandomScalar,
                                deep_supervision_scales: list | tuple | None, mirror_axes: tuple[int, ...],
                                do_dummy_2d_data_aug: bool, use_mask_for_norm: list[bool] | None = None,
                                is_cascaded: bool = False, foreground_labels=None, regions=None,
                                ignore_label: int | None = None) -> BasicTransform:
        return strong_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                          do_dummy_2d_data_aug, use_mask_for_norm, is_cascaded, foreground_labels,
                                          regions, ignore_label)


@dataclass
class NoisyStudentConfig(PseudoLabelConfig):
    """PseudoLabelConfig with labelled:pseudo = 1:3."""
    pseudo_share: float | None = 0.75


@dataclass
class FineTuneConfig(TrainingConfig):
    """TrainingConfig for the fine-tune stage: lower initial lr; `init_checkpoint` required."""
    initial_lr: float = 1e-3
    batch_size: int | None = None

    def validate(self, where=None):
        super().validate(where)
        if self.batch_size is not None and self.batch_size < 1:
            raise FlareInputError(where, f"batch_size must be >= 1 or null, got {self.batch_size}")
        return self


class FlareNoisyStudentTrainer(_StrongAugmentationMixin, FlarePseudoLabelTrainer):
    """Noisy student: labelled + pseudo-labelled (1:3 per batch), strong augmentation."""
    config_class = NoisyStudentConfig
    default_mirroring = True


class FlareFineTuneTrainer(_StrongAugmentationMixin, _BatchSizeMixin, FlareTrainer):
    """Fine-tune on labelled cases only from the student's checkpoint (`init_checkpoint`), lr 1e-3."""
    config_class = FineTuneConfig
    default_mirroring = True

    def on_train_start(self):
        if not self.flare_config.init_checkpoint and self.current_epoch == 0:
            raise FlareInputError(None, f"{type(self).__name__} fine-tunes a trained student: set `init_checkpoint` "
                                        f"(e.g. <student results>/fold_N/checkpoint_final.pth)")
        super().on_train_start()


def student_checkpoint(results_folder: str | Path, fold: int | str, name: str = "checkpoint_final.pth") -> Path:
    f = Path(results_folder) / f"fold_{fold}" / name
    if not f.is_file():
        raise FlareInputError(f, "student checkpoint not found (train the student first)")
    return f


def train_noisy_student(dataset_id: int | str, plans_identifier: str, folds: Iterable[int | str] = (0,),
                        config: NoisyStudentConfig | Mapping | None = None,
                        finetune_config: FineTuneConfig | Mapping | None = None,
                        run_dir: str | Path | None = None, student_trainer: str = "FlareNoisyStudentTrainer",
                        finetune_trainer: str = "FlareFineTuneTrainer", num_gpus: int = 1) -> dict[str, Path | None]:
    """Both noisy-student stages fold by fold: the student on labelled + pseudo-labelled data, then
    (when `finetune_config` is given) the fine-tune on labelled data from the student's final
    checkpoint of the same fold. Returns {"student": results folder, "finetune": results folder or None}."""
    from flare_utils.training.api import train
    cfg = config if isinstance(config, NoisyStudentConfig) else \
        NoisyStudentConfig.from_dict(dict(config or {}) if not isinstance(config, TrainingConfig) else config.to_dict())
    ft = None
    if finetune_config is not None:
        ft_dict = finetune_config.to_dict() if isinstance(finetune_config, TrainingConfig) else dict(finetune_config)
        ft_dict.pop("init_checkpoint", None)
        ft = FineTuneConfig.from_dict(ft_dict)
    folds = list(folds)
    if not folds:
        raise FlareInputError(None, "no folds given")
    out: dict[str, Path | None] = {"student": None, "finetune": None}
    for f in folds:
        out["student"] = train(dataset_id, plans_identifier, f, student_trainer, cfg, run_dir, num_gpus=num_gpus)
        if ft is not None:
            ck = student_checkpoint(out["student"], f)
            out["finetune"] = train(dataset_id, plans_identifier, f, finetune_trainer,
                                    ft.replace(init_checkpoint=str(ck)), run_dir, num_gpus=num_gpus)
    return out
