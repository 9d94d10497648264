"""Multi-GPU training through nnU-Net's DDP (flare_utils.training.ddp), run here as 2 CPU ranks over gloo.

The same code path as on GPUs (spawned ranks, nnU-Net's batch split, DDP-wrapped network, rank 0
checkpoints), except for the backend/device (gloo, cpu instead of nccl, cuda:<rank>).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from flare_utils.errors import FlareInputError
from flare_utils.training import ddp as D

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_data import DATASET, NNUNET_VARS, UNLABELLED, build_tiny, preserved_environ  # noqa: E402

PLANS = "nnUNetPlans_pseudotest"          # batch size 2: one sample per rank
TINY = {"num_epochs": 2, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "device": "cpu",
        "n_proc_da": 0, "export_processes": 1, "num_threads": 1, "seed": 3}


# ---------------------------------------------------------------------------------- pure functions

def test_rank_batch_split_is_nnunets():
    assert D.rank_batch_sizes(2, 2) == [1, 1]
    assert D.rank_batch_sizes(5, 2) == [3, 2]
    assert D.rank_batch_sizes(7, 3) == [3, 2, 2]
    with pytest.raises(FlareInputError, match="smaller than num_gpus"):
        D.rank_batch_sizes(1, 2)


def test_pseudo_samples_are_spread_over_the_ranks():
    from flare_utils.training.with_pseudo_labels import secondary_count
    assert D.rank_secondary_counts(4, 2, 2) == [1, 1]
    assert D.rank_secondary_counts(2, 1, 2) == [0, 1]
    for b, w, share in [(4, 2, 0.5), (8, 3, 0.25), (6, 4, 0.75), (3, 3, 1.0), (5, 2, 0.0)]:
        n = secondary_count(b, share)
        counts = D.rank_secondary_counts(b, n, w)
        assert sum(counts) == n
        assert all(0 <= c <= s for c, s in zip(counts, D.rank_batch_sizes(b, w)))


def test_launch_checks_say_what_is_wrong():
    from flare_utils.training.cps import FlareCPSTrainer
    from flare_utils.training.trainers import FlareTeacherTrainer
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(FlareInputError, match="num_gpus must be an integer >= 1"):
            D.check_num_gpus(bad)
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(FlareInputError, match=f"num_gpus={n_cuda + 1} but {n_cuda} CUDA device"):
        D.check_launch(n_cuda + 1, "auto", 64, FlareTeacherTrainer)
    with pytest.raises(FlareInputError, match="device 'cuda' or 'auto'"):
        D.check_launch(2, "mps", 2, FlareTeacherTrainer)
    with pytest.raises(FlareInputError, match=r"batch size \(1\) is smaller than num_gpus \(2\)"):
        D.check_launch(2, "cpu", 1, FlareTeacherTrainer)
    with pytest.raises(FlareInputError, match="does not support DDP"):
        D.check_launch(2, "cpu", 2, FlareCPSTrainer)
    with pytest.raises(FlareInputError, match="needs a FLARE trainer"):
        D.check_launch(2, "cpu", 2, nnUNetTrainer)
    assert D.check_launch(2, "cpu", 2, FlareTeacherTrainer) == "gloo"


# ---------------------------------------------------------------------------------- 2 CPU ranks

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from flare_utils.layout import RunLayout
    from flare_utils.semisup import selection_file as S
    from flare_utils.training import write_splits
    src = build_tiny(tmp_path_factory.getbasetemp())
    root = tmp_path_factory.mktemp("ddp_run")
    for d in ("cohort", "nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(src / d, root / d)
    with preserved_environ((*NNUNET_VARS, D.TIMEOUT_ENV)):
        os.environ[D.TIMEOUT_ENV] = "120"        # a stuck collective fails the test instead of hanging it
        RunLayout(root).activate()
        write_splits(DATASET, {"n_folds": 5})
        raw = root / "nnUNet_raw" / f"Dataset{DATASET}_PseudoTiny"
        sel = S.write_selection_file(root / "selection.json", UNLABELLED, root / "cohort" / "SyntheticTruth" /
                                     "unlabelled_labels", raw / "imagesUnlabelled", meta={"round": 1})
        yield {"root": root, "selection": sel}


def test_num_gpus_is_checked_before_anything_is_spawned(run):
    from flare_utils.training import train
    with pytest.raises(FlareInputError, match="num_gpus must be an integer"):
        train(DATASET, PLANS, 0, "FlareTeacherTrainer", TINY, run_dir=run["root"], num_gpus=0)
    with pytest.raises(FlareInputError, match="smaller than num_gpus"):
        train(DATASET, PLANS, 0, "FlareTeacherTrainer", TINY, run_dir=run["root"], num_gpus=3)


def _checks_common(fold_dir: Path, cfg: dict, global_bs: int):
    ranks = D.read_rank_info(fold_dir)
    assert [r["rank"] for r in ranks] == [0, 1]                   # both ranks ran ...
    for r in ranks:
        assert (r["world_size"], r["backend"], r["device"]) == (2, "gloo", "cpu")
        assert r["global_batch_size"] == global_bs
        # ... with the FLARE config from FLARE_TRAINING_CONFIG (budget) and trained all of it
        assert (r["num_epochs"], r["num_iterations_per_epoch"]) == (cfg["num_epochs"], cfg["num_iterations_per_epoch"])
        assert r["current_epoch"] == cfg["num_epochs"]
        assert r["train_steps"] == cfg["num_epochs"] * cfg["num_iterations_per_epoch"]
        assert r["config_file"] and Path(r["config_file"]).is_file()
    assert sum(r["batch_size"] for r in ranks) == global_bs       # nnU-Net's batch split
    seeds = [r["data_seed"] for r in ranks]
    assert seeds == [cfg["seed"] + 1, cfg["seed"] + 1001]          # rank 0 as a 1-process run, rank 1 shifted
    ck = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["current_epoch"] == cfg["num_epochs"]
    assert len(ck["logging"]["train_losses"]) == cfg["num_epochs"]
    assert not any(k.startswith("module.") for k in ck["network_weights"])
    saved = json.loads((fold_dir / "flare_training_config.json").read_text())
    assert all(saved[k] == v for k, v in cfg.items())
    return ranks, ck


@pytest.mark.e2e
def test_teacher_trains_on_two_cpu_ranks(run):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from flare_utils.training import train
    with preserved_environ(NNUNET_VARS):
        out = train(DATASET, PLANS, 0, "FlareTeacherTrainer", TINY, run_dir=run["root"], num_gpus=2)
    fold = out / "fold_0"
    ranks, ck = _checks_common(fold, TINY, global_bs=2)
    assert [r["batch_size"] for r in ranks] == [1, 1]
    assert ck["trainer_name"] == "FlareTeacherTrainer"
    assert (fold / "validation" / "summary.json").is_file()        # DDP final validation (cases split over ranks)
    p = nnUNetPredictor(device=torch.device("cpu"), verbose=False)  # the checkpoint loads as a normal model
    p.initialize_from_trained_model_folder(str(out), use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    assert p.trainer_name == "FlareTeacherTrainer"


@pytest.mark.slow          # beyond CI's budget; the teacher's DDP run above stays in CI
@pytest.mark.e2e
def test_pseudo_label_trainer_mixes_pseudo_cases_on_every_rank(run):
    from flare_utils.training import train
    cfg = {**TINY, "num_epochs": 1, "selection_file": str(run["selection"]), "pseudo_share": 0.5, "batch_size": 4,
           "final_validation": False, "freeze_encoder_stages": 1}     # frozen before DDP registers the parameters
    with preserved_environ(NNUNET_VARS):
        out = train(DATASET, PLANS, 1, "FlarePseudoLabelTrainer", cfg, run_dir=run["root"], num_gpus=2)
    fold = out / "fold_1"
    ranks, ck = _checks_common(fold, cfg, global_bs=4)              # config batch_size = global batch size
    assert [r["batch_size"] for r in ranks] == [2, 2]
    for r in ranks:                                                  # the pseudo cases are in every rank's data
        assert r["pseudo_cases"] == UNLABELLED
        assert r["pseudo_per_batch"] == 1                            # 2 of 4 globally, one per rank
        assert r["frozen_parameters"] > 0                            # freezing applied on every rank
    info = json.loads((fold / "flare_pseudo_cases.json").read_text())
    assert info["pseudo_cases"] == UNLABELLED and info["batch_size"] == 4 and info["pseudo_per_batch"] == 2
    assert info["ddp"] == {"world_size": 2}
    assert ck["trainer_name"] == "FlarePseudoLabelTrainer"


def test_a_failing_rank_reports_its_traceback_and_nothing_hangs(run, tmp_path):
    """A rank that raises leaves with its traceback in the caller's error (ranks end with os._exit,
    not through torch.distributed's teardown, which can deadlock at exit)."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**TINY, "device": "cpu"}))
    with preserved_environ(NNUNET_VARS):
        with pytest.raises(RuntimeError, match=r"(?s)DDP training: rank [01] failed:.*Traceback.*99999"):
            D.launch(99999, "3d_fullres", 0, "FlareTeacherTrainer", PLANS, cfg, 2, "gloo")


# ---------------------------------------------------------------------------------- params

def test_params_num_gpus_absent_from_one_gpu_parameters(tmp_path):
    """num_gpus 1 (the default) leaves the stages' parameters - and so existing runs' completion
    keys - as they were; > 1 travels to the teacher, pseudo (retraining) and student notebooks."""
    from flare_utils.layout import RunLayout
    from flare_utils.semisup.rounds import _retrain_request
    from flare_utils.study.params import load_params
    from flare_utils.study.runner import _pseudo_parameters, _student_parameters, _teacher_parameters
    run = RunLayout(tmp_path / "r")
    base = {"run_dir": str(run.root)}
    for params in (load_params(base), load_params({**base, "teacher": {"num_gpus": 1}})):
        assert "num_gpus" not in _teacher_parameters(params, run)
        assert "num_gpus" not in _pseudo_parameters(params, run)
        assert "num_gpus" not in _student_parameters(params, run, "labelled_only")
    p = load_params({**base, "device": "cuda", "teacher": {"num_gpus": 2}, "pseudo": {"num_gpus": 4},
                     "student": {"num_gpus": 3}})
    assert _teacher_parameters(p, run)["num_gpus"] == 2
    assert _pseudo_parameters(p, run)["num_gpus"] == 4
    assert _student_parameters(p, run, "labelled_only")["num_gpus"] == 3
    assert "num_gpus" not in _retrain_request("P", {"num_epochs": 1}, "T", ["all"], 0)
    assert _retrain_request("P", {"num_epochs": 1}, "T", ["all"], 0, 1) == \
        _retrain_request("P", {"num_epochs": 1}, "T", ["all"], 0)
    assert _retrain_request("P", {}, "T", ["all"], 0, 2)["num_gpus"] == 2


def test_params_num_gpus_checks(tmp_path):
    from flare_utils.study.params import load_params
    base = {"run_dir": str(tmp_path / "r")}
    load_params({**base, "device": "auto", "teacher": {"num_gpus": 2}})         # fine (checked at training)
    with pytest.raises(FlareInputError) as e:
        load_params({**base, "device": "cpu", "teacher": {"num_gpus": 2}, "pseudo": {"num_gpus": 0},
                     "student": {"num_gpus": 2, "recipe": "cps"}})
    msg = str(e.value)
    assert "params.teacher.num_gpus: 2 GPUs (DDP) needs params.device cuda or auto" in msg
    assert "params.pseudo.num_gpus: must be an integer >= 1" in msg
    assert "params.student.num_gpus: the cps recipe trains on one GPU only" in msg
