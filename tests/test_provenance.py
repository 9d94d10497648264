"""provenance.json: what a run was made with, including the settings a bit-identical re-run needs
(issue 16 §1, docs/reference/determinism.md). Fast: no stage runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flare_utils.study import provenance
from flare_utils.study.params import load_params

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch):
    for k in provenance.DETERMINISM_ENV:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_demo_provenance_records_the_determinism_settings(clean_env):
    p = load_params(PROJECT / "params" / "demo.yaml", {"device": "cpu"})
    prov = json.loads(json.dumps(provenance.collect(p, "flare-study run params/demo.yaml")))
    assert prov["device"]["resolved"] == "cpu" and prov["device"]["cpu"]
    assert prov["seeds"] == {"study": 0, "phantom": 1}
    d = prov["determinism"]
    assert "bit-identical" in d["guaranteed"] and "same machine" in d["guaranteed"]
    text = " ".join(d["not_guaranteed"])
    for what in ("CPU type", "thread count", "worker count", "CUDA", "package versions", "resumed"):
        assert what in text
    # the demo fixes every training's torch threads; on CPU the trainers use at most one worker
    assert d["training_threads"] == {"teacher": 1, "pseudo_retraining": 1, "student": 1}
    assert d["augmentation_workers"] == {"teacher": 1, "pseudo_retraining": 1, "student": 1}
    assert d["deterministic_mode"] == {"teacher": False, "pseudo_retraining": False, "student": False}
    assert d["torch_threads_default"] >= 1
    assert isinstance(d["cpu_capability"], str) and d["cpu_capability"]
    assert d["onednn"] is None or d["onednn"][0].isdigit()
    assert set(d["env"]) == set(provenance.DETERMINISM_ENV) and all(v is None for v in d["env"].values())
    assert "determinism.md" in d["note"]
    assert prov["packages"]["torch"] and prov["packages"]["batchgenerators"]


def test_environment_and_params_change_what_is_recorded(clean_env):
    clean_env.setenv("FLARE_DETERMINISTIC", "1")
    clean_env.setenv("nnUNet_n_proc_DA", "0")
    clean_env.setenv("OMP_NUM_THREADS", "3")
    p = load_params(PROJECT / "params" / "smoke.yaml")
    p.teacher.num_threads, p.teacher.n_proc_da = None, 2
    p.pseudo.retrain_config = {"num_threads": 4, "deterministic": False}
    d = provenance.collect(p)["determinism"]
    assert d["training_threads"] == {"teacher": None, "pseudo_retraining": 4, "student": p.student.num_threads}
    # explicit worker counts win; null ones follow nnUNet_n_proc_DA (0 = augmentation in the main process)
    assert d["augmentation_workers"] == {"teacher": 2, "pseudo_retraining": 0, "student": 0}
    assert d["deterministic_mode"] == {"teacher": True, "pseudo_retraining": False, "student": True}
    assert d["env"]["FLARE_DETERMINISTIC"] == "1" and d["env"]["OMP_NUM_THREADS"] == "3"


def test_default_worker_count_follows_the_trainers_rule(clean_env):
    clean_env.setenv("nnUNet_n_proc_DA", "6")
    assert provenance._default_n_proc_da("cpu") == 1          # FlareTrainer.n_proc_da: at most 1 on CPU
    assert provenance._default_n_proc_da("cuda") == min(6, __import__("os").cpu_count())
    clean_env.setenv("nnUNet_n_proc_DA", "not a number")
    assert provenance._default_n_proc_da("cuda") is None


def test_write_keeps_the_previous_provenance_in_logs(tmp_path, clean_env):
    p = load_params(PROJECT / "params" / "smoke.yaml")
    first = provenance.write(tmp_path, p, "first")
    assert json.loads(first.read_text())["command"] == "first"
    provenance.write(tmp_path, p, "second")
    assert json.loads((tmp_path / "provenance.json").read_text())["command"] == "second"
    kept = list((tmp_path / "logs").glob("provenance-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["command"] == "first"
    assert "determinism" in json.loads(kept[0].read_text())
