"""A small nnU-Net v2 model trained on synthetic phantom cases in a minute or two.

For tests, benchmarks and notebooks that need a *real* trained nnU-Net v2 results folder
(plans.json, dataset.json, fold_X/checkpoint_final.pth) when no trained FLARE model is at hand.
The network, plans, preprocessing and checkpoint are stock nnU-Net v2; only the schedule is
short (a few epochs of a few iterations, no final validation) and, unless `augment=True`, the
training patches are not augmented (nnU-Net's validation transforms), which converges much faster.

`train_demo_model(run_dir, ...)` runs everything in a child process (its short-schedule trainer
class and nnU-Net's folder variables stay out of the caller's process), and returns the results folder
`<run_dir>/nnUNet_results/DatasetNNN_<name>/nnUNetTrainer__<plans>__3d_fullres`.

The short-schedule trainer is a subclass of `nnUNetTrainer` that keeps the name `nnUNetTrainer`,
so the checkpoint names the stock trainer and any nnU-Net v2 predictor (including
`nnUNetv2_predict`) rebuilds the identical architecture from it. A complete folder (same request)
is reused; `extra_folds` adds copies of fold 0 with slightly perturbed weights, which is enough
to exercise fold ensembling (they are *not* independently trained models).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence


REQUEST_FILE = "flare_demo_model.json"


def _tiny_variant(patch_zyx: Sequence[int], spacing_zyx: Sequence[float], n_conv: int = 1):
    from flare_utils.planning.plans import PlanVariant
    return PlanVariant("inference_tiny", "tiny network for inference tests", base_features=8, max_features=32,
                       n_conv_per_stage=n_conv, n_downsamplings=2, patch_size_zyx=tuple(int(v) for v in patch_zyx),
                       spacing_zyx=tuple(float(v) for v in spacing_zyx), batch_size=2)


def train_demo_model(run_dir: str | Path, *, dataset_id: int = 951, name: str = "InferenceDemo",
                     n_cases: int = 6, preset: str = "tiny",
                     fov: str | Sequence[str] = ("abdomen", "whole_body", "chest_abdomen_pelvis"), variant: str = "tiny",
                     patch_zyx: Sequence[int] = (16, 32, 32), spacing_zyx: Sequence[float] = (8.0, 6.0, 6.0),
                     epochs: int = 4, iterations: int = 25, extra_folds: Sequence[str | int] = (),
                     augment: bool = False, oversample_foreground: float | None = None, n_conv: int = 1,
                     optimizer: str = "sgd", initial_lr: float | None = None,
                     seed: int = 0, timeout: float = 1800) -> Path:
    """Train (or reuse) a small model; returns its nnU-Net results folder.

    fov: a field of view, or a list cycled over the cases (None: drawn from the preset).
    variant: "tiny" (a project-local plan: 8 features, `n_conv` convs per stage, 2 downsamplings, patch
    `patch_zyx` at `spacing_zyx`) or any name of `flare_utils.planning.plans.PLAN_VARIANTS` (e.g.
    "efficient_demo"; `patch_zyx`/`spacing_zyx` are then ignored).
    oversample_foreground: share of training patches forced to contain foreground (nnU-Net: 0.33);
    more helps a very short schedule leave the "all background" phase.
    optimizer: "sgd" (nnU-Net's) or "adamw" (nnU-Net's Adam recipe: AdamW with amsgrad and poly lr,
    as in `flare_utils.training`), which learns several organs in a few thousand CPU iterations
    where SGD learns the liver; initial_lr: None = nnU-Net's 1e-2.
    Training is seeded (python, numpy, torch) and single-threaded, so a request gives the same
    weights on the same machine.
    """
    run_dir = Path(run_dir).resolve()
    fovs = [fov] if isinstance(fov, str) or fov is None else list(fov)
    request = dict(dataset_id=int(dataset_id), name=name, n_cases=int(n_cases), preset=preset, fov=fovs,
                   variant=variant, patch_zyx=list(patch_zyx), spacing_zyx=list(spacing_zyx),
                   epochs=int(epochs), iterations=int(iterations), extra_folds=[str(f) for f in extra_folds],
                   augment=bool(augment), seed=int(seed))
    if oversample_foreground is not None:      # only when set, so older requests stay valid
        request["oversample_foreground"] = float(oversample_foreground)
    if n_conv != 1:
        request["n_conv"] = int(n_conv)
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    if optimizer != "sgd":
        request["optimizer"] = optimizer
    if initial_lr is not None:
        request["initial_lr"] = float(initial_lr)
    marker = run_dir / REQUEST_FILE
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("request") == request and Path(done["results"]).is_dir():
            return Path(done["results"])
    run_dir.mkdir(parents=True, exist_ok=True)
    from flare_utils.layout import RunLayout
    env = dict(os.environ, **RunLayout(run_dir).nnunet_environment(), nnUNet_n_proc_DA="1")
    log = run_dir / "demo_model_training.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(run_dir), json.dumps(request)],
                              env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"demo model training failed (log: {log}):\n{tail}")
    return Path(json.loads(marker.read_text())["results"])


def _write_raw_dataset(raw: Path, req: dict) -> Path:
    import numpy as np
    from flare_utils.synthetic.phantom import generate_case
    from flare_utils.planning.plans import flare22_dataset_json
    ds = raw / f"Dataset{req['dataset_id']:03d}_{req['name']}"
    (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
    (ds / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(req["n_cases"]):
        fov = req["fov"][i % len(req["fov"])]
        case = generate_case(req["seed"] * 1000 + i, req["preset"], fov=fov)
        case.label = case.label.astype(np.uint8)
        case.save(ds / "imagesTr" / f"demo_{i:03d}_0000.nii.gz", ds / "labelsTr" / f"demo_{i:03d}.nii.gz")
    (ds / "dataset.json").write_text(json.dumps(flare22_dataset_json(num_training=req["n_cases"]), indent=2))
    return ds


def _make_trainer_class(epochs: int, iterations: int, augment: bool, oversample: float | None = None,
                        optimizer: str = "sgd", initial_lr: float | None = None):
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as _Stock

    class nnUNetTrainer(_Stock):  # noqa: N801  (keeps the stock name on purpose, see module docstring)
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = epochs
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = 2
            self.save_every = 10 ** 9
            if oversample is not None:
                self.oversample_foreground_percent = oversample
            if initial_lr is not None:
                self.initial_lr = initial_lr

        if optimizer == "adamw":
            def configure_optimizers(self):
                from flare_utils.training.base import make_optimizer
                return make_optimizer(self.network.parameters(), "adamw", self.initial_lr, self.weight_decay,
                                      self.num_epochs)

        if not augment:
            def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
                rot, dummy_2d, _, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
                return rot, dummy_2d, tuple(self.configuration_manager.patch_size), mirror_axes

            @staticmethod
            def get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                        do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                        foreground_labels=None, regions=None, ignore_label=None):
                return _Stock.get_validation_transforms(deep_supervision_scales, is_cascaded, foreground_labels,
                                                        regions, ignore_label)

    return nnUNetTrainer


def _plan_and_preprocess(dataset_id: int, dataset_name: str, variant, preprocessed: Path) -> dict:
    """nnU-Net's fingerprint + default planner, then `flare_utils.planning.plans.make_plan_variant`, then
    nnU-Net's preprocessing of that plans identifier (3d_fullres only)."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                       preprocess_dataset)
    from flare_utils.planning.plans import CONFIGURATION, get_variant, make_plan_variant
    fingerprint = extract_fingerprint_dataset(dataset_id, num_processes=1, check_dataset_integrity=False,
                                              clean=True, verbose=False)
    base = ExperimentPlanner(dataset_name, plans_name="nnUNetPlans").plan_experiment()
    base = json.loads((preprocessed / dataset_name / "nnUNetPlans.json").read_text())
    v = get_variant(variant)
    plans = make_plan_variant(base, v, fingerprint)
    (preprocessed / dataset_name / f"{v.plans_identifier}.json").write_text(json.dumps(plans, indent=2))
    preprocess_dataset(dataset_id, v.plans_identifier, configurations=(CONFIGURATION,), num_processes=[1],
                       show_progress_bar=False)
    return plans


def _child(run_dir: Path, req: dict) -> None:
    import zlib

    import torch
    from flare_utils.layout import RunLayout
    layout = RunLayout(run_dir).activate()
    import random

    import numpy as np
    random.seed(req["seed"])
    np.random.seed(req["seed"])            # nnU-Net's data loader draws cases and patches from numpy
    torch.manual_seed(req["seed"])
    ds = _write_raw_dataset(layout.nnunet_raw, req)
    variant = _tiny_variant(req["patch_zyx"], req["spacing_zyx"], req.get("n_conv", 1)) \
        if req["variant"] == "tiny" else req["variant"]
    plans = _plan_and_preprocess(req["dataset_id"], ds.name, variant, layout.nnunet_preprocessed)
    pre = layout.nnunet_preprocessed / ds.name
    dataset_json = json.loads((pre / "dataset.json").read_text()) if (pre / "dataset.json").is_file() else \
        json.loads((ds / "dataset.json").read_text())
    plans["continue_training"] = False
    os.environ["nnUNet_n_proc_DA"] = "0"      # single-threaded data loading (the planner needs >= 1)
    # one thread: a small network gains little from more, and OpenMP threads that spin-wait on a busy
    # shared CPU can slow training down by an order of magnitude
    torch.set_num_threads(int(os.environ.get("FLARE_DEMO_TRAIN_THREADS", "1")))
    trainer_cls = _make_trainer_class(req["epochs"], req["iterations"], req["augment"],
                                      req.get("oversample_foreground"), req.get("optimizer", "sgd"),
                                      req.get("initial_lr"))
    trainer = trainer_cls(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    trainer.run_training()
    results = Path(trainer.output_folder_base)
    for f in req["extra_folds"]:
        ck = torch.load(results / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        g = torch.Generator().manual_seed(zlib.crc32(str(f).encode()))
        for k, v in ck["network_weights"].items():
            if v.is_floating_point() and v.ndim > 1:
                v.add_(torch.randn(v.shape, generator=g) * 0.05 * v.std())
        (results / f"fold_{f}").mkdir(exist_ok=True)
        torch.save(ck, results / f"fold_{f}" / "checkpoint_final.pth")
    (run_dir / REQUEST_FILE).write_text(json.dumps({"request": req, "results": str(results)}, indent=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("request")
    a = ap.parse_args()
    _child(a.run_dir.resolve(), json.loads(a.request))
