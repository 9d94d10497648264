"""3D cross-pseudo supervision (flare_utils.training.cps) on a tiny phantom dataset."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flare_utils.errors import FlareInputError
from flare_utils.training.cps import (
    CPSConfig,
    FlareCPSTrainer,
    cps_lambda,
    netb_checkpoint_path,
)
from flare_utils.training.transfer import unwrap
from tiny_data import DATASET, UNLABELLED, build_tiny  # noqa: E402

NNUNET_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "FLARE_TRAINING_CONFIG")
PLANS = "nnUNetPlans_pseudotest"




@pytest.fixture(scope="module")
def run(tmp_path_factory):
    old = {k: os.environ.get(k) for k in NNUNET_VARS}
    src = build_tiny(tmp_path_factory.getbasetemp())
    root = tmp_path_factory.mktemp("cps_run")
    for d in ("cohort", "nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(src / d, root / d)
    from flare_utils.layout import RunLayout
    RunLayout(root).activate()
    pre = root / "nnUNet_preprocessed" / f"Dataset{DATASET}_PseudoTiny"
    yield {"root": root, "pre": pre, "raw": root / "nnUNet_raw" / f"Dataset{DATASET}_PseudoTiny"}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


BASE_CFG = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "device": "cpu",
            "n_proc_da": 0, "export_processes": 1, "num_threads": 1}


def _trainer(run, tmp_path, monkeypatch, fold=0, **kw):
    cfg = CPSConfig.from_dict({**BASE_CFG, **kw}).save(tmp_path / "cps.json")
    plans = json.loads((run["pre"] / f"{PLANS}.json").read_text())
    dj = json.loads((run["pre"] / "dataset.json").read_text())
    plans["continue_training"] = False
    monkeypatch.setenv("FLARE_TRAINING_CONFIG", str(cfg))
    return FlareCPSTrainer(plans, "3d_fullres", fold, dj, torch.device("cpu"))


def _state(net):
    return {k: v.detach().clone() for k, v in unwrap(net).state_dict().items()}


def test_cps_lambda_ramps_linearly_to_max():
    assert cps_lambda(0, 10) == 0.0
    assert cps_lambda(5, 10) == pytest.approx(0.25)
    assert cps_lambda(10, 10) == pytest.approx(0.5) and cps_lambda(500, 10) == pytest.approx(0.5)
    assert cps_lambda(3, 4, 1.0) == pytest.approx(0.75)
    assert cps_lambda(0, 0) == 0.5                               # no ramp-up: lambda_max at once
    lams = [cps_lambda(e, 40) for e in range(60)]
    assert all(b >= a for a, b in zip(lams, lams[1:])) and np.allclose(np.diff(lams[:41]), 0.5 / 40)
    with pytest.raises(FlareInputError, match="cps_rampup_epochs"):
        CPSConfig.from_dict({"cps_rampup_epochs": -1})


def test_two_networks_differ_and_both_learn(run, tmp_path, monkeypatch):
    t = _trainer(run, tmp_path, monkeypatch, num_epochs=4, cps_rampup_epochs=2, unlabelled_batch_size=3)
    t.initialize()
    a0, b0 = _state(t.network), _state(t.network_b)
    assert a0.keys() == b0.keys()
    conv = [k for k in a0 if k.endswith("weight") and a0[k].ndim == 5]
    assert all(not torch.equal(a0[k], b0[k]) for k in conv)          # independent initialisation
    assert t.optimizer is not t.optimizer_b and t.lr_scheduler is not t.lr_scheduler_b
    assert {id(p) for g in t.optimizer_b.param_groups for p in g["params"]} == \
        {id(p) for p in t.network_b.parameters()}
    assert t.inference_allowed_mirroring_axes is None or not t.mirroring_enabled

    # one minibatch = 2 labelled + 3 unlabelled patches, unlabelled first
    t.dataloader_train, t.dataloader_val = t.get_dataloaders()
    batch = next(t.dataloader_train)
    assert list(batch["secondary"]) == [True, True, True, False, False]
    assert sum(k in UNLABELLED for k in batch["keys"]) == 3 and batch["data"].shape[0] == 5
    info = json.loads((Path(t.output_folder) / "flare_cps_data.json").read_text())
    assert info["unlabelled_cases"] == UNLABELLED and info["seed_b"] == 1

    t.current_epoch = 1
    t.on_train_epoch_start()
    assert t.current_cps_lambda == pytest.approx(0.25)
    out = t.train_step(batch)
    assert np.isfinite(out["loss"]) and np.isfinite(out["cps_loss"]) and out["loss"] > out["supervised_loss"]
    a1, b1 = _state(t.network), _state(t.network_b)
    assert any(not torch.equal(a0[k], a1[k]) for k in conv)
    assert any(not torch.equal(b0[k], b1[k]) for k in conv)
    assert all(not torch.equal(a1[k], b1[k]) for k in conv)

    # the CPS term alone (no labelled sample) still trains both networks through each other's argmax
    only_unl = {**batch, "secondary": np.array([True] * 5)}
    t.loss = lambda out, tgt: out[0].sum() * 0.0                    # silence the supervised part
    t.train_step(only_unl)          # (weights would move anyway by momentum: look at the gradients)
    for net in (t.network, t.network_b):
        assert sum(float(p.grad.abs().sum()) for p in net.parameters() if p.grad is not None) > 0


def test_unlabelled_subset_and_seed(run, tmp_path, monkeypatch):
    t = _trainer(run, tmp_path, monkeypatch, unlabelled_cases=["Case_00002"], seed_b=7)
    tr, val = t.get_tr_and_val_datasets()
    assert tr.identifiers_of("unlabelled") == ["Case_00002"]
    assert not set(val.identifiers) & set(UNLABELLED) and t.seed_b == 7
    folder = t.unlabelled_folder
    assert folder.parent.name == "nnUNetPlans_pseudotest_3d_fullres_unlabelled"
    t2 = _trainer(run, tmp_path, monkeypatch, max_unlabelled_cases=2)
    assert t2.get_tr_and_val_datasets()[0].identifiers_of("unlabelled") == UNLABELLED[:2]
    t3 = _trainer(run, tmp_path, monkeypatch, unlabelled_cases=["Case_00002", "Case_00077"])
    with pytest.raises(FlareInputError, match="Case_00077"):
        t3.get_tr_and_val_datasets()


@pytest.mark.e2e
def test_cps_training_writes_both_networks_for_stock_predictor(run):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from flare_utils.training.api import read_learning_curves, train
    out = train(DATASET, PLANS, 1, "FlareCPSTrainer", {**BASE_CFG, "cps_rampup_epochs": 0, "final_validation": False})
    fd = out / "fold_1"
    a = torch.load(fd / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    b = torch.load(netb_checkpoint_path(fd / "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert netb_checkpoint_path(fd / "checkpoint_final.pth").name == "checkpoint_final_netB.pth"
    assert a["trainer_name"] == b["trainer_name"] == "FlareCPSTrainer" and b["cps_network"] == "B"
    assert a["network_weights"].keys() == b["network_weights"].keys()
    assert any(not torch.equal(a["network_weights"][k], b["network_weights"][k]) for k in a["network_weights"])
    assert not (fd / "checkpoint_latest_netB.pth").exists()
    assert len(read_learning_curves(out, 1)) == 1
    assert "CPS lambda: 0.5000" in next(fd.glob("training_log_*.txt")).read_text()
    for name, ck in (("checkpoint_final.pth", a), ("checkpoint_final_netB.pth", b)):
        p = nnUNetPredictor(perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
        p.initialize_from_trained_model_folder(str(out), (1,), name)
        for k, v in ck["network_weights"].items():
            assert torch.equal(p.list_of_parameters[0][k], v)
        x = torch.zeros(1, 16, 32, 32)
        assert p.predict_logits_from_preprocessed_data(x).shape[0] == 14
