"""The tiny converted-and-planned dataset shared by the pseudo-label, CPS and student-notebook tests."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

NNUNET_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "FLARE_TRAINING_CONFIG")
DATASET = 511
UNLABELLED = ["Case_00001", "Case_00002", "Case_00003"]


def preserved_environ(keys=NNUNET_VARS):
    """Restore these environment variables afterwards (nnU-Net's folders are process-wide)."""
    from flare_utils.utilities.environment import environment
    return environment(**{k: os.environ.get(k) for k in keys})


def tiny_variant():
    from flare_utils.planning.plans import PlanVariant
    return PlanVariant("pseudotest", "unit-test scale", base_features=4, max_features=32, n_conv_per_stage=1,
                       n_downsamplings=2, patch_size_zyx=(16, 32, 32), spacing_zyx=(8.0, 8.0, 8.0), batch_size=2)


def build_tiny(base: Path, dataset: int = DATASET) -> Path:
    """5 labelled + 3 unlabelled (+ truth) + 1 test tiny phantom cases, converted and planned with
    the `pseudotest` variant; built once under `base` and reused while complete."""
    root = base / "flare_tiny_pseudo"
    if (root / ".complete").is_file():
        return root
    if root.exists():
        shutil.rmtree(root)
    from flare_utils.data.convert import convert_flare22
    from flare_utils.synthetic.phantom import write_cohort
    from flare_utils.planning.plans import plan_and_preprocess
    from flare_utils.layout import RunLayout
    RunLayout(root).activate()
    write_cohort(root / "cohort", 5, 3, 1, preset="tiny", fov_mix="abdomen")
    convert_flare22(root / "cohort", root / "nnUNet_raw", dataset, "PseudoTiny")
    plan_and_preprocess(dataset, (tiny_variant(),), processes=1, verify=False)
    (root / ".complete").write_text("ok")
    return root
