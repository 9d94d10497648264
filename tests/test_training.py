"""flare_utils.training: FLARE trainers on nnU-Net v2 (tiny CPU runs: 1 epoch x 2 iterations)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flare_utils.errors import FlareInputError
from flare_utils.training import (ENV_VAR, SplitSpec, TrainingConfig, make_splits, read_splits, write_splits)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_plans import NNUNET_VARS, write_tiny_dataset  # noqa: E402
from tiny_data import preserved_environ  # noqa: E402

DATASET = 995
PLANS = "nnUNetPlans_efficient_demo"
TINY = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "device": "cpu",
        "n_proc_da": 0, "export_processes": 1, "num_threads": 2, "seed": 0}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny dataset (5 cases), planned and preprocessed with the efficient_demo plans."""
    from flare_utils.planning.plans import plan_and_preprocess
    from flare_utils.layout import RunLayout
    root = tmp_path_factory.mktemp("training_run")
    with preserved_environ((*NNUNET_VARS, ENV_VAR)):
        RunLayout(root).activate()
        os.environ.pop(ENV_VAR, None)
        write_tiny_dataset(root / "nnUNet_raw", DATASET, "TrainTiny", n=5, seed=1)
        plan_and_preprocess(DATASET, ("efficient_demo",), processes=1)
        yield root


def _config_file(tmp_path, **changes) -> Path:
    return TrainingConfig.from_dict({**TINY, **changes}).save(tmp_path / "cfg.json")


def _trainer(trainer_name: str, fold, cfg_file: Path):
    from nnunetv2.run.run_training import get_trainer_from_args
    from flare_utils.training import find_trainer
    find_trainer(trainer_name)
    with preserved_environ((ENV_VAR,)):
        os.environ[ENV_VAR] = str(cfg_file)
        return get_trainer_from_args(str(DATASET), "3d_fullres", fold, trainer_name, PLANS, device=torch.device("cpu"))


# ---------------------------------------------------------------------------------- configuration

def test_config_json_roundtrip_and_validation(tmp_path, monkeypatch):
    f = _config_file(tmp_path, loss="dice", freeze_encoder_stages=1)
    monkeypatch.setenv(ENV_VAR, str(f))
    c = TrainingConfig.from_env()
    assert c.loss == "dice" and c.freeze_encoder_stages == 1 and c.num_iterations_per_epoch == 2
    monkeypatch.delenv(ENV_VAR)
    assert TrainingConfig.from_env().num_epochs == 1000            # nnU-Net's defaults
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"num_epoch": 3}))
    with pytest.raises(FlareInputError, match="unknown training option"):
        TrainingConfig.from_json(bad)
    bad.write_text(json.dumps({"num_epochs": "3"}))
    with pytest.raises(FlareInputError, match="num_epochs"):
        TrainingConfig.from_json(bad)
    bad.write_text(json.dumps({"loss": "focal"}))
    with pytest.raises(FlareInputError, match="loss"):
        TrainingConfig.from_json(bad)
    with pytest.raises(FlareInputError, match="not found"):
        TrainingConfig.from_json(tmp_path / "missing.json")


def test_device_resolution():
    from flare_utils.training import resolve_device
    assert resolve_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto", torch.device("cuda")).type == expected
    if not torch.cuda.is_available():
        with pytest.raises(FlareInputError, match="not available"):
            resolve_device("cuda")


def test_device_names_shared_by_training_and_inference():
    from flare_utils.utilities.device import resolve_device
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device().type == expected
    assert resolve_device("auto", "cpu").type == "cpu"            # the device a caller was handed, when present
    for bad in ("gpu", "cuda:x", "cpu:0", ""):
        with pytest.raises(FlareInputError, match="device must be"):
            resolve_device(bad)
    if torch.cuda.is_available():
        assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(FlareInputError, match="not available"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    if not torch.backends.mps.is_available():
        with pytest.raises(FlareInputError, match="not available"):
            resolve_device("mps")


# ---------------------------------------------------------------------------------- registration

def test_registration_makes_trainers_findable_by_nnunet():
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from flare_utils.training import FlareStudentTrainer, FlareTeacherTrainer, register_with_nnunet
    p = register_with_nnunet()
    mtime = p.stat().st_mtime_ns
    assert register_with_nnunet() == p and p.stat().st_mtime_ns == mtime      # idempotent
    folder = os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer")
    for cls in (FlareTeacherTrainer, FlareStudentTrainer):
        found = recursive_find_python_class(folder, cls.__name__, "nnunetv2.training.nnUNetTrainer")
        assert found is cls
    # the stock trainer is still nnU-Net's own
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    assert recursive_find_python_class(folder, "nnUNetTrainer", "nnunetv2.training.nnUNetTrainer") is nnUNetTrainer


# ---------------------------------------------------------------------------------- splits

def test_default_split_is_nnunets_own():
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    ids = [f"c{i:02d}" for i in range(12)]
    ours = make_splits(ids)
    theirs = generate_crossval_split(ids, seed=12345, n_splits=5)
    assert [sorted(s["val"]) for s in ours] == [sorted(map(str, s["val"])) for s in theirs]


def test_split_spec_difficult_cases_and_custom_folds():
    ids = [f"c{i:02d}" for i in range(10)]
    s = make_splits(ids, SplitSpec(always_train=["c03", "c07"], exclude=["c09"]))
    assert len(s) == 5
    for fold in s:
        assert {"c03", "c07"} <= set(fold["train"]) and not {"c03", "c07"} & set(fold["val"])
        assert "c09" not in fold["train"] + fold["val"]
        assert not set(fold["train"]) & set(fold["val"])
    assert sorted(c for f in s for c in f["val"]) == sorted(set(ids) - {"c03", "c07", "c09"})
    custom = make_splits(ids, [["c00", "c01"], {"train": ["c02", "c03"], "val": ["c04"]}])
    assert custom[0]["val"] == ["c00", "c01"] and len(custom[0]["train"]) == 8
    assert custom[1] == {"train": ["c02", "c03"], "val": ["c04"]}
    with pytest.raises(FlareInputError, match="unknown case id"):
        make_splits(ids, {"always_train": ["nope"]})
    with pytest.raises(FlareInputError, match="unknown case id"):
        make_splits(ids, [["c00", "zz"]])
    with pytest.raises(FlareInputError, match="both train and val"):
        make_splits(ids, [{"train": ["c00", "c01"], "val": ["c01"]}])
    with pytest.raises(FlareInputError, match="twice"):
        make_splits(ids, [["c00", "c00"]])


def test_write_splits_validates_against_the_dataset(run_dir):
    path = write_splits(DATASET, {"n_folds": 2, "always_train": ["tiny_000"]})
    assert path == run_dir / "nnUNet_preprocessed" / "Dataset995_TrainTiny" / "splits_final.json"
    splits = read_splits(DATASET)
    assert len(splits) == 2 and all("tiny_000" in s["train"] for s in splits)
    with pytest.raises(FlareInputError, match="unknown case id"):
        write_splits(DATASET, [["tiny_000", "case_x"]])
    assert read_splits(DATASET) == splits                     # a rejected spec leaves the file alone


# ---------------------------------------------------------------------------------- trainer pieces

@pytest.mark.parametrize("loss,w_ce,w_dice", [("dice_ce", 1, 1), ("dice", 0, 1), ("ce", 1, 0)])
def test_loss_variants(run_dir, tmp_path, loss, w_ce, w_dice):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    t = _trainer("FlareTeacherTrainer", 4, _config_file(tmp_path, loss=loss))
    t.initialize()
    assert isinstance(t.loss, DeepSupervisionWrapper) and isinstance(t.loss.loss, DC_and_CE_loss)
    assert (t.loss.loss.weight_ce, t.loss.loss.weight_dice) == (w_ce, w_dice)
    x = torch.randn(2, 1, *t.configuration_manager.patch_size)
    target = torch.randint(0, 14, (2, 1, *t.configuration_manager.patch_size)).float()
    with torch.no_grad():
        out = t.network(x)
    scales = t._get_deep_supervision_scales()
    targets = [torch.nn.functional.interpolate(target, scale_factor=s, mode="nearest") if i else target
               for i, s in enumerate(scales)]
    assert torch.isfinite(t.loss(out, targets))


@pytest.mark.e2e
def test_seeded_trainers_give_identical_first_batches_and_losses(run_dir, tmp_path):
    write_splits(DATASET, {"n_folds": 5})

    def first(seed, n_proc_da, steps):
        t = _trainer("FlareTeacherTrainer", 1, _config_file(tmp_path, seed=seed, n_proc_da=n_proc_da))
        t.on_train_start()
        try:
            batches = [next(t.dataloader_train) for _ in range(max(steps, 1))]
            data = [b["data"].clone() for b in batches]
            losses = [float(t.train_step(b)["loss"]) for b in batches[:steps]]
        finally:
            for dl in (t.dataloader_train, t.dataloader_val):
                if hasattr(dl, "_finish"):
                    dl._finish()
        return data, losses

    a = first(0, 0, 2)
    b = first(0, 0, 2)
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and a[1] == b[1]
    c = first(1, 0, 0)
    assert not torch.equal(a[0][0], c[0][0])
    # seeded augmentation workers (order-preserving MultiThreadedAugmenter) are reproducible too
    d = first(0, 1, 0)
    e = first(0, 1, 0)
    assert torch.equal(d[0][0], e[0][0])


def test_freezing_keeps_weights_bit_identical(tmp_path):
    """Frozen encoder stages: requires_grad False, not in the optimizer, unchanged by SGD steps
    with weight decay; the other weights change."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from flare_utils.planning.plans import make_plan_variant, skeleton_base_plans
    from flare_utils.training import freeze_encoder_stages
    pm = PlansManager(make_plan_variant(skeleton_base_plans(), "efficient_demo"))
    cm = pm.get_configuration("3d_fullres")
    torch.manual_seed(0)
    net = nnUNetTrainer.build_network_architecture(pm, cm, 1, 14, False)
    names = freeze_encoder_stages(net, 2)
    assert names and all(n.startswith("encoder.stages.0.") or n.startswith("encoder.stages.1.") for n in names)
    with pytest.raises(FlareInputError, match="cannot freeze"):
        freeze_encoder_stages(net, 99)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], 0.1, momentum=0.99, nesterov=True,
                          weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(1, 1, *cm.patch_size)).square().mean().backward()
        opt.step()
    after = net.state_dict()
    for k in before:
        if k.startswith(("encoder.stages.0.", "encoder.stages.1.")):
            assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["encoder.stages.2.0.convs.0.conv.weight"], after["encoder.stages.2.0.convs.0.conv.weight"])


# ---------------------------------------------------------------------------------- real trainings

@pytest.fixture(scope="module")
def teacher(run_dir, tmp_path_factory):
    """Stock `nnUNetv2_train ... -tr FlareTeacherTrainer` in a subprocess, config via the env var."""
    from flare_utils.training import register_with_nnunet, write_splits
    register_with_nnunet()
    write_splits(DATASET, {"n_folds": 5})
    cfg = TrainingConfig.from_dict(TINY).save(tmp_path_factory.mktemp("teacher_cfg") / "cfg.json")
    env = dict(os.environ, **{ENV_VAR: str(cfg)})
    exe = Path(sys.executable).with_name("nnUNetv2_train")
    cmd = [str(exe), str(DATASET), "3d_fullres", "0", "-p", PLANS, "-tr", "FlareTeacherTrainer", "-device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir / "nnUNet_results" / "Dataset995_TrainTiny" / f"FlareTeacherTrainer__{PLANS}__3d_fullres"


@pytest.mark.e2e
def test_stock_nnunetv2_train_makes_a_normal_results_folder(teacher):
    from flare_utils.training import read_learning_curves, read_validation_dice, training_config_of
    for f in ("dataset.json", "plans.json", "dataset_fingerprint.json"):
        assert (teacher / f).is_file(), f
    fold = teacher / "fold_0"
    for f in ("checkpoint_final.pth", "progress.png", "debug.json", "validation/summary.json"):
        assert (fold / f).is_file(), f
    assert json.loads((teacher / "plans.json").read_text())["plans_name"] == PLANS
    ck = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["trainer_name"] == "FlareTeacherTrainer"
    assert tuple(ck["inference_allowed_mirroring_axes"]) == (0, 1, 2)          # teacher mirrors
    assert training_config_of(teacher, 0)["num_iterations_per_epoch"] == 2
    curves = read_learning_curves(teacher, 0)
    assert len(curves) == 1 and np.isfinite(curves.loc[0, "train_loss"]) and "dice_liver" in curves
    dice = read_validation_dice(teacher)
    assert list(dice.index) == ["0"] and list(dice.columns)[:3] == ["liver", "right_kidney", "spleen"]


@pytest.mark.e2e
def test_student_transfer_freeze_and_stock_prediction(teacher, run_dir, tmp_path):
    """Python API: a student initialised from the teacher checkpoint with 2 frozen encoder stages,
    Dice-only loss; then nnU-Net's own predictor on its results folder."""
    from flare_utils.training import train
    src = teacher / "fold_0" / "checkpoint_final.pth"
    cfg = {**TINY, "init_checkpoint": str(src), "freeze_encoder_stages": 2, "loss": "dice",
           "final_validation": False}
    res = train(DATASET, PLANS, 0, "FlareStudentTrainer", cfg)
    assert res.name == f"FlareStudentTrainer__{PLANS}__3d_fullres"
    fold = res / "fold_0"
    ck = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    teacher_w = torch.load(src, map_location="cpu", weights_only=False)["network_weights"]
    assert ck["trainer_name"] == "FlareStudentTrainer"
    assert ck["inference_allowed_mirroring_axes"] is None                      # student: no TTA mirroring
    report = json.loads((fold / "flare_transfer_init.json").read_text())
    assert set(report["loaded"]) == set(teacher_w) and not report["skipped"]  # same plans: everything loads
    w = ck["network_weights"]
    frozen = [k for k in w if k.startswith(("encoder.stages.0.", "encoder.stages.1."))]
    assert frozen and all(torch.equal(w[k], teacher_w[k]) for k in frozen)   # loaded and never updated
    head = max(k for k in w if k.startswith("decoder.seg_layers.") and k.endswith(".weight"))  # full resolution
    assert not torch.equal(w[head], teacher_w[head])                          # trained
    assert not torch.equal(w["encoder.stages.2.0.convs.0.conv.weight"], teacher_w["encoder.stages.2.0.convs.0.conv.weight"])
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "froze the first 2 encoder stages" in log and "transfer init" in log

    # stock nnU-Net inference on the student's folder
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    pred = nnUNetPredictor(tile_step_size=0.5, use_mirroring=True, device=torch.device("cpu"), allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(res), use_folds=(0,))
    assert pred.allowed_mirroring_axes is None
    img = run_dir / "nnUNet_raw" / "Dataset995_TrainTiny" / "imagesTr" / "tiny_001_0000.nii.gz"
    out = tmp_path / "pred"
    pred.predict_from_files([[str(img)]], [str(out / "tiny_001")], save_probabilities=False, overwrite=True,
                            num_processes_preprocessing=1, num_processes_segmentation_export=1)
    import SimpleITK as sitk
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "tiny_001.nii.gz")))
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(img)))
    assert seg.shape == ref.shape and seg.min() >= 0 and seg.max() <= 13


@pytest.mark.e2e
def test_transfer_init_skips_mismatching_heads(teacher, tmp_path):
    """A 3-class network takes everything but the segmentation heads from the 14-class teacher."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from flare_utils.training import load_transfer_weights
    plans = json.loads((teacher / "plans.json").read_text())
    pm = PlansManager(plans)
    net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 3, True)
    src = teacher / "fold_0" / "checkpoint_final.pth"
    rep = load_transfer_weights(net, src)
    assert rep.skipped and all(".seg_layers." in k and "shape" in why for k, why in rep.skipped.items())
    sd = torch.load(src, map_location="cpu", weights_only=False)["network_weights"]
    assert all(torch.equal(net.state_dict()[k], sd[k]) for k in rep.loaded)
    rep2 = load_transfer_weights(net, src, exclude=[".seg_layers.", "decoder.stages"])
    assert all(not k.startswith("decoder.stages") for k in rep2.loaded)
    with pytest.raises(FlareInputError, match="not found"):
        load_transfer_weights(net, tmp_path / "missing.pth")


def test_make_optimizer_sgd_and_adamw_with_poly_lr():
    from flare_utils.training.base import make_optimizer
    w = [torch.nn.Parameter(torch.zeros(3))]
    sgd, sched = make_optimizer(w, "sgd", 1e-2, 3e-5, 10)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.99 and sgd.defaults["lr"] == 1e-2
    adam, sched = make_optimizer(w, "adamw", 3e-3, 3e-5, 10)
    assert isinstance(adam, torch.optim.AdamW) and adam.defaults["amsgrad"] and adam.defaults["lr"] == 3e-3
    sched.step(5)                                     # nnU-Net's poly schedule: lr * (1 - epoch / epochs) ** 0.9
    assert abs(adam.param_groups[0]["lr"] - 3e-3 * 0.5 ** 0.9) < 1e-9
