"""notebooks/05_student_training.ipynb end to end (papermill) on a tiny phantom dataset: the noisy-student
recipe (student on labelled + pseudo-labelled data, 1:3 batches, then the labelled fine-tune); then the same run
opened by hand (shown from its files, not retrained) and the notebook's defaults (no run_dir: a clear error)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch
import yaml
from tiny_data import DATASET, UNLABELLED, build_tiny, preserved_environ  # noqa: E402
from notebook_support import printed_and_pictures  # noqa: E402

pm = pytest.importorskip("papermill")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "05_student_training.ipynb"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    with preserved_environ():
        with preserved_environ():         # building may point nnU-Net elsewhere
            src = build_tiny(tmp_path_factory.getbasetemp())
        run_dir = tmp_path_factory.mktemp("nb05") / "run"
        for d in ("cohort", "nnUNet_raw", "nnUNet_preprocessed"):
            shutil.copytree(src / d, run_dir / d)
        from flare_utils.semisup.selection_file import write_selection_file
        raw = run_dir / "nnUNet_raw" / f"Dataset{DATASET}_PseudoTiny"
        sel = write_selection_file(run_dir / "selection" / "selected.json", UNLABELLED,
                                   run_dir / "cohort" / "SyntheticTruth" / "unlabelled_labels",
                                   raw / "imagesUnlabelled", meta={"threshold": 0.1})
        out_nb = run_dir.parent / "05.out.ipynb"
        pm.execute_notebook(str(NOTEBOOK), str(out_nb), kernel_name="python3", progress_bar=False,
                            parameters={"run_dir": str(run_dir), "replace": True, "dataset_id": DATASET,
                                        "plans": "nnUNetPlans_pseudotest", "recipe": "noisy_student",
                                        "selection_file": str(sel), "folds": [0], "epochs": 1,
                                        "iterations_per_epoch": 2, "val_iterations": 1, "device": "cpu", "seed": 0,
                                        "pseudo_share": None, "finetune_epochs": 1, "batch_size": 4,
                                        "num_threads": 1, "n_proc_da": 0})
        yield run_dir, out_nb, sel


def test_notebook_is_stored_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    for name in ("run_dir", "replace", "variant", "dataset_id", "plans", "recipe", "selection_file", "folds", "epochs",
                 "iterations_per_epoch", "val_iterations", "device", "seed", "optimizer", "initial_lr",
                 "oversample_foreground", "pseudo_share", "finetune_epochs", "batch_size", "cps_rampup_epochs",
                 "cps_lambda_max", "num_threads", "n_proc_da", "final_validation", "verbose"):
        assert f"\n{name} = " in "\n" + code[0].source, name
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)


@pytest.mark.e2e
def test_noisy_student_recipe_outputs(executed):
    run_dir, out_nb, _ = executed
    out = run_dir / "student_training" / "selected"          # variant from the selection file
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"] == "noisy_student" and summary["final_stage"] == "finetune"
    # the study keeps the final (fine-tuned) model as its own results folder, registered by name
    from flare_utils.study.models import read_models
    models = read_models(run_dir)
    assert list(models) == ["student_selected"] and models["student_selected"]["trainer"] == "FlareFineTuneTrainer"
    assert Path(models["student_selected"]["path"]) == (run_dir / "models" / "student_selected").resolve()
    assert (run_dir / "models" / "student_selected" / "fold_0" / "checkpoint_final.pth").is_file()
    assert summary["n_selected"] == 3 and summary["config"]["pseudo_share"] == 0.75
    student = Path(summary["stages"]["student"]["results_folder"])
    finetune = Path(summary["stages"]["finetune"]["results_folder"])
    assert student.name == "FlareNoisyStudentTrainer__nnUNetPlans_pseudotest__3d_fullres"
    assert finetune.name == "FlareFineTuneTrainer__nnUNetPlans_pseudotest__3d_fullres"
    info = json.loads((student / "fold_0" / "flare_pseudo_cases.json").read_text())
    assert info["pseudo_per_batch"] == 3 and info["batch_size"] == 4 and info["pseudo_cases"] == UNLABELLED
    assert not set(info["validation_cases"]) & set(UNLABELLED)
    # the fine-tune started from the student's final checkpoint, with the lower learning rate
    ft_cfg = json.loads((finetune / "fold_0" / "flare_training_config.json").read_text())
    assert ft_cfg["init_checkpoint"] == str(student / "fold_0" / "checkpoint_final.pth")
    assert ft_cfg["initial_lr"] == 1e-3
    rep = json.loads((finetune / "fold_0" / "flare_transfer_init.json").read_text())
    assert rep  # written by the base trainer's transfer init
    ck = torch.load(finetune / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["trainer_name"] == "FlareFineTuneTrainer"

    cv = pd.read_csv(out / "cv_dice.csv", index_col=0)
    assert set(cv["stage"]) == {"student", "finetune"} and "liver" in cv.columns and "mean" in cv.index
    assert cv[["liver", "mean"]].apply(lambda s: s.between(0, 1)).all().all()
    assert summary["cv_mean_dice"] == pytest.approx(float(cv[cv["stage"] == "finetune"].loc["mean", "mean"]))
    curves = pd.read_csv(out / "learning_curves.csv")
    assert len(curves) == 2 and set(curves["stage"]) == {"student", "finetune"}
    assert (out / "learning_curves.png").stat().st_size > 1000
    assert "Epoch 0" in (out / "training_console.log").read_text()      # nnU-Net's chatter kept out of the notebook

    text, images = printed_and_pictures(out_nb)
    assert "preprocessed pseudo-labelled cases" in text and "3 selected cases" in text
    assert "Epoch 0" not in text and images == 1

    # the result read back from the files is the one the stage returned (what a finished run shows)
    from flare_utils.training.student_stage import load_student_result
    r = load_student_result(run_dir, "selected")
    assert r.summary == summary and r.model_name == "student_selected" and r.out_dir == out
    assert r.model_folder == run_dir / "models" / "student_selected"
    assert r.stages == {"student": ("FlareNoisyStudentTrainer", student), "finetune": ("FlareFineTuneTrainer", finetune)}
    assert list(r.last_epoch.index) == [("student", "0"), ("finetune", "0")]
    assert r.cv_dice is not None and set(r.cv_dice["stage"]) == {"student", "finetune"}


@pytest.mark.e2e
def test_finished_run_is_shown_not_retrained(executed):
    """Opened by hand with only run_dir on a run whose student stage is complete (params.yaml + the runner's
    marker): the notebook shows the run's study student (its first variant) from its files and trains nothing."""
    run_dir, _, sel = executed
    params = {"stages": ["student"], "device": "cpu", "data": {"dataset_id": DATASET, "dataset_name": "PseudoTiny"},
              "student": {"plans": "nnUNetPlans_pseudotest", "recipe": "noisy_student", "selection_file": str(sel),
                          "variants": ["selected"], "folds": [0], "epochs": 1, "iterations_per_epoch": 2,
                          "val_iterations": 1, "finetune_epochs": 1, "batch_size": 4, "num_threads": 1,
                          "n_proc_da": 0}}
    marker = run_dir / ".flare_stages" / "student__selected.json"
    files = [*sorted((run_dir / "student_training" / "selected").iterdir()), run_dir / "models.json",
             *sorted((run_dir / "nnUNet_results").rglob("checkpoint_final.pth")),
             *sorted((run_dir / "models").rglob("checkpoint_final.pth"))]
    stamps = [p.stat().st_mtime_ns for p in files]
    try:
        (run_dir / "params.yaml").write_text(yaml.safe_dump(params))
        marker.parent.mkdir(exist_ok=True)
        marker.write_text(json.dumps({"unit": "student:selected"}))
        shown = run_dir.parent / "05.shown.ipynb"
        with preserved_environ():
            pm.execute_notebook(str(NOTEBOOK), str(shown), kernel_name="python3", progress_bar=False,
                                parameters={"run_dir": str(run_dir)})
        assert [p.stat().st_mtime_ns for p in files] == stamps               # nothing rewritten
        text, images = printed_and_pictures(shown)
        assert "finished student 'selected'" in text and "preprocessed pseudo-labelled cases" not in text
        assert "FlareFineTuneTrainer" in text and "cv_mean_dice" in text and images == 1
    finally:
        for p in (run_dir / "params.yaml", marker):
            p.unlink(missing_ok=True)
