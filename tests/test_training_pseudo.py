"""Pseudo-label aware training (flare_utils.training.with_pseudo_labels / noisy_student) on a tiny phantom dataset."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flare_utils.errors import FlareInputError
from flare_utils.semisup import selection_file as S
from flare_utils.training import with_pseudo_labels as P
from tiny_data import DATASET, UNLABELLED, build_tiny  # noqa: E402

NNUNET_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "FLARE_TRAINING_CONFIG")
PLANS = "nnUNetPlans_pseudotest"


# ------------------------------------------------------------------------------ tiny dataset



def copy_tiny(tmp_path_factory, name: str) -> Path:
    src = build_tiny(tmp_path_factory.getbasetemp())
    dst = tmp_path_factory.mktemp(name)
    for d in ("cohort", "nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(src / d, dst / d)
    (dst / "nnUNet_results").mkdir()
    return dst


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    old = {k: os.environ.get(k) for k in NNUNET_VARS}
    root = copy_tiny(tmp_path_factory, "pseudo_run")
    from flare_utils.layout import RunLayout
    RunLayout(root).activate()
    raw = root / "nnUNet_raw" / f"Dataset{DATASET}_PseudoTiny"
    sel = S.write_selection_file(root / "selection.json", UNLABELLED, root / "cohort" / "SyntheticTruth" /
                                 "unlabelled_labels", raw / "imagesUnlabelled", meta={"round": 1})
    yield {"root": root, "raw": raw, "pre": root / "nnUNet_preprocessed" / f"Dataset{DATASET}_PseudoTiny",
           "selection": sel}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _plans_and_dj(run):
    plans = json.loads((run["pre"] / f"{PLANS}.json").read_text())
    dj = json.loads((run["pre"] / "dataset.json").read_text())
    return plans, dj


def _config_file(tmp_path: Path, cls=P.PseudoLabelConfig, name: str = "cfg.json", **kw) -> Path:
    base = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "device": "cpu",
            "n_proc_da": 0, "export_processes": 1, "num_threads": 1}
    base.update(kw)
    return cls.from_dict(base).save(tmp_path / name)


def _trainer(cls, run, fold, cfg_file, monkeypatch):
    plans, dj = _plans_and_dj(run)
    plans["continue_training"] = False
    monkeypatch.setenv("FLARE_TRAINING_CONFIG", str(cfg_file))
    return cls(plans, "3d_fullres", fold, dj, torch.device("cpu"))


# ------------------------------------------------------------------------------ pure functions

def test_secondary_count_rounding_rule():
    assert [P.secondary_count(b, 0.75) for b in (1, 2, 3, 4, 5, 8, 12)] == [1, 1, 2, 3, 4, 6, 9]
    assert [P.secondary_count(b, 0.5) for b in (1, 2, 3, 4)] == [1, 1, 2, 2]
    assert P.secondary_count(10, 0.35) == 4                       # round half up, float-safe
    assert P.secondary_count(4, 0.0) == 0 and P.secondary_count(4, 1.0) == 4
    assert P.secondary_count(4, 0.1) == 1 and P.secondary_count(4, 0.95) == 3   # both kinds kept
    with pytest.raises(FlareInputError):
        P.secondary_count(4, 1.5)


# ------------------------------------------------------------------------------ selection file

def test_selection_file_roundtrip(run):
    sel = S.read_selection_file(run["selection"])
    assert sel.cases == tuple(UNLABELLED) and sel.meta == {"round": 1}
    assert sel.image_files("Case_00002")[0].name == "Case_00002_0000.nii.gz"
    assert sel.label_file("Case_00002").is_file()
    d = json.loads(Path(run["selection"]).read_text())
    assert d["format"] == S.SELECTION_FORMAT and Path(d["images_folder"]).is_absolute()


def test_selection_file_validation_names_the_culprits(run, tmp_path):
    labels = run["root"] / "cohort" / "SyntheticTruth" / "unlabelled_labels"
    images = run["raw"] / "imagesUnlabelled"
    with pytest.raises(FlareInputError, match=r"unknown case id\(s\) \['Case_09999', 'nope'\]"):
        S.write_selection_file(tmp_path / "s.json", ["Case_00001", "Case_09999", "nope"], labels, images)
    partial = tmp_path / "labels"
    partial.mkdir()
    shutil.copy(labels / "Case_00001.nii.gz", partial)
    with pytest.raises(FlareInputError, match=r"missing pseudo label file\(s\).*\['Case_00002', 'Case_00003'\]"):
        S.write_selection_file(tmp_path / "s.json", UNLABELLED, partial, images)
    # a hand-written file (relative folders) is validated when read
    f = tmp_path / "hand.json"
    f.write_text(json.dumps({"cases": ["Case_00003", "Case_00042"], "images_folder": os.path.relpath(images, tmp_path),
                             "labels_folder": "labels"}))
    with pytest.raises(FlareInputError, match="Case_00042") as e:
        S.read_selection_file(f)
    assert e.value.path == f
    f.write_text(json.dumps({"cases": ["Case_00001", "Case_00003"], "images_folder": os.path.relpath(images, tmp_path),
                             "labels_folder": "labels"}))
    with pytest.raises(FlareInputError, match=r"missing pseudo label.*\['Case_00003'\]"):
        S.read_selection_file(f)
    assert S.read_selection_file(f, require_labels=False).cases == ("Case_00001", "Case_00003")
    with pytest.raises(FlareInputError, match="labelled training cases"):
        S.read_selection_file(f, check_files=False, labelled_cases=["Case_00003"])
    for bad, msg in (({"cases": ["a", "a"], "images_folder": "x"}, "twice"),
                     ({"cases": [], "images_folder": "x"}, "no case"),
                     ({"cases": ["a"]}, "images_folder"),
                     ({"cases": ["a"], "images_folder": "x", "colour": 1}, "unknown key")):
        f.write_text(json.dumps(bad))
        with pytest.raises(FlareInputError, match=msg):
            S.read_selection_file(f)


# ------------------------------------------------------------------------------ preprocessing

def test_pseudo_cases_preprocessed_by_nnunet_and_cached(run):
    folder = P.prepare_pseudo_cases(DATASET, PLANS, run["selection"])
    assert folder.parent.name == "nnUNetPlans_pseudotest_3d_fullres_pseudo" and folder.parent.parent == run["pre"]
    assert sorted(p.name[:-4] for p in folder.glob("*.pkl")) == UNLABELLED
    info = json.loads((folder.parent / f"{folder.name}.json").read_text())
    assert info["cases"] == UNLABELLED and info["kind"] == "pseudo"
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert P.prepare_pseudo_cases(DATASET, PLANS, run["selection"]) == folder          # cache hit
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp

    # identical to nnU-Net's own preprocessing: a labelled case through our path equals its
    # preprocessed version made by nnU-Net's preprocessing run
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    plans, dj = _plans_and_dj(run)
    case = "FLARE22_Tr_0002"
    sel = S.PseudoSelection((case,), run["raw"] / "imagesTr", run["raw"] / "labelsTr")
    ours = P.preprocess_selection(sel, plans, "3d_fullres", dj, run["root"] / "scratch_pre")
    a = nnUNetDatasetBlosc2(str(ours), [case]).load_case(case)
    b = nnUNetDatasetBlosc2(str(run["pre"] / "nnUNetPlans_pseudotest_3d_fullres"), [case]).load_case(case)
    np.testing.assert_array_equal(a[0][:], b[0][:])
    np.testing.assert_array_equal(a[1][:], b[1][:])
    assert a[3]["bbox_used_for_cropping"] == b[3]["bbox_used_for_cropping"]
    assert set(a[3]["class_locations"]) == set(b[3]["class_locations"])

    # rewritten pseudo labels (new modification time) get a new cache key
    sel2 = S.read_selection_file(run["selection"])
    key = P._cache_key(sel2, plans, plans["configurations"]["3d_fullres"], dj, True)
    assert key == folder.name
    lf = sel2.label_file("Case_00002")
    st = lf.stat()
    os.utime(lf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert P._cache_key(sel2, plans, plans["configurations"]["3d_fullres"], dj, True) != key
    finally:
        os.utime(lf, ns=(st.st_atime_ns, st.st_mtime_ns))


# ------------------------------------------------------------------------------ minibatch composition

def _loader_datasets(run):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans, dj = _plans_and_dj(run)
    lab_folder = run["pre"] / "nnUNetPlans_pseudotest_3d_fullres"
    ps_folder = P.prepare_pseudo_cases(DATASET, PLANS, run["selection"])
    lab = nnUNetDatasetBlosc2(str(lab_folder), ["FLARE22_Tr_0001", "FLARE22_Tr_0002", "FLARE22_Tr_0003"])
    ps = nnUNetDatasetBlosc2(str(ps_folder), list(UNLABELLED))
    pm = PlansManager(plans)
    return lab, ps, pm.get_label_manager(dj), pm.get_configuration("3d_fullres")


@pytest.mark.parametrize("batch_size,share,expected", [(4, 0.75, 3), (8, 0.75, 6), (2, 0.5, 1), (3, 0.5, 2)])
def test_every_batch_holds_the_share(run, batch_size, share, expected):
    lab, ps, lm, cm = _loader_datasets(run)
    np.random.seed(0)
    n_sec = P.secondary_count(batch_size, share)
    assert n_sec == expected
    dl = P.MixedBatchDataLoader(lab, ps, batch_size, n_sec, cm.patch_size, cm.patch_size, lm, 0.33)
    seen, positions = set(), np.zeros(batch_size)
    for _ in range(150):
        b = next(dl)
        kinds = [k in UNLABELLED for k in b["keys"]]
        assert sum(kinds) == expected and list(b["secondary"]) == kinds
        assert b["data"].shape[0] == batch_size and b["target"].shape[0] == batch_size
        seen.update(b["keys"])
        positions += b["secondary"]
    assert seen == set(lab.identifiers) | set(ps.identifiers)     # both kinds fully drawn
    assert positions.min() > 0                                     # positions shuffled per batch


def test_loader_with_nnunet_training_augmentation(run):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    lab, ps, lm, cm = _loader_datasets(run)
    ds = [[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]
    tr = nnUNetTrainer.get_training_transforms(cm.patch_size, (-0.5, 0.5), ds, (0, 1, 2), False,
                                               foreground_labels=lm.foreground_labels)
    dl = P.MixedBatchDataLoader(lab, ps, 4, 3, [24, 48, 48], cm.patch_size, lm, 0.33, tr)
    for _ in range(3):
        b = next(dl)
        assert tuple(b["data"].shape) == (4, 1, *cm.patch_size) and len(b["target"]) == 3
        assert int(b["secondary"].sum()) == 3


# ------------------------------------------------------------------------------ folds

def test_pseudo_cases_in_every_training_fold_never_in_validation(run, tmp_path, monkeypatch):
    cfg = _config_file(tmp_path, selection_file=str(run["selection"]), pseudo_share=0.75, batch_size=4)
    from flare_utils.training.splits import read_splits
    val_seen = set()
    for fold in range(5):
        t = _trainer(P.FlarePseudoStudentTrainer, run, fold, cfg, monkeypatch)
        tr, val = t.get_tr_and_val_datasets()
        splits = read_splits(DATASET)
        assert set(tr.identifiers_of("pseudo")) == set(UNLABELLED)
        assert set(tr.identifiers_of("labelled")) == set(splits[fold]["train"])
        assert set(val.identifiers) == set(splits[fold]["val"])
        assert not set(val.identifiers) & set(UNLABELLED)
        _, val_keys = t.do_split()                                   # what the final validation uses
        assert not set(val_keys) & set(UNLABELLED)
        val_seen |= set(val.identifiers)
        info = json.loads((Path(t.output_folder) / P.PSEUDO_INFO_NAME).read_text())
        assert info["pseudo_per_batch"] == 3 and info["pseudo_cases"] == UNLABELLED
        if fold == 0:
            t._set_batch_size_and_oversample()                      # what initialize() does
            assert t.batch_size == 4                                 # config batch_size, not the plan's 2
            dl = t.make_dataloader(tr, t.configuration_manager.patch_size, t.configuration_manager.patch_size,
                                   None, train=True)
            assert isinstance(dl, P.MixedBatchDataLoader) and dl.n_secondary == 3
            assert not isinstance(t.make_dataloader(val, t.configuration_manager.patch_size,
                                                    t.configuration_manager.patch_size, None, False),
                                  P.MixedBatchDataLoader)
    assert len(val_seen) == 5


def test_no_fixed_share_draws_from_the_union(run, tmp_path, monkeypatch):
    cfg = _config_file(tmp_path, selection_file=str(run["selection"]), pseudo_share=None)
    t = _trainer(P.FlarePseudoLabelTrainer, run, 0, cfg, monkeypatch)
    tr, _ = t.get_tr_and_val_datasets()
    t._set_batch_size_and_oversample()
    ps = t.configuration_manager.patch_size
    dl = t.make_dataloader(tr, ps, ps, None, train=True)
    assert not isinstance(dl, P.MixedBatchDataLoader) and set(UNLABELLED) <= set(dl.indices)
    assert json.loads((Path(t.output_folder) / P.PSEUDO_INFO_NAME).read_text())["pseudo_per_batch"] is None


def test_trainer_without_selection_file_is_an_input_error(run, tmp_path, monkeypatch):
    t = _trainer(P.FlarePseudoLabelTrainer, run, 0, _config_file(tmp_path), monkeypatch)
    with pytest.raises(FlareInputError, match="selection_file"):
        t.get_tr_and_val_datasets()
    with pytest.raises(FlareInputError, match="pseudo_share"):
        P.PseudoLabelConfig.from_dict({"pseudo_share": 1.5})


# ------------------------------------------------------------------------------ noisy student

def test_noisy_student_transforms_have_table5_parameters(run, tmp_path, monkeypatch):
    from batchgeneratorsv2.transforms.intensity.brightness import (
        MultiplicativeBrightnessTransform,
    )
    from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import (
        GaussianNoiseTransform,
    )
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import (
        SimulateLowResolutionTransform,
    )
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import (
        DownsampleSegForDSTransform,
    )

    from flare_utils.training.noisy_student import (
        FineTuneConfig,
        FlareFineTuneTrainer,
        FlareNoisyStudentTrainer,
        NoisyStudentConfig,
    )

    cfg = _config_file(tmp_path, NoisyStudentConfig, selection_file=str(run["selection"]))
    assert NoisyStudentConfig.from_json(cfg).pseudo_share == 0.75
    t = _trainer(FlareNoisyStudentTrainer, run, 0, cfg, monkeypatch)
    rot, dummy_2d, initial, mirror = t.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert np.allclose(rot, (-math.pi / 6, math.pi / 6)) and mirror == (0, 1, 2)
    assert all(i >= p for i, p in zip(initial, t.configuration_manager.patch_size))
    comp = t.get_training_transforms(t.configuration_manager.patch_size, rot, t._get_deep_supervision_scales(),
                                     mirror, dummy_2d, foreground_labels=t.label_manager.foreground_labels)

    def inner(tr):
        return getattr(tr, "transform", tr)
    by_type = {}
    for tr in comp.transforms:
        by_type.setdefault(type(inner(tr)), []).append(inner(tr))
    sp = by_type[SpatialTransform][0]
    assert np.allclose(sp.rotation, (-math.pi / 6, math.pi / 6)) and tuple(sp.scaling) == (0.7, 1.4)
    assert sp.p_rotation > 0 and sp.p_scaling > 0
    assert tuple(by_type[GaussianBlurTransform][0].blur_sigma) == (0.5, 1.5)
    assert tuple(by_type[MultiplicativeBrightnessTransform][0].multiplier_range.contrast_range) == (0.7, 1.3)
    assert tuple(by_type[ContrastTransform][0].contrast_range.contrast_range) == (0.65, 1.5)
    assert all(tuple(g.gamma.contrast_range) == (0.7, 1.5) for g in by_type[GammaTransform])
    assert GaussianNoiseTransform in by_type and SimulateLowResolutionTransform in by_type
    assert tuple(by_type[MirrorTransform][0].allowed_axes) == (0, 1, 2)
    assert isinstance(comp.transforms[-1], DownsampleSegForDSTransform)      # nnU-Net's DS structure kept
    # the augmentation runs on a patch
    out = comp(image=torch.randn(1, *initial), segmentation=torch.zeros(1, *initial, dtype=torch.int16))
    assert tuple(out["image"].shape[1:]) == tuple(t.configuration_manager.patch_size)

    # fine-tune stage: lower lr, labelled only, needs the student's checkpoint
    ft = _trainer(FlareFineTuneTrainer, run, 0, _config_file(tmp_path, FineTuneConfig, "ft.json"), monkeypatch)
    assert ft.initial_lr == 1e-3
    assert type(ft).get_training_transforms is FlareNoisyStudentTrainer.get_training_transforms
    with pytest.raises(FlareInputError, match="init_checkpoint"):
        ft.on_train_start()


# ------------------------------------------------------------------------------ end to end

def test_registered_with_nnunet():
    from flare_utils.training.registry import find_trainer
    for name in ("FlarePseudoLabelTrainer", "FlarePseudoStudentTrainer", "FlareNoisyStudentTrainer",
                 "FlareFineTuneTrainer", "FlareCPSTrainer"):
        assert find_trainer(name).__name__ == name


@pytest.mark.e2e
def test_pseudo_student_trains_and_nnunet_predictor_loads_it(run):
    from flare_utils.training.api import (
        read_learning_curves,
        read_validation_dice,
        train,
    )
    cfg = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "device": "cpu",
           "n_proc_da": 0, "export_processes": 1, "num_threads": 1, "selection_file": str(run["selection"]),
           "pseudo_share": 0.5}
    out = train(DATASET, PLANS, 0, "FlarePseudoStudentTrainer", cfg)
    assert out.name == f"FlarePseudoStudentTrainer__{PLANS}__3d_fullres"
    fd = out / "fold_0"
    for f in ("checkpoint_final.pth", "flare_training_config.json", P.PSEUDO_INFO_NAME, "validation/summary.json"):
        assert (fd / f).is_file(), f
    for f in ("plans.json", "dataset.json"):
        assert (out / f).is_file()
    ck = torch.load(fd / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["trainer_name"] == "FlarePseudoStudentTrainer" and ck["inference_allowed_mirroring_axes"] is None
    assert len(read_learning_curves(out, 0)) == 1
    assert "liver" in read_validation_dice(out).columns
    info = json.loads((fd / P.PSEUDO_INFO_NAME).read_text())
    assert info["pseudo_per_batch"] == 1 and info["batch_size"] == 2

    # nnU-Net's own predictor loads the results folder and segments a raw image
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    pred = nnUNetPredictor(tile_step_size=0.5, use_mirroring=True, perform_everything_on_device=False,
                           device=torch.device("cpu"), allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(out), (0,), "checkpoint_final.pth")
    assert pred.allowed_mirroring_axes is None and pred.trainer_name == "FlarePseudoStudentTrainer"
    img, props = SimpleITKIO().read_images([str(next((run["raw"] / "imagesTs").glob("*.nii.gz")))])
    seg = pred.predict_single_npy_array(img, props)
    assert seg.shape == img.shape[1:] and seg.max() <= 13
