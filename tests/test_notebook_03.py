"""notebooks/03_pseudo_labels.ipynb end to end (papermill): a tiny real nnU-Net teacher (2 folds),
K = 2 rounds with a minimal retraining of FlarePseudoLabelTrainer, on 3 synthetic cases with truth."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest

pm = pytest.importorskip("papermill")

from flare_utils.semisup import rounds as pseudo  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "03_pseudo_labels.ipynb"
# Same request as tests/test_pseudo.py: one training per pytest session serves both files.
DEMO_MODEL = dict(dataset_id=957, name="PseudoSmoke", n_cases=5, fov="abdomen", patch_zyx=(16, 16, 16),
                  spacing_zyx=(24.0, 24.0, 24.0), epochs=1, iterations=4, extra_folds=(1,))


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    from demo_model import train_demo_model
    from flare_utils.synthetic.phantom import write_cohort
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        shared = train_demo_model(tmp_path_factory.getbasetemp() / "flare_pseudo_demo_model", **DEMO_MODEL)
    model_run = shared.parents[2]                                 # <run>/nnUNet_results/<dataset>/<model>
    run_dir = tmp_path_factory.mktemp("nb03") / "run"
    shutil.copytree(model_run, run_dir, ignore=shutil.ignore_patterns("pseudo_labels", "*.log"))
    teacher = run_dir / shared.relative_to(model_run)
    cohort = write_cohort(run_dir / "synthetic_cohort", 0, 3, 0, preset="tiny", fov_mix="abdomen", seed=11)
    out_nb = run_dir.parent / "03_pseudo_labels.out.ipynb"
    pm.execute_notebook(
        str(NOTEBOOK), str(out_nb), kernel_name="python3", progress_bar=False,
        parameters={
            "run_dir": str(run_dir), "dataset_id": 957, "teacher_results": str(teacher),
            "unlabelled_dir": str(cohort.root / "Training" / "FLARE22_UnlabeledCase"),
            "rounds": 2, "folds": [0, 1], "tta": False, "device": "cpu", "seed": 0,
            "retrain_epochs": 1, "retrain_iterations": 2,
            "retrain_config": {"num_val_iterations_per_epoch": 1, "n_proc_da": 0, "num_threads": 1},
            "truth_dir": "", "processes": 1, "torch_threads": 1,
        })
    return run_dir, teacher, out_nb


@pytest.mark.e2e
def test_rounds_and_retrained_model(executed):
    from flare_utils.semisup.selection_file import read_selection_file
    run_dir, teacher, _ = executed
    cases = ["Case_00001", "Case_00002", "Case_00003"]
    assert pseudo.completed_rounds(run_dir) == [1, 2]
    r1, r2 = pseudo.read_round(run_dir, 1), pseudo.read_round(run_dir, 2)
    assert r1.cases == r2.cases == cases
    assert r1.model == str(teacher.resolve()) and r1.folds == ["0", "1"] and r1.mode == "full"
    for k in (1, 2):
        assert sorted(p.name for p in pseudo.round_dir(run_dir, k).glob("*.nii.gz")) == [f"{c}.nii.gz" for c in cases]
    model = pseudo.round_dir(run_dir, 2) / "model"
    assert r2.model == str(model.resolve()) and r2.folds == ["all"]
    assert (model / "fold_all" / "checkpoint_final.pth").is_file()
    assert r2.training["trainer"] == "FlarePseudoLabelTrainer" and r2.training["n_pseudo"] == 3
    assert r2.training["config"]["num_epochs"] == 1 and r2.training["config"]["num_iterations_per_epoch"] == 2
    info = json.loads((model / "fold_all" / "flare_pseudo_cases.json").read_text())
    assert info["pseudo_cases"] == cases                          # ALL round-1 cases were trained on
    sel = read_selection_file(pseudo.round_dir(run_dir, 2) / "training_selection.json")
    assert list(sel.cases) == cases and sel.labels_folder == pseudo.round_dir(run_dir, 1).resolve()


@pytest.mark.e2e
def test_report_tables_and_figures(executed):
    run_dir, _, out_nb = executed
    out = run_dir / "pseudo_labels" / "report"
    rounds = pd.read_csv(out / "rounds.csv", index_col=0)
    assert list(rounds.index) == [1, 2] and list(rounds["cases"]) == [3, 3]
    agree = pd.read_csv(out / "agreement_per_case.csv")
    assert len(agree) == 3 and set(agree["round"]) == {2} and agree["changed_fraction"].between(0, 1).all()
    assert len(pd.read_csv(out / "agreement_dsc_per_organ.csv", index_col=0)) == 13
    vols = pd.read_csv(out / "volumes_per_round.csv", index_col=0)
    assert list(vols.columns) == ["round 1", "round 2"] and vols.index[0] == "Liver"
    quality = pd.read_csv(out / "quality_per_round.csv", index_col=0)   # truth found in the synthetic cohort
    assert list(quality.index) == ["round 1", "round 2"] and list(quality["count"]) == [3, 3]
    for name in ("memory_per_case.png", "agreement_changed.png", "volumes_per_round.png", "quality_per_round.png"):
        assert (out / name).stat().st_size > 1000
    nb = nbformat.read(str(out_nb), as_version=4)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 4
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "round 1: RSS after case 3" in text
    assert "round 2: 3/3 predicted" in text                       # progress stays in the notebook ...
    assert "Epoch 0" not in text                                   # ... nnU-Net's console goes to the log
    assert "Epoch 0" in (out / "training_console.log").read_text()


def test_stored_notebook_is_clean_and_parameterised():
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    for name in ("run_dir", "dataset_id", "teacher_results", "plans", "rounds", "folds", "tta", "device", "seed",
                 "retrain_epochs", "retrain_iterations", "truth_dir", "verbose"):
        assert f"{name} =" in code[0].source
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
