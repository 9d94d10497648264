"""flare_utils.planning.plans: the FLARE22 plan variants, derived from nnU-Net v2's own planning."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flare_utils.errors import FlareInputError
from flare_utils.data.labels import dataset_json_labels
from flare_utils.planning.plans import (PLAN_VARIANTS, PlanVariant, count_parameters, describe_plans, make_plan_variant,
                               plan_and_preprocess, plan_topology, skeleton_base_plans)

from tiny_data import preserved_environ  # noqa: E402

NNUNET_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def write_tiny_dataset(raw_root: Path, dataset_id: int, name: str, n: int = 4, reader: str | None = None,
                       shape_zyx=(24, 36, 40), spacing_zyx=(4.0, 3.0, 3.0), seed: int = 0) -> Path:
    """n small CT-like cases (a few ellipsoid organs) as an nnU-Net v2 raw dataset.

    y and x differ in size so that an axis mix-up shows in the preprocessed shapes."""
    import SimpleITK as sitk
    d = raw_root / f"Dataset{dataset_id:03d}_{name}"
    (d / "imagesTr").mkdir(parents=True, exist_ok=True)
    (d / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Z, Y, X = shape_zyx
    zz, yy, xx = np.meshgrid(np.arange(Z), np.arange(Y), np.arange(X), indexing="ij")
    organs = [(1, (12, 16, 14), (6, 7, 8)), (3, (10, 24, 30), (4, 4, 4)), (2, (8, 10, 30), (3, 4, 3)),
              (13, (8, 26, 10), (3, 4, 3))]
    for i in range(n):
        lab = np.zeros(shape_zyx, np.uint8)
        img = rng.normal(-80, 20, shape_zyx).astype(np.float32)
        img[:, :, :2] = -1000
        for lv, c, r in organs:
            c = np.array(c) + rng.integers(-2, 3, 3)
            m = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1
            lab[m] = lv
            img[m] = 50 + 12 * lv + rng.normal(0, 8, int(m.sum()))
        for arr, f in ((img, d / "imagesTr" / f"tiny_{i:03d}_0000.nii.gz"), (lab, d / "labelsTr" / f"tiny_{i:03d}.nii.gz")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
            sitk.WriteImage(im, str(f))
    dj = {"channel_names": {"0": "CT"}, "labels": dataset_json_labels(), "numTraining": n, "file_ending": ".nii.gz"}
    if reader:
        dj["overwrite_image_reader_writer"] = reader
    (d / "dataset.json").write_text(json.dumps(dj))
    return d


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("plans_run")
    from flare_utils.layout import RunLayout
    with preserved_environ(NNUNET_VARS):
        RunLayout(root).activate()
        yield root


@pytest.fixture(scope="module")
def planned(run_dir):
    write_tiny_dataset(run_dir / "nnUNet_raw", 997, "PlansTiny")
    ids = plan_and_preprocess(997, ("default", "efficient_demo", "lowfootprint"), processes=1)
    return ids


# ---------------------------------------------------------------------------------- no data

def test_variant_table():
    assert {"default", "accurate", "efficient", "lowfootprint", "accurate_demo", "efficient_demo"} <= set(PLAN_VARIANTS)
    assert PLAN_VARIANTS["default"].plans_identifier == "nnUNetPlans"
    assert PLAN_VARIANTS["accurate"].plans_identifier == "nnUNetPlans_accurate"
    with pytest.raises(FlareInputError, match="unknown plan variant"):
        make_plan_variant(skeleton_base_plans(), "nope")


def _arch(plans):
    return plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]


def test_accurate_full_size_geometry_and_parameters():
    p = make_plan_variant(skeleton_base_plans(), "accurate")
    cfg, a = p["configurations"]["3d_fullres"], _arch(p)
    assert p["plans_name"] == "nnUNetPlans_accurate" and list(p["configurations"]) == ["3d_fullres"]
    assert cfg["data_identifier"] == "nnUNetPlans_accurate_3d_fullres"
    assert cfg["patch_size"] == [48, 224, 224] and cfg["spacing"] == [2.5, 0.8, 0.8]
    assert p["transpose_forward"] == [0, 1, 2]
    assert a["n_stages"] == 6                                     # 5 downsamplings
    assert a["features_per_stage"] == [32, 64, 128, 256, 512, 512]
    assert a["n_conv_per_stage"] == [3] * 6 and a["n_conv_per_stage_decoder"] == [3] * 5
    # anisotropic first stage: in-plane pooling only, 1x3x3 kernels
    assert a["strides"] == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    assert a["kernel_sizes"][0] == [1, 3, 3] and all(k == [3, 3, 3] for k in a["kernel_sizes"][1:])
    total = np.prod(a["strides"], axis=0)
    assert all(ps % t == 0 for ps, t in zip(cfg["patch_size"], total))
    n = count_parameters(p)
    assert abs(n - 85e6) / 85e6 < 0.05, n
    assert abs(n - 82e6) / 82e6 < 0.05, n                        # paper: 82M


def test_efficient_full_size_geometry_and_parameters():
    p = make_plan_variant(skeleton_base_plans(), "efficient")
    cfg, a = p["configurations"]["3d_fullres"], _arch(p)
    assert cfg["patch_size"] == [32, 128, 192] and cfg["spacing"] == [4.0, 1.2, 1.2]
    assert a["n_stages"] == 5 and a["features_per_stage"] == [16, 32, 64, 128, 256]
    assert a["n_conv_per_stage"] == [2] * 5 and a["n_conv_per_stage_decoder"] == [2] * 4
    assert a["strides"][1] == [1, 2, 2]
    total = np.prod(a["strides"], axis=0)
    assert all(ps % t == 0 for ps, t in zip(cfg["patch_size"], total))
    n = count_parameters(p)
    assert abs(n - 5.6e6) / 5.6e6 < 0.05, n
    assert abs(n - 5.4e6) / 5.4e6 < 0.06, n                      # paper: 5.4M


def test_lowfootprint_halves_features_keeps_topology():
    base = skeleton_base_plans()
    p = make_plan_variant(base, "lowfootprint")
    b, a = _arch(base), _arch(p)
    assert a["features_per_stage"] == [f // 2 for f in b["features_per_stage"]]
    assert a["strides"] == b["strides"] and a["kernel_sizes"] == b["kernel_sizes"]
    assert p["configurations"]["3d_fullres"]["patch_size"] == base["configurations"]["3d_fullres"]["patch_size"]
    ratio = count_parameters(p) / count_parameters(base)
    assert 0.2 < ratio < 0.3                                      # ~1/4 of the weights


@pytest.mark.parametrize("name", ["accurate_demo", "efficient_demo"])
def test_demo_variants_are_small_and_consistent(name):
    v = PLAN_VARIANTS[name]
    d = describe_plans(make_plan_variant(skeleton_base_plans(), v))
    assert d["patch_size"] == list(v.patch_size_zyx) and d["spacing"] == list(v.spacing_zyx)
    assert d["n_downsamplings"] == v.n_downsamplings
    assert all(p % t == 0 for p, t in zip(d["patch_size"], d["total_stride"]))
    assert d["parameters"] < 10e6
    assert max(d["features_per_stage"]) <= v.max_features


def test_impossible_topology_is_an_input_error():
    with pytest.raises(FlareInputError, match="allows only"):
        plan_topology([3.0, 3.0, 3.0], [16, 32, 32], 5)
    with pytest.raises(FlareInputError, match="not divisible"):
        plan_topology([3.0, 3.0, 3.0], [30, 64, 64], 3)
    bad = PlanVariant("bad", base_features=8, n_downsamplings=3, patch_size_zyx=(18, 64, 64), spacing_zyx=(3, 3, 3))
    with pytest.raises(FlareInputError, match="'bad'"):
        make_plan_variant(skeleton_base_plans(), bad)


# ---------------------------------------------------------------------------------- with nnU-Net

def test_plan_and_preprocess_writes_real_plans(planned, run_dir):
    assert planned == {"default": "nnUNetPlans", "efficient_demo": "nnUNetPlans_efficient_demo",
                       "lowfootprint": "nnUNetPlans_lowfootprint"}
    pre = run_dir / "nnUNet_preprocessed" / "Dataset997_PlansTiny"
    base = json.loads((pre / "nnUNetPlans.json").read_text())
    assert base["experiment_planner_used"] == "ExperimentPlanner"
    eff = json.loads((pre / "nnUNetPlans_efficient_demo.json").read_text())
    cfg = eff["configurations"]["3d_fullres"]
    assert cfg["spacing"] == [4.0, 3.0, 3.0] and cfg["patch_size"] == [24, 48, 64]
    assert eff["flare_variant"]["name"] == "efficient_demo"
    for pid in planned.values():
        plans = json.loads((pre / f"{pid}.json").read_text())
        folder = pre / plans["configurations"]["3d_fullres"]["data_identifier"]
        assert len(list(folder.glob("*.pkl"))) == 4, pid
    low = json.loads((pre / "nnUNetPlans_lowfootprint.json").read_text())
    assert _arch(low)["features_per_stage"] == [f // 2 for f in _arch(base)["features_per_stage"]]
    summary = json.loads((pre / "flare_plans_summary.json").read_text())
    ver = summary["efficient_demo"]["verification"]
    assert ver["ok"] and ver["axis_order"] == "zyx"
    # (z, y, x) = (24, 36, 40) voxels at (4, 3, 3) mm, stored unchanged in z, y, x order
    assert ver["cases"][0]["preprocessed_shape"] == [24, 36, 40]
    assert summary["efficient_demo"]["parameters"] == count_parameters("nnUNetPlans_efficient_demo", dataset=997)


def test_rerun_reuses_complete_outputs(planned, run_dir):
    folder = run_dir / "nnUNet_preprocessed" / "Dataset997_PlansTiny" / "nnUNetPlans_efficient_demo_3d_fullres"
    before = {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}
    assert plan_and_preprocess(997, ("efficient_demo",), processes=1) == {"efficient_demo": "nnUNetPlans_efficient_demo"}
    assert {f.name: f.stat().st_mtime_ns for f in folder.iterdir()} == before


def test_plans_build_in_stock_nnunet_trainer(planned, run_dir):
    """nnU-Net's own trainer accepts our plans identifier and builds the planned network."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    t = get_trainer_from_args("997", "3d_fullres", 0, "nnUNetTrainer", "nnUNetPlans_efficient_demo",
                              device=torch.device("cpu"))
    t.initialize()
    n = sum(p.numel() for p in t.network.parameters())
    assert n == count_parameters("nnUNetPlans_efficient_demo", dataset=997)
    assert list(t.configuration_manager.patch_size) == [24, 48, 64]
    assert t.network.encoder.stages[0][0].convs[0].conv.out_channels == 8


def test_nibabel_reader_axis_order_is_mapped_to_zyx(run_dir):
    """nnU-Net's NibabelIO reads nibabel's (x, y, z) arrays but hands them over as (z, y, x), like
    SimpleITKIO: the variant's spacing/patch are the requested (z, y, x) with either reader (the
    verification compares with SimpleITK's reading of the raw file)."""
    write_tiny_dataset(run_dir / "nnUNet_raw", 996, "PlansNib", n=2, reader="NibabelIO")
    ids = plan_and_preprocess(996, ("efficient_demo",), processes=1)
    pre = run_dir / "nnUNet_preprocessed" / "Dataset996_PlansNib"
    plans = json.loads((pre / f"{ids['efficient_demo']}.json").read_text())
    assert plans["image_reader_writer"] == "NibabelIO"
    assert plans["transpose_forward"] == [0, 1, 2]
    assert plans["configurations"]["3d_fullres"]["spacing"] == [4.0, 3.0, 3.0]
    ver = json.loads((pre / "flare_plans_summary.json").read_text())["efficient_demo"]["verification"]
    assert ver["axis_order"] == "zyx" and ver["cases"][0]["preprocessed_shape"] == [24, 36, 40]


def test_resolve_plans_identifier():
    """One rule for every stage (and the runner): a plan variant's name -> its identifier, else unchanged."""
    from flare_utils.planning.plans import resolve_plans_identifier
    assert resolve_plans_identifier("accurate_demo") == "nnUNetPlans_accurate_demo"
    assert resolve_plans_identifier("default") == "nnUNetPlans"
    assert resolve_plans_identifier("nnUNetPlans_efficient_demo") == "nnUNetPlans_efficient_demo"
    assert resolve_plans_identifier("mine") == "mine"                     # not a variant: an identifier
    own = [{"name": "mine", "base_features": 4}, "efficient_demo"]
    assert resolve_plans_identifier("mine", own) == "nnUNetPlans_mine"
    assert resolve_plans_identifier("mine", [PlanVariant("mine")]) == "nnUNetPlans_mine"


# ---------------------------------------------------------------------------------- nnU-Net's ResEnc presets

RESENC = {"resenc_m": ("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans", 8),
          "resenc_l": ("nnUNetPlannerResEncL", "nnUNetResEncUNetLPlans", 24),
          "resenc_xl": ("nnUNetPlannerResEncXL", "nnUNetResEncUNetXLPlans", 40)}


def test_resenc_variants_are_nnunets_own_planners():
    """resenc_* name nnU-Net's planner classes and carry the identifiers those planners write by default."""
    import inspect
    from flare_utils.planning.plans import nnunet_planner_class, resolve_plans_identifier
    for name, (planner, pid, gb) in RESENC.items():
        v = PLAN_VARIANTS[name]
        assert v.planner == planner and v.plans_identifier == pid
        assert PlanVariant(name=name).plans_identifier == pid          # what params checks and the runner use
        assert resolve_plans_identifier(name) == pid
        cls = nnunet_planner_class(planner)
        sig = inspect.signature(cls.__init__).parameters
        assert sig["plans_name"].default == pid and sig["gpu_memory_target_in_gb"].default == gb
        assert cls.__module__.endswith("residual_unets.residual_encoder_unet_planners")
    with pytest.raises(FlareInputError, match="planned by nnU-Net's nnUNetPlannerResEncM"):
        make_plan_variant(skeleton_base_plans(), "resenc_m")
    with pytest.raises(ValueError, match="cannot be combined"):
        PlanVariant("mine", planner="nnUNetPlannerResEncM", base_features=8)
    with pytest.raises(FlareInputError, match="no experiment planner class"):
        nnunet_planner_class("nnUNetPlannerNope")


def test_resenc_presets_plan_without_data():
    """On a fingerprint whose images are larger than ResEnc M's 8 GB patch, L (24 GB) plans a larger patch
    with one more stage, so more parameters; XL (40 GB) at least as many. All ResidualEncoderUNet, all
    sharing the default plans' preprocessed data."""
    from flare_utils.planning.plans import plan_nnunet_preset, skeleton_fingerprint
    fp = skeleton_fingerprint(spacing_zyx=(2.0, 2.0, 2.0), median_shape_zyx=(96, 256, 256))
    d = {}
    for name, (planner, pid, _) in RESENC.items():
        plans = plan_nnunet_preset(name, fp)
        assert plans["plans_name"] == pid and plans["experiment_planner_used"] == planner
        cfg = plans["configurations"]["3d_fullres"]
        assert cfg["architecture"]["network_class_name"].endswith(".ResidualEncoderUNet")
        assert cfg["data_identifier"] == "nnUNetPlans_3d_fullres"
        d[name] = describe_plans(plans)
        assert d[name]["network"] == "ResidualEncoderUNet"
        assert d[name]["n_blocks_per_stage"][:4] == [1, 3, 4, 6]
        assert d[name]["n_conv_per_stage"] == [2 * b for b in d[name]["n_blocks_per_stage"]]
        assert d[name]["spacing"] == [2.0, 2.0, 2.0]
    m, lg, xl = d["resenc_m"], d["resenc_l"], d["resenc_xl"]
    assert np.prod(lg["patch_size"]) > np.prod(m["patch_size"]) and lg["n_stages"] == m["n_stages"] + 1
    assert lg["parameters"] > m["parameters"] > 50e6 and xl["parameters"] >= lg["parameters"]
    with pytest.raises(FlareInputError, match="not planned by an nnU-Net planner"):
        plan_nnunet_preset("efficient")


def test_resenc_plan_preprocess_and_train(run_dir):
    """plan_and_preprocess plans resenc_m with nnU-Net's planner, preprocesses the data folder it shares
    with the default plans once, and a FlareTeacherTrainer trains a ResidualEncoderUNet on it (one
    iteration on CPU); the checkpoint's weights count exactly the reported parameters."""
    import torch
    from flare_utils.training import train
    write_tiny_dataset(run_dir / "nnUNet_raw", 993, "PlansResEnc", n=4, shape_zyx=(16, 24, 24), seed=3)
    ids = plan_and_preprocess(993, ("resenc_m", "default"), processes=1)
    assert ids == {"resenc_m": "nnUNetResEncUNetMPlans", "default": "nnUNetPlans"}
    pre = run_dir / "nnUNet_preprocessed" / "Dataset993_PlansResEnc"
    plans = json.loads((pre / "nnUNetResEncUNetMPlans.json").read_text())
    assert plans["experiment_planner_used"] == "nnUNetPlannerResEncM"
    folder = pre / "nnUNetPlans_3d_fullres"                        # nnU-Net's shared data identifier
    before = {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}
    assert len([n for n in before if n.endswith(".pkl")]) == 4
    summary = json.loads((pre / "flare_plans_summary.json").read_text())
    assert summary["resenc_m"]["network"] == "ResidualEncoderUNet"
    assert summary["resenc_m"]["verification"]["ok"]
    n = summary["resenc_m"]["parameters"]
    assert n == count_parameters("nnUNetResEncUNetMPlans", dataset=993)
    assert n > summary["default"]["parameters"]                       # residual blocks: more weights than plain
    # the plans only changed their network: the shared data is reused, not preprocessed again
    assert plan_and_preprocess(993, ("resenc_l",), processes=1) == {"resenc_l": "nnUNetResEncUNetLPlans"}
    assert {f.name: f.stat().st_mtime_ns for f in folder.iterdir()} == before

    cfg = {"num_epochs": 1, "num_iterations_per_epoch": 1, "num_val_iterations_per_epoch": 1, "device": "cpu",
           "n_proc_da": 0, "export_processes": 1, "num_threads": 2, "seed": 0, "final_validation": False}
    with preserved_environ(("FLARE_TRAINING_CONFIG",)):
        res = train(993, "nnUNetResEncUNetMPlans", "all", "FlareTeacherTrainer", cfg)
    assert res.name == "FlareTeacherTrainer__nnUNetResEncUNetMPlans__3d_fullres"
    ck = torch.load(res / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["trainer_name"] == "FlareTeacherTrainer"
    assert any(k.startswith("encoder.stem.") for k in ck["network_weights"])          # ResidualEncoder's stem
    # hand count: the state dict names a residual block's convolutions twice (and the encoder again under
    # decoder.encoder), so count each stored tensor once
    w = ck["network_weights"]
    assert sum(v.numel() for v in w.values()) > 2 * n
    assert sum({v.untyped_storage().data_ptr(): v.numel() for v in w.values()}.values()) == n
    assert np.isfinite(ck["logging"]["train_losses"][-1])
