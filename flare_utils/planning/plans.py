"""nnU-Net v2 plans for the FLARE22 recipes: nnU-Net's own planning, plus the papers' variants.

`plan_and_preprocess(dataset_id, variants)` runs nnU-Net v2's own fingerprinting and planner,
derives one plans file per requested variant (`nnUNetPlans_<variant>.json`, 3d_fullres only:
`accurate`/`efficient` from the FLARE22 winner's paper, `lowfootprint`, CPU `*_demo` scales) and
preprocesses each with nnU-Net's preprocessor. nnU-Net's residual-encoder presets (`resenc_m`,
`resenc_l`, `resenc_xl`) are planned by nnU-Net's own planner classes instead, under nnU-Net's
identifiers (`nnUNetResEncUNetMPlans`, ...). The files are ordinary nnU-Net plans, so
`nnUNetv2_train ... -p nnUNetPlans_accurate` and `nnUNetv2_predict` use them unchanged.
Patch sizes and spacings here are (z, y, x), slice axis first.

nnunetv2 is imported lazily and reads nnUNet_raw/_preprocessed/_results when used: point them at
a run first (`flare_utils.layout.RunLayout(run_dir).activate()`).

Details: docs/reference/plans.md
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from flare_utils.data.io import atomic_write_json
from flare_utils.errors import FlareInputError
from flare_utils.data.labels import dataset_json_labels
from flare_utils.layout import nnunet_folders
from flare_utils.utilities.environment import environment

__all__ = [
    "PlanVariant", "PLAN_VARIANTS", "DEFAULT_PLANS_IDENTIFIER", "CONFIGURATION",
    "get_variant", "plans_identifier", "make_plan_variant", "skeleton_base_plans",
    "plan_topology", "count_parameters", "plan_and_preprocess", "describe_plans",
    "verify_preprocessed", "flare22_dataset_json", "load_plans", "resolve_plans_identifier",
    "NNUNET_PRESETS", "nnunet_planner_class", "plan_nnunet_preset", "skeleton_fingerprint",
]

CONFIGURATION = "3d_fullres"
DEFAULT_PLANS_IDENTIFIER = "nnUNetPlans"
MIN_FEATURE_MAP_EDGE = 4          # nnU-Net's UNet_featuremap_min_edge_length
# nnU-Net's residual-encoder presets ("nnU-Net Revisited", 2024): variant name -> (planner class in
# nnunetv2.experiment_planning, the plans identifier that planner writes by default). The planners
# target 8 / 24 / 40 GB of GPU memory (their own defaults, which are kept).
NNUNET_PRESETS: dict[str, tuple[str, str]] = {
    "resenc_m": ("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans"),
    "resenc_l": ("nnUNetPlannerResEncL", "nnUNetResEncUNetLPlans"),
    "resenc_xl": ("nnUNetPlannerResEncXL", "nnUNetResEncUNetXLPlans"),
}
_FIXED_IDENTIFIERS = {"default": DEFAULT_PLANS_IDENTIFIER, **{n: pid for n, (_, pid) in NNUNET_PRESETS.items()}}
# PlanVariant fields that derive a plan from nnU-Net's default one (not combinable with `planner`)
_DERIVATION_FIELDS = ("base_features", "max_features", "feature_scale", "n_conv_per_stage", "n_downsamplings",
                      "patch_size_zyx", "spacing_zyx", "batch_size")
SUMMARY_NAME = "flare_plans_summary.json"
_COMPLETE_MARKER = ".flare_preprocessed_{}.json"   # beside (not in) the data folder: nnU-Net infers
# the dataset class from the file endings it finds inside


@dataclass(frozen=True)
class PlanVariant:
    """One plan recipe. `None` fields keep what nnU-Net planned for the dataset.

    All geometry is (z, y, x). `feature_scale` multiplies the base plan's features at every stage
    (used by `lowfootprint`); `base_features`/`max_features` instead set features to
    min(max_features, base_features * 2**stage). `planner`: the name of an nnU-Net experiment
    planner class (e.g. "nnUNetPlannerResEncM"); the variant is then that planner's plans as nnU-Net
    makes them (no derivation fields allowed).

    Plans identifier: `nnUNetPlans_<name>`, except `default` (`nnUNetPlans`) and nnU-Net's presets
    (NNUNET_PRESETS, e.g. `resenc_m` -> `nnUNetResEncUNetMPlans`, nnU-Net's own name).
    """
    name: str
    description: str = ""
    base_features: int | None = None
    max_features: int | None = None
    feature_scale: float | None = None
    n_conv_per_stage: int | None = None          # encoder and decoder
    n_downsamplings: int | None = None           # number of stages - 1
    patch_size_zyx: tuple[int, int, int] | None = None
    spacing_zyx: tuple[float, float, float] | None = None
    batch_size: int | None = None
    reference: str = ""                          # where the recipe comes from
    reported_parameters: float | None = None     # parameter count the paper reports
    planner: str | None = None                   # nnU-Net experiment planner class that plans this variant

    def __post_init__(self):
        if self.planner is not None:
            if not isinstance(self.planner, str) or not self.planner:
                raise ValueError(f"plan variant {self.name!r}: planner must be the name of an nnU-Net planner class")
            derived = [f for f in _DERIVATION_FIELDS if getattr(self, f) is not None]
            if derived:
                raise ValueError(f"plan variant {self.name!r}: planner {self.planner} plans the whole network; "
                                 f"{derived} cannot be combined with it")

    @property
    def plans_identifier(self) -> str:
        return _FIXED_IDENTIFIERS.get(self.name, f"{DEFAULT_PLANS_IDENTIFIER}_{self.name}")

    @property
    def is_default(self) -> bool:
        return self.name == "default"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["plans_identifier"] = self.plans_identifier
        return d


_TABLE1 = ("Revisiting nnU-Net for Iterative Pseudo Labeling and Efficient Sliding Window Inference "
           "(FLARE22 winner), Table 1")
_NOISY = "noisy-student FLARE22 paper: low-footprint nnU-Net (half the base features)"
_REVISITED = ("nnU-Net Revisited (Isensee et al., MICCAI 2024): residual-encoder presets, nnU-Net's "
              "recommended default")

PLAN_VARIANTS: dict[str, PlanVariant] = {v.name: v for v in (
    PlanVariant("default", "nnU-Net v2 3d_fullres as planned", reference="nnU-Net v2 ExperimentPlanner"),
    PlanVariant("accurate", "big teacher network", base_features=32, max_features=512, n_conv_per_stage=3,
                n_downsamplings=5, patch_size_zyx=(48, 224, 224), spacing_zyx=(2.5, 0.8, 0.8), batch_size=2,
                reference=_TABLE1, reported_parameters=82e6),
    PlanVariant("efficient", "small student network", base_features=16, max_features=256, n_conv_per_stage=2,
                n_downsamplings=4, patch_size_zyx=(32, 128, 192), spacing_zyx=(4.0, 1.2, 1.2), batch_size=2,
                reference=_TABLE1, reported_parameters=5.4e6),
    PlanVariant("lowfootprint", "nnU-Net default with half the features per stage", feature_scale=0.5,
                reference=_NOISY),
    PlanVariant("accurate_demo", "accurate recipe at CPU demo scale", base_features=16, max_features=256,
                n_conv_per_stage=3, n_downsamplings=4, patch_size_zyx=(32, 64, 64), spacing_zyx=(3.0, 2.0, 2.0),
                batch_size=2, reference=_TABLE1 + ", scaled down"),
    PlanVariant("efficient_demo", "efficient recipe at CPU demo scale", base_features=8, max_features=128,
                n_conv_per_stage=2, n_downsamplings=3, patch_size_zyx=(24, 48, 64), spacing_zyx=(4.0, 3.0, 3.0),
                batch_size=2, reference=_TABLE1 + ", scaled down"),
    PlanVariant("resenc_m", "nnU-Net ResEnc M (residual encoder, ~8 GB GPU target)",
                planner=NNUNET_PRESETS["resenc_m"][0], reference=_REVISITED),
    PlanVariant("resenc_l", "nnU-Net ResEnc L (residual encoder, ~24 GB GPU target)",
                planner=NNUNET_PRESETS["resenc_l"][0], reference=_REVISITED),
    PlanVariant("resenc_xl", "nnU-Net ResEnc XL (residual encoder, ~40 GB GPU target)",
                planner=NNUNET_PRESETS["resenc_xl"][0], reference=_REVISITED),
)}


def get_variant(variant: str | PlanVariant) -> PlanVariant:
    if isinstance(variant, PlanVariant):
        return variant
    if variant not in PLAN_VARIANTS:
        raise FlareInputError(None, f"unknown plan variant {variant!r}; known: {sorted(PLAN_VARIANTS)}")
    return PLAN_VARIANTS[variant]


def plans_identifier(variant: str | PlanVariant) -> str:
    return get_variant(variant).plans_identifier


def resolve_plans_identifier(name: str, plan_variants: Iterable[str | PlanVariant | Mapping[str, Any]] = ()) -> str:
    """The plans identifier that `name` stands for: a plan variant's (one of `plan_variants` — names,
    PlanVariants or dicts of PlanVariant fields, as in params' teacher.plan_variants — or of
    PLAN_VARIANTS); anything else is a plans identifier already ("nnUNetPlans_efficient_demo")."""
    own = {v.name if isinstance(v, PlanVariant) else v.get("name") if isinstance(v, Mapping) else v
           for v in plan_variants}
    return PlanVariant(name=name).plans_identifier if name in own or name in PLAN_VARIANTS else name


# ----------------------------------------------------------------------------------------------
# Topology and plan derivation (pure: no files)
# ----------------------------------------------------------------------------------------------

def plan_topology(spacing: Sequence[float], patch_size: Sequence[int], n_downsamplings: int | None = None,
                  where: str = "plan") -> tuple[list[list[int]], list[list[int]]]:
    """(strides, kernel_sizes) per stage from nnU-Net's `get_pool_and_conv_props`.

    `spacing`/`patch_size` are in the plans' axis order. With `n_downsamplings` the topology is cut
    to that many poolings (FlareInputError if the patch cannot be pooled that often); the patch must
    be divisible by the total stride per axis.
    """
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    spacing = [float(s) for s in spacing]
    patch_size = [int(p) for p in patch_size]
    if len(spacing) != len(patch_size) or any(s <= 0 for s in spacing) or any(p <= 0 for p in patch_size):
        raise FlareInputError(None, f"{where}: invalid spacing {spacing} / patch size {patch_size}")
    _, strides, kernels, _, _ = get_pool_and_conv_props(spacing, patch_size, MIN_FEATURE_MAP_EDGE, 999999)
    strides = [list(map(int, s)) for s in strides]
    kernels = [list(map(int, k)) for k in kernels]
    if n_downsamplings is not None:
        available = len(strides) - 1
        if n_downsamplings > available:
            raise FlareInputError(None, f"{where}: patch {patch_size} at spacing {spacing} allows only {available} "
                                        f"downsamplings (feature maps must keep >= {MIN_FEATURE_MAP_EDGE} voxels), "
                                        f"{n_downsamplings} requested")
        strides = strides[:n_downsamplings + 1]
        kernels = kernels[:n_downsamplings + 1]
    total = np.prod(np.array(strides), axis=0)
    bad = [i for i, (p, t) in enumerate(zip(patch_size, total)) if p % int(t)]
    if bad:
        suggestion = [int(int(t) * max(1, round(p / int(t)))) for p, t in zip(patch_size, total)]
        raise FlareInputError(None, f"{where}: patch {patch_size} is not divisible by the total stride "
                                    f"{[int(t) for t in total]} per axis (e.g. use {suggestion})")
    return strides, kernels


def _features(n_stages: int, base: int, cap: int) -> list[int]:
    return [int(min(cap, base * 2 ** i)) for i in range(n_stages)]


# Which axis of the reader's arrays holds z, y, x (index into array axes). nnU-Net's nibabel
# readers transpose to SimpleITK's (z, y, x) order themselves (checked by verify_preprocessed).
_ARRAY_AXIS_OF_ZYX = {
    "SimpleITKIO": (0, 1, 2),
    "SimpleITKIOWithReorient": (0, 1, 2),
    "NibabelIO": (0, 1, 2),
    "NibabelIOWithReorient": (0, 1, 2),
    "Tiff3DIO": (0, 1, 2),
}


def _zyx_transpose(reader_name: str) -> list[int]:
    if reader_name not in _ARRAY_AXIS_OF_ZYX:
        raise FlareInputError(None, f"image reader {reader_name!r}: unknown array axis order; explicit (z, y, x) "
                                    f"spacing needs one of {sorted(_ARRAY_AXIS_OF_ZYX)}")
    return list(_ARRAY_AXIS_OF_ZYX[reader_name])


def make_plan_variant(base_plans: Mapping[str, Any], variant: str | PlanVariant,
                      fingerprint: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A new plans dict (3d_fullres only) for `variant`, derived from nnU-Net's `base_plans`.

    `fingerprint` (nnU-Net's dataset_fingerprint.json) lets the median image size be recomputed for
    the new spacing; without it the base's median size is rescaled.
    """
    v = get_variant(variant)
    if v.planner is not None:
        raise FlareInputError(None, f"plan variant {v.name!r} is planned by nnU-Net's {v.planner}, not derived from "
                                    "base plans: use plan_nnunet_preset (no data) or plan_and_preprocess")
    base = copy.deepcopy(dict(base_plans))
    if CONFIGURATION not in base.get("configurations", {}):
        raise FlareInputError(None, f"base plans have no {CONFIGURATION} configuration "
                                    f"(have {sorted(base.get('configurations', {}))})")
    if v.is_default:
        base["plans_name"] = v.plans_identifier
        return base
    pid = v.plans_identifier
    cfg = copy.deepcopy(base["configurations"][CONFIGURATION])
    if "inherits_from" in cfg:
        raise FlareInputError(None, f"base {CONFIGURATION} inherits from another configuration; not supported")
    for k in ("next_stage", "previous_stage"):
        cfg.pop(k, None)
    arch = cfg["architecture"]["arch_kwargs"]
    if not cfg["architecture"]["network_class_name"].endswith("PlainConvUNet"):
        raise FlareInputError(None, f"base plans use {cfg['architecture']['network_class_name']}; the FLARE variants "
                                    f"are defined for nnU-Net's PlainConvUNet")

    transpose_forward = list(base["transpose_forward"])
    spacing = [float(s) for s in cfg["spacing"]]
    patch = [int(p) for p in cfg["patch_size"]]
    old_spacing = list(spacing)
    old_transpose = list(transpose_forward)
    if v.spacing_zyx is not None or v.patch_size_zyx is not None:
        # explicit (z, y, x) geometry: store preprocessed arrays as (z, y, x)
        transpose_forward = _zyx_transpose(base["image_reader_writer"])
        if v.spacing_zyx is not None:
            spacing = [float(s) for s in v.spacing_zyx]
        else:  # keep the base spacing, re-ordered for the new transpose
            arr = np.empty(3)
            arr[old_transpose] = old_spacing
            spacing = [float(s) for s in arr[transpose_forward]]
        if v.patch_size_zyx is not None:
            patch = [int(p) for p in v.patch_size_zyx]
        else:
            arr = np.empty(3, dtype=int)
            arr[old_transpose] = patch
            patch = [int(p) for p in arr[transpose_forward]]
    transpose_backward = [int(i) for i in np.argsort(transpose_forward)]

    n_stages_old = int(arch["n_stages"])
    if v.n_downsamplings is not None or v.spacing_zyx is not None or v.patch_size_zyx is not None:
        n_down = v.n_downsamplings if v.n_downsamplings is not None else None
        strides, kernels = plan_topology(spacing, patch, n_down, where=f"plan variant {v.name!r}")
    else:
        strides = [list(map(int, s)) for s in arch["strides"]]
        kernels = [list(map(int, k)) for k in arch["kernel_sizes"]]
    n_stages = len(strides)

    old_features = [int(f) for f in arch["features_per_stage"]]
    if v.base_features is not None:
        cap = v.max_features if v.max_features is not None else max(old_features)
        features = _features(n_stages, v.base_features, cap)
    elif n_stages == n_stages_old:
        features = list(old_features)
    else:
        features = _features(n_stages, old_features[0], max(old_features))
    if v.feature_scale is not None:
        features = [max(1, int(round(f * v.feature_scale))) for f in features]

    if v.n_conv_per_stage is not None:
        n_conv_enc = [int(v.n_conv_per_stage)] * n_stages
        n_conv_dec = [int(v.n_conv_per_stage)] * (n_stages - 1)
    else:
        enc_old, dec_old = list(arch["n_conv_per_stage"]), list(arch["n_conv_per_stage_decoder"])
        n_conv_enc = (enc_old + [enc_old[-1]] * n_stages)[:n_stages]
        n_conv_dec = (dec_old + [dec_old[-1]] * n_stages)[:n_stages - 1]

    arch.update({"n_stages": n_stages, "features_per_stage": features, "kernel_sizes": kernels,
                 "strides": strides, "n_conv_per_stage": n_conv_enc, "n_conv_per_stage_decoder": n_conv_dec})

    # median image size at the new spacing, in the new axis order
    median = _median_size(base, cfg, fingerprint, spacing, transpose_forward, old_spacing, old_transpose)

    cfg.update({
        "data_identifier": f"{pid}_{CONFIGURATION}",
        "spacing": spacing,
        "patch_size": patch,
        "median_image_size_in_voxels": median,
        "batch_size": int(v.batch_size) if v.batch_size is not None else int(cfg["batch_size"]),
    })
    out = {k: val for k, val in base.items() if k != "configurations"}
    out["plans_name"] = pid
    out["transpose_forward"] = [int(i) for i in transpose_forward]
    out["transpose_backward"] = transpose_backward
    if transpose_forward != old_transpose:
        for key in ("original_median_spacing_after_transp", "original_median_shape_after_transp"):
            if key in out:
                arr = np.empty(3)
                arr[old_transpose] = out[key]
                vals = arr[transpose_forward]
                out[key] = [float(x) for x in vals] if "spacing" in key else [int(round(x)) for x in vals]
    out["configurations"] = {CONFIGURATION: cfg}
    out["flare_variant"] = {**v.to_dict(), "derived_from": base.get("plans_name", DEFAULT_PLANS_IDENTIFIER)}
    return out


def _median_size(base, cfg, fingerprint, spacing, transpose_forward, old_spacing, old_transpose) -> list[float]:
    if fingerprint is not None and fingerprint.get("spacings"):
        shapes = np.array(fingerprint["shapes_after_crop"], dtype=float)
        spacings = np.array(fingerprint["spacings"], dtype=float)
        target = np.empty(3)
        target[transpose_forward] = spacing          # target spacing in array order
        new = np.round(shapes * spacings / target[None])
        return [float(x) for x in np.median(new, 0)[transpose_forward]]
    med = np.array(cfg.get("median_image_size_in_voxels", [1, 1, 1]), dtype=float)
    arr_med = np.empty(3)
    arr_med[old_transpose] = med * np.array(old_spacing)         # physical size, array order
    return [float(x) for x in np.round(arr_med[transpose_forward] / np.array(spacing))]


_SKELETON_CT_INTENSITIES = {"0": {
    "max": 3071.0, "mean": 100.0, "median": 100.0, "min": -1024.0,
    "percentile_00_5": -1000.0, "percentile_99_5": 400.0, "std": 100.0}}


def skeleton_base_plans(spacing_zyx: Sequence[float] = (2.5, 0.8, 0.8),
                        patch_size_zyx: Sequence[int] = (48, 192, 192),
                        median_shape_zyx: Sequence[int] = (100, 512, 512),
                        dataset_name: str = "Dataset022_FLARE22", batch_size: int = 2) -> dict[str, Any]:
    """A base plans dict shaped like nnU-Net's planner output for FLARE22 CT, built without data.

    Good for deriving variants and counting parameters; NOT for preprocessing (its intensity
    statistics are placeholders). Real plans come from `plan_and_preprocess`.
    """
    strides, kernels = plan_topology(spacing_zyx, patch_size_zyx, None, where="skeleton plans")
    n = len(strides)
    cfg = {
        "data_identifier": f"{DEFAULT_PLANS_IDENTIFIER}_{CONFIGURATION}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": batch_size,
        "patch_size": [int(p) for p in patch_size_zyx],
        "median_image_size_in_voxels": [float(m) for m in median_shape_zyx],
        "spacing": [float(s) for s in spacing_zyx],
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n,
                "features_per_stage": _features(n, 32, 320),
                "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": kernels,
                "strides": strides,
                "n_conv_per_stage": [2] * n,
                "n_conv_per_stage_decoder": [2] * (n - 1),
                "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": False,
    }
    return {
        "dataset_name": dataset_name,
        "plans_name": DEFAULT_PLANS_IDENTIFIER,
        "original_median_spacing_after_transp": [float(s) for s in spacing_zyx],
        "original_median_shape_after_transp": [int(m) for m in median_shape_zyx],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: cfg},
        "experiment_planner_used": "flare_utils.planning.plans.skeleton_base_plans",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": copy.deepcopy(_SKELETON_CT_INTENSITIES),
    }


def skeleton_fingerprint(spacing_zyx: Sequence[float] = (2.5, 0.8, 0.8),
                         median_shape_zyx: Sequence[int] = (100, 512, 512), n_cases: int = 4) -> dict[str, Any]:
    """An nnU-Net dataset fingerprint (dataset_fingerprint.json) of `n_cases` identical CT scans,
    made without data: what nnU-Net's planners need to plan a FLARE22-shaped dataset
    (`plan_nnunet_preset`). Spacing and shape in SimpleITK's (z, y, x) array order."""
    return {
        "spacings": [[float(s) for s in spacing_zyx] for _ in range(n_cases)],
        "shapes_after_crop": [[int(x) for x in median_shape_zyx] for _ in range(n_cases)],
        "foreground_intensity_properties_per_channel": copy.deepcopy(_SKELETON_CT_INTENSITIES),
        "median_relative_size_after_cropping": 1.0,
    }


def nnunet_planner_class(name: str) -> type:
    """nnU-Net's experiment planner class `name`, found the way `nnUNetv2_plan_experiment -pl` finds it."""
    import nnunetv2
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"), name,
                                      current_module="nnunetv2.experiment_planning")
    if cls is None or not (isinstance(cls, type) and issubclass(cls, ExperimentPlanner)):
        raise FlareInputError(None, f"nnU-Net has no experiment planner class {name!r} (e.g. "
                                    f"{sorted(p for p, _ in NNUNET_PRESETS.values())})")
    return cls


def _run_nnunet_planner(dataset_name: str, v: PlanVariant, quiet: bool, log_file: Path | None) -> dict[str, Any]:
    """nnU-Net's planner `v.planner` on a dataset of the nnU-Net folders in force (its fingerprint must
    exist); writes and returns `<preprocessed>/<plans identifier>.json`. The planner's own GPU memory
    target is kept (ResEnc M/L/XL: 8/24/40 GB)."""
    import torch
    cls = nnunet_planner_class(v.planner)
    threads = torch.get_num_threads()
    n_proc_da = os.environ.get("nnUNet_n_proc_DA")       # the VRAM estimate sets torch's threads to it (0 fails)
    try:
        with environment(nnUNet_n_proc_DA="1" if n_proc_da is not None and int(n_proc_da) < 1 else n_proc_da), \
                _quiet(quiet, log_file):
            planner = cls(dataset_name, plans_name=v.plans_identifier)
            planner.plan_experiment()
    finally:
        torch.set_num_threads(threads)        # nnU-Net's VRAM estimate changes torch's thread count
    f = nnunet_folders().preprocessed / dataset_name / f"{v.plans_identifier}.json"
    return json.loads(f.read_text())


def plan_nnunet_preset(variant: str | PlanVariant, fingerprint: Mapping[str, Any] | None = None,
                       dataset_json: Mapping[str, Any] | None = None,
                       dataset_name: str = "Dataset022_FLARE22", reader: str = "SimpleITKIO") -> dict[str, Any]:
    """The plans nnU-Net's planner of `variant` (e.g. "resenc_m") makes for a dataset known only by its
    `fingerprint` (default: `skeleton_fingerprint()`, FLARE22-shaped) and `dataset_json` (default
    FLARE22's labels), without any image: the planner runs on a scratch copy of nnU-Net's folders.
    Good for parameter counts and geometry (`count_parameters`, `describe_plans`); real plans come from
    `plan_and_preprocess`."""
    import tempfile
    from flare_utils.layout import RunLayout

    v = get_variant(variant)
    if v.planner is None:
        raise FlareInputError(None, f"plan variant {v.name!r} is not planned by an nnU-Net planner class "
                                    "(use make_plan_variant(skeleton_base_plans(), ...))")
    fp = dict(fingerprint) if fingerprint is not None else skeleton_fingerprint()
    n = len(fp["spacings"])
    dj = dict(dataset_json) if dataset_json is not None else flare22_dataset_json(num_training=n)
    ending = dj.get("file_ending", ".nii.gz")
    # the planner needs a file list, not files: name n cases, and name the reader so none is opened
    dj.update(numTraining=n, overwrite_image_reader_writer=reader, dataset={
        f"case_{i:04d}": {"images": [f"imagesTr/case_{i:04d}_0000{ending}"], "label": f"labelsTr/case_{i:04d}{ending}"}
        for i in range(n)})
    with tempfile.TemporaryDirectory(prefix="flare_plan_preset_") as tmp, RunLayout(tmp).activated() as run:
        (run.nnunet_raw / dataset_name).mkdir(parents=True)
        (run.nnunet_preprocessed / dataset_name).mkdir(parents=True)
        (run.nnunet_raw / dataset_name / "dataset.json").write_text(json.dumps(dj))
        (run.nnunet_preprocessed / dataset_name / "dataset_fingerprint.json").write_text(json.dumps(fp))
        plans = _run_nnunet_planner(dataset_name, v, quiet=True, log_file=None)
    return plans


def flare22_dataset_json(file_ending: str = ".nii.gz", num_training: int = 50) -> dict[str, Any]:
    """An nnU-Net v2 dataset.json for FLARE22 (1 CT channel, background + 13 organs)."""
    return {"channel_names": {"0": "CT"}, "labels": dataset_json_labels(), "numTraining": num_training,
            "file_ending": file_ending}


def load_plans(plans: str | Path | Mapping[str, Any], dataset: int | str | None = None) -> dict[str, Any]:
    """A plans dict from a dict, a plans JSON path, or a plans identifier (+ dataset id/name)."""
    if isinstance(plans, Mapping):
        return copy.deepcopy(dict(plans))
    p = Path(plans)
    if p.suffix == ".json" or p.exists():
        if not p.is_file():
            raise FlareInputError(p, "plans file not found")
        return json.loads(p.read_text())
    if dataset is None:
        raise FlareInputError(None, f"plans identifier {plans!r} needs a dataset id or name to be found")
    f = nnunet_folders().preprocessed_dataset(dataset) / f"{plans}.json"
    if not f.is_file():
        if (plans in PLAN_VARIANTS or plans.startswith(DEFAULT_PLANS_IDENTIFIER)       # a variant's plans, not made yet
                or plans in _FIXED_IDENTIFIERS.values()):
            raise FlareInputError(f, "plans file not found (run plan_and_preprocess first)")
        made = sorted(p.stem for p in f.parent.glob("nnUNet*Plans*.json"))
        raise FlareInputError(f, f"unknown plans {plans!r}: neither a plan variant (known: {sorted(PLAN_VARIANTS)}; "
                                 f"a variant's plans are {DEFAULT_PLANS_IDENTIFIER}_<variant>) nor a plans file of "
                                 "this dataset" + (f" (it has: {made})" if made else ""))
    return json.loads(f.read_text())


def count_parameters(plans: str | Path | Mapping[str, Any], dataset_json: Mapping[str, Any] | str | Path | None = None,
                     configuration: str = CONFIGURATION, dataset: int | str | None = None,
                     trainer: str | type | None = None) -> int:
    """Trainable parameters of the network nnU-Net builds from these plans.

    `plans`: dict, plans JSON path or identifier (then `dataset` names the dataset).
    `dataset_json`: dict or path; default FLARE22 (1 input channel, 14 outputs). The network is
    built with the trainer's `build_network_architecture` (default: nnU-Net's `nnUNetTrainer`).
    """
    import torch
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_d = load_plans(plans, dataset)
    if dataset_json is None:
        dj = flare22_dataset_json()
    elif isinstance(dataset_json, Mapping):
        dj = dict(dataset_json)
    else:
        dj = json.loads(Path(dataset_json).read_text())
    pm = PlansManager(plans_d)
    cm = pm.get_configuration(configuration)
    if trainer is None:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as trainer_cls
    elif isinstance(trainer, str):
        from flare_utils.training.registry import find_trainer
        trainer_cls = find_trainer(trainer)
    else:
        trainer_cls = trainer
    n_in = determine_num_input_channels(pm, cm, dj)
    n_out = pm.get_label_manager(dj).num_segmentation_heads
    threads = torch.get_num_threads()
    try:
        try:        # on the meta device: shapes only, no memory and no weight init (100M+ networks in 0.3 s)
            with torch.device("meta"):
                net = trainer_cls.build_network_architecture(pm, cm, n_in, n_out, True)
        except Exception:       # a trainer whose network cannot be built there
            net = trainer_cls.build_network_architecture(pm, cm, n_in, n_out, True)
    finally:
        torch.set_num_threads(threads)
    return int(sum(p.numel() for p in net.parameters() if p.requires_grad))


def describe_plans(plans: str | Path | Mapping[str, Any], configuration: str = CONFIGURATION,
                   dataset: int | str | None = None, with_parameters: bool = True,
                   dataset_json: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The figures of one plan (patch, spacing, stages, features, convs, strides, parameters).

    `network` is the class name (PlainConvUNet, ResidualEncoderUNet); for a ResidualEncoderUNet
    `n_blocks_per_stage` are its encoder's residual blocks and `n_conv_per_stage` their convolutions
    (two per block, the stem not counted); for a PlainConvUNet `n_blocks_per_stage` is None."""
    p = load_plans(plans, dataset)
    cfg = p["configurations"][configuration]
    a = cfg["architecture"]["arch_kwargs"]
    strides = np.array(a["strides"])
    if "n_blocks_per_stage" in a:       # ResidualEncoderUNet: residual blocks of two convolutions each
        blocks = [int(x) for x in a["n_blocks_per_stage"]]
        convs = [2 * b for b in blocks]
    else:
        blocks, convs = None, [int(x) for x in a["n_conv_per_stage"]]
    d = {
        "plans_identifier": p["plans_name"],
        "network": cfg["architecture"]["network_class_name"].rsplit(".", 1)[-1],
        "patch_size": [int(x) for x in cfg["patch_size"]],
        "spacing": [float(x) for x in cfg["spacing"]],
        "transpose_forward": p["transpose_forward"],
        "axis_order": _axis_order(p),
        "batch_size": int(cfg["batch_size"]),
        "n_stages": int(a["n_stages"]),
        "n_downsamplings": int(a["n_stages"]) - 1,
        "features_per_stage": [int(x) for x in a["features_per_stage"]],
        "n_conv_per_stage": convs,
        "n_blocks_per_stage": blocks,
        "n_conv_per_stage_decoder": [int(x) for x in a["n_conv_per_stage_decoder"]],
        "strides": [[int(y) for y in s] for s in a["strides"]],
        "kernel_sizes": [[int(y) for y in k] for k in a["kernel_sizes"]],
        "total_stride": [int(x) for x in np.prod(strides, axis=0)],
        "bottleneck_size": [int(x) for x in np.array(cfg["patch_size"]) // np.prod(strides, axis=0)],
    }
    if with_parameters:
        d["parameters"] = count_parameters(p, dataset_json, configuration)
    return d


def _axis_order(plans: Mapping[str, Any]) -> str:
    """'zyx' etc.: the physical meaning of the preprocessed array axes (for known readers)."""
    zyx = _ARRAY_AXIS_OF_ZYX.get(plans.get("image_reader_writer", ""))
    if zyx is None:
        return "unknown"
    name_of_array_axis = {a: "zyx"[i] for i, a in enumerate(zyx)}
    return "".join(name_of_array_axis[a] for a in plans["transpose_forward"])


# ----------------------------------------------------------------------------------------------
# Planning and preprocessing with nnU-Net (files)
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet(enabled: bool, log_file: Path | None):
    """Send nnU-Net's chatter to a log file (or nowhere) when `enabled`."""
    if not enabled:
        yield
        return
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(log_file, "a") as f:
                f.write(buf.getvalue())


def _json_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _fingerprint_is_current(pre: Path, raw: Path) -> bool:
    fp, dj = pre / "dataset_fingerprint.json", raw / "dataset.json"
    if not fp.is_file():
        return False
    try:
        n = json.loads(dj.read_text()).get("numTraining")
        n_fp = len(json.loads(fp.read_text()).get("spacings", []))
    except (OSError, ValueError):
        return False
    newest_raw = max([dj.stat().st_mtime] + [p.stat().st_mtime for d in ("imagesTr", "labelsTr")
                                             for p in [raw / d] if p.exists()])
    return n == n_fp and fp.stat().st_mtime >= newest_raw


def _preprocessing_hash(plans: Mapping[str, Any]) -> str:
    """Hash of what nnU-Net's DefaultPreprocessor reads from a plan (not the network, not the patch,
    which only sets the storage chunks): plans that agree on it share preprocessed data, as nnU-Net's
    ResEnc plans share `nnUNetPlans_3d_fullres` with the default plans."""
    cfg = plans["configurations"][CONFIGURATION]
    keys = ("data_identifier", "preprocessor_name", "spacing", "normalization_schemes", "use_mask_for_norm",
            "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_seg", "resampling_fn_seg_kwargs")
    return _json_hash({"transpose_forward": plans.get("transpose_forward"),
                       "image_reader_writer": plans.get("image_reader_writer"),
                       "intensities": plans.get("foreground_intensity_properties_per_channel"),
                       **{k: cfg.get(k) for k in keys}})


def _preprocessed_complete(pre: Path, plans: Mapping[str, Any], n_cases: int) -> bool:
    cfg = plans["configurations"][CONFIGURATION]
    folder = pre / cfg["data_identifier"]
    marker = pre / _COMPLETE_MARKER.format(cfg["data_identifier"])
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return False
    same = (info.get("preprocessing_hash") == _preprocessing_hash(plans) if "preprocessing_hash" in info
            else info.get("plans_hash") == _json_hash(plans))          # markers written before the hash existed
    return same and info.get("n_cases") == n_cases and len(list(folder.glob("*.pkl"))) == n_cases


def plan_and_preprocess(dataset_id: int | str, variants: Iterable[str | PlanVariant] = ("default",),
                        processes: int = 1, verify: bool = True, overwrite: bool = False,
                        gpu_memory_target_in_gb: float = 8, quiet: bool = True,
                        run_dir: str | Path | None = None) -> dict[str, str]:
    """Plan with nnU-Net v2 and preprocess one plans identifier per variant.

    Runs in-process: nnU-Net's fingerprint extraction (dataset integrity check when `verify`),
    its default `ExperimentPlanner` (writes `nnUNetPlans.json`), then for each variant a derived
    plans file (or, for a variant with a `planner` such as `resenc_m`, that nnU-Net planner's own
    plans file) and nnU-Net's preprocessing of its 3d_fullres configuration. Plans whose
    preprocessing is the same share one data folder, as nnU-Net intends (the ResEnc presets use
    `nnUNetPlans_3d_fullres`): it is preprocessed once. Already complete
    outputs (same plans, all cases) are kept unless `overwrite`. With `verify` the preprocessed
    geometry is checked (`verify_preprocessed`). nnU-Net's console output goes to
    `<preprocessed>/flare_plan_and_preprocess.log` when `quiet`.

    Returns {variant name: plans identifier}. A summary of every plan's figures is written to
    `<preprocessed>/flare_plans_summary.json`. `run_dir`: use that run's nnU-Net folders.
    Planning and preprocessing use spawned worker processes: call it under
    `if __name__ == "__main__":` in scripts (notebooks need nothing).
    """
    folders = nnunet_folders(run_dir)
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                       preprocess_dataset)

    vs = [get_variant(v) for v in variants]
    if not vs:
        raise FlareInputError(None, "no plan variants requested")
    names = [v.name for v in vs]
    if len(set(names)) != len(names):
        raise FlareInputError(None, f"plan variants requested twice: {names}")
    processes = max(1, int(processes))
    dataset_name = folders.dataset_name(dataset_id)
    dataset_num = int(dataset_name[len("Dataset"):len("Dataset") + 3])
    raw = folders.raw / dataset_name
    pre = folders.preprocessed / dataset_name
    pre.mkdir(parents=True, exist_ok=True)
    log = pre / "flare_plan_and_preprocess.log"
    dataset_json = json.loads((raw / "dataset.json").read_text())
    n_cases = int(dataset_json["numTraining"])

    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0
    n_proc_da = os.environ.get("nnUNet_n_proc_DA")
    da_env = str(processes) if n_proc_da is not None and int(n_proc_da) < 1 else n_proc_da
    import torch
    threads = torch.get_num_threads()
    try:
        with environment(nnUNet_n_proc_DA=da_env), _quiet(quiet, log):
            clean = overwrite or not _fingerprint_is_current(pre, raw)
            fingerprint = extract_fingerprint_dataset(dataset_num, num_processes=processes,
                                                      check_dataset_integrity=verify, clean=clean,
                                                      verbose=False, show_progress_bar=not quiet)
            planner = ExperimentPlanner(dataset_name, gpu_memory_target_in_gb=gpu_memory_target_in_gb,
                                        plans_name=DEFAULT_PLANS_IDENTIFIER)
            base = planner.plan_experiment()
            base = json.loads((pre / f"{DEFAULT_PLANS_IDENTIFIER}.json").read_text())  # JSON-clean copy

            out: dict[str, str] = {}
            for v in vs:
                pid = v.plans_identifier
                if v.planner is not None:          # nnU-Net's own planner class (ResEnc presets)
                    plans = _run_nnunet_planner(dataset_name, v, quiet=False, log_file=None)   # (output: as above)
                elif not v.is_default:
                    plans = make_plan_variant(base, v, fingerprint)
                    _write_json(pre / f"{pid}.json", plans)
                else:
                    plans = base
                if overwrite or not _preprocessed_complete(pre, plans, n_cases):
                    preprocess_dataset(dataset_num, pid, configurations=(CONFIGURATION,),
                                       num_processes=[processes], verbose=False, show_progress_bar=not quiet)
                    data_id = plans["configurations"][CONFIGURATION]["data_identifier"]
                    _write_json(pre / _COMPLETE_MARKER.format(data_id), {
                        "plans_hash": _json_hash(plans), "preprocessing_hash": _preprocessing_hash(plans),
                        "n_cases": n_cases})
                out[v.name] = pid
    finally:
        torch.set_num_threads(threads)

    summary_path = pre / SUMMARY_NAME
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    for v in vs:
        pid = out[v.name]
        d = describe_plans(pre / f"{pid}.json", dataset_json=dataset_json)
        if verify:
            d["verification"] = verify_preprocessed(dataset_name, pid, variant=v)
        summary[v.name] = {"variant": v.to_dict(), **d}
    _write_json(summary_path, summary)
    return out


def _write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj, indent=2)


def verify_preprocessed(dataset: int | str, plans_id: str, variant: str | PlanVariant | None = None,
                        n_check: int = 2) -> dict[str, Any]:
    """Check a preprocessed plans identifier; FlareInputError on any inconsistency.

    * the plan's patch is divisible by its total stride, strides/kernels are one per stage;
    * for a variant with explicit geometry: stored spacing/patch equal the requested (z, y, x);
    * on `n_check` preprocessed cases: the reader's spacing mapped to (z, y, x) equals SimpleITK's
      reading of the raw image (so "z" is the slice axis), and the physical extent of the
      preprocessed array per axis equals that of the cropped raw image (within one voxel).
    """
    import SimpleITK as sitk
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folders = nnunet_folders()
    name = folders.dataset_name(dataset)
    pre, raw = folders.preprocessed / name, folders.raw / name
    plans = json.loads((pre / f"{plans_id}.json").read_text())
    cfg = plans["configurations"][CONFIGURATION]
    a = cfg["architecture"]["arch_kwargs"]
    where = pre / f"{plans_id}.json"
    total = np.prod(np.array(a["strides"]), axis=0)
    if any(int(p) % int(t) for p, t in zip(cfg["patch_size"], total)):
        raise FlareInputError(where, f"patch {cfg['patch_size']} not divisible by total stride {total.tolist()}")
    if not (len(a["strides"]) == len(a["kernel_sizes"]) == a["n_stages"] == len(a["features_per_stage"])):
        raise FlareInputError(where, "strides/kernels/features do not have one entry per stage")
    v = get_variant(variant) if variant is not None else None
    if v is not None and v.spacing_zyx is not None:
        if not np.allclose(cfg["spacing"], v.spacing_zyx) or _axis_order(plans) != "zyx":
            raise FlareInputError(where, f"spacing {cfg['spacing']} ({_axis_order(plans)}) is not the requested "
                                         f"(z, y, x) {list(v.spacing_zyx)}")
    if v is not None and v.patch_size_zyx is not None and list(cfg["patch_size"]) != list(v.patch_size_zyx):
        raise FlareInputError(where, f"patch {cfg['patch_size']} is not the requested {list(v.patch_size_zyx)}")

    folder = pre / cfg["data_identifier"]
    ds_cls = infer_dataset_class(str(folder))
    ids = sorted(ds_cls.get_identifiers(str(folder)))
    if not ids:
        raise FlareInputError(folder, "no preprocessed cases")
    dj = json.loads((raw / "dataset.json").read_text())
    tf = list(plans["transpose_forward"])
    zyx_axes = _ARRAY_AXIS_OF_ZYX.get(plans["image_reader_writer"])
    checked = []
    ds = ds_cls(str(folder), ids[:n_check])
    for cid in ids[:n_check]:
        data, seg, _, props = ds.load_case(cid)
        shape = np.array(data.shape[1:], dtype=float)
        sp_arr = np.array(props["spacing"], dtype=float)                       # reader's array order
        crop_shape = np.array(props["shape_after_cropping_and_before_resampling"], dtype=float)  # transposed
        extent_pre = shape * np.array(cfg["spacing"])
        extent_raw = crop_shape * sp_arr[tf]
        if not np.all(np.abs(extent_pre - extent_raw) <= np.array(cfg["spacing"]) + 1e-3):
            raise FlareInputError(folder / cid, f"preprocessed extent {extent_pre.round(1).tolist()} mm does not match "
                                                f"the raw image's {extent_raw.round(1).tolist()} mm")
        if zyx_axes is not None:
            img_file = raw / "imagesTr" / f"{cid}_0000{dj['file_ending']}"
            if img_file.is_file():
                r = sitk.ImageFileReader()
                r.SetFileName(str(img_file))
                r.ReadImageInformation()
                sitk_zyx = np.array(r.GetSpacing()[::-1], dtype=float)
                if not np.allclose(sp_arr[list(zyx_axes)], sitk_zyx, atol=1e-3):
                    raise FlareInputError(img_file, f"reader spacing {sp_arr.tolist()} mapped to (z, y, x) is "
                                                    f"{sp_arr[list(zyx_axes)].tolist()}, SimpleITK says "
                                                    f"{sitk_zyx.tolist()}")
        checked.append({"case": cid, "preprocessed_shape": [int(x) for x in shape],
                        "extent_mm": [round(float(x), 2) for x in extent_pre]})
    return {"ok": True, "axis_order": _axis_order(plans), "cases": checked}
