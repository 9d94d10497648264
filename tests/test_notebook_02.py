"""notebooks/02_teacher_training.ipynb end to end (papermill) on a tiny phantom dataset: planning of a unit-test
scale teacher plan plus the student's efficient_demo plan, a custom 2-fold split with a forced training case,
1 epoch x 2 iterations per fold with nnU-Net's final validation; then the same run opened by hand (shown from its
files, not retrained) and the notebook's defaults (no run_dir: a clear error)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch
import yaml

pm = pytest.importorskip("papermill")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "02_teacher_training.ipynb"
from tiny_data import preserved_environ  # noqa: E402
from notebook_support import printed_and_pictures  # noqa: E402
DATASET = 512
NAME = "TeacherTiny"
TINY_PLAN = {"name": "teachertest", "description": "unit-test scale teacher", "base_features": 4, "max_features": 32,
             "n_conv_per_stage": 1, "n_downsamplings": 2, "patch_size_zyx": [16, 32, 32],
             "spacing_zyx": [8.0, 8.0, 8.0], "batch_size": 2}
PARAMETERS = ("run_dir", "replace", "dataset_id", "plan_variants", "plans", "trainer", "folds", "epochs",
              "iterations_per_epoch", "val_iterations", "device", "seed", "loss", "optimizer", "initial_lr",
              "oversample_foreground", "mirroring", "init_checkpoint", "freeze_encoder_stages", "splits",
              "batch_size", "num_threads", "n_proc_da", "final_validation", "processes", "verify", "verbose")


def build_tiny_raw(base: Path) -> Path:
    """A converted tiny phantom dataset (5 labelled cases, nnU-Net raw only), shared per session."""
    root = base / "flare_tiny_teacher"
    if (root / ".complete").is_file():
        return root
    if root.exists():
        shutil.rmtree(root)
    from flare_utils.data.convert import convert_flare22
    from flare_utils.synthetic.phantom import write_cohort
    write_cohort(root / "cohort", 5, 0, 0, preset="tiny", fov_mix="abdomen")
    convert_flare22(root / "cohort", root / "nnUNet_raw", DATASET, NAME)
    (root / ".complete").write_text("ok")
    return root


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    with preserved_environ():
        src = build_tiny_raw(tmp_path_factory.getbasetemp())
        run_dir = tmp_path_factory.mktemp("nb02") / "run"
        shutil.copytree(src / "nnUNet_raw", run_dir / "nnUNet_raw")
        cases = sorted(p.name[:-len(".nii.gz")] for p in (run_dir / "nnUNet_raw" / f"Dataset{DATASET}_{NAME}" /
                                                           "labelsTr").glob("*.nii.gz"))
        assert len(cases) == 5
        splits = {"n_folds": 2, "always_train": [cases[0]]}          # a "difficult" case in every training set
        out_nb = run_dir.parent / "02.out.ipynb"
        pm.execute_notebook(str(NOTEBOOK), str(out_nb), kernel_name="python3", progress_bar=False,
                            parameters={"run_dir": str(run_dir), "replace": True, "dataset_id": DATASET,
                                        "plan_variants": [TINY_PLAN, "efficient_demo"], "plans": "teachertest",
                                        "folds": [0, 1], "epochs": 1, "iterations_per_epoch": 2, "val_iterations": 1,
                                        "device": "cpu", "seed": 0, "splits": splits, "num_threads": 1,
                                        "n_proc_da": 0, "verify": False})
    yield run_dir, out_nb, cases


def test_notebook_is_stored_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    for name in PARAMETERS:
        assert f"\n{name} = " in "\n" + code[0].source, name
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)


@pytest.mark.e2e
def test_teacher_outputs(executed):
    run_dir, out_nb, cases = executed
    out = run_dir / "teacher"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plans"] == "nnUNetPlans_teachertest" and summary["trainer"] == "FlareTeacherTrainer"
    assert summary["folds"] == ["0", "1"]
    assert summary["planned"] == {"teachertest": "nnUNetPlans_teachertest", "efficient_demo": "nnUNetPlans_efficient_demo"}
    results = Path(summary["results_folder"])
    assert results == run_dir.resolve() / "nnUNet_results" / f"Dataset{DATASET}_{NAME}" / \
        "FlareTeacherTrainer__nnUNetPlans_teachertest__3d_fullres"
    for f in (0, 1):
        ck = torch.load(results / f"fold_{f}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        assert ck["trainer_name"] == "FlareTeacherTrainer"
        assert (results / f"fold_{f}" / "validation" / "summary.json").is_file()
        cfg = json.loads((results / f"fold_{f}" / "flare_training_config.json").read_text())
        assert cfg["num_epochs"] == 1 and cfg["loss"] == "dice_ce" and cfg["init_checkpoint"] is None
    # the student's plan is ready too (planned and preprocessed here)
    pre = run_dir / "nnUNet_preprocessed" / f"Dataset{DATASET}_{NAME}"
    assert len(list((pre / "nnUNetPlans_efficient_demo_3d_fullres").glob("*.pkl"))) == 5
    # the custom split: the forced case trains in every fold and is never validated
    split = json.loads((pre / "splits_final.json").read_text())
    assert len(split) == 2 and all(cases[0] in s["train"] and cases[0] not in s["val"] for s in split)
    splits_csv = pd.read_csv(out / "splits.csv", index_col=0)
    assert list(splits_csv["n_val"]) == [2, 2] and list(splits_csv["n_train"]) == [3, 3]

    plans = pd.read_csv(out / "plans.csv", index_col=0)
    assert plans.loc["nnUNetPlans_teachertest", "role"] == "teacher"
    assert plans.loc["nnUNetPlans_teachertest", "patch (z,y,x)"] == "16x32x32"
    assert 84e6 < plans.loc["accurate (full size)", "parameters"] < 86e6            # paper: 82M
    assert 5.4e6 < plans.loc["efficient (full size)", "parameters"] < 5.8e6          # paper: 5.4M
    assert plans.loc["accurate (full size)", "reported (M)"] == pytest.approx(82.0)
    assert summary["parameters"] == plans.loc["nnUNetPlans_teachertest", "parameters"]

    curves = pd.read_csv(out / "learning_curves.csv")
    assert len(curves) == 2 and sorted(curves["fold"]) == [0, 1]
    assert curves[["train_loss", "val_loss"]].notna().all().all()
    assert (out / "learning_curves.png").stat().st_size > 1000
    cv = pd.read_csv(out / "cv_dice.csv", index_col=0)
    assert list(cv.columns) == ["fold 0", "fold 1", "mean"] and "liver" in cv.index and "mean" in cv.index
    assert cv.loc["liver"].between(0, 1).all()
    assert summary["cv_dice"]["liver"] == pytest.approx(cv.loc["liver", "mean"])
    assert summary["cv_mean_dice"] == pytest.approx(cv.loc["mean", "mean"])
    assert "Epoch 0" in (out / "training_console.log").read_text()   # nnU-Net's chatter kept out of the notebook

    text, images = printed_and_pictures(out_nb)
    assert "Epoch 0" not in text and "custom split written" in text
    assert images >= 1                                                   # the learning-curve figure rendered

    # the result read back from the files is the one the stage returned (what a finished run shows)
    from flare_utils.training.teacher_stage import load_teacher_result
    r = load_teacher_result(run_dir)
    assert r.summary == summary and r.results_folder == results and r.figure == out / "learning_curves.png"
    assert r.plans.loc["nnUNetPlans_teachertest", "role"] == "teacher" and r.plans.loc["accurate (full size)",
                                                                                        "role"] == "paper"
    assert list(r.splits["n_val"]) == [2, 2] and list(r.last_epoch.index) == ["0", "1"]
    assert list(r.last_epoch.columns[:3]) == ["epoch", "train_loss", "val_loss"]
    assert r.cv_dice.loc["liver", "mean"] == pytest.approx(summary["cv_dice"]["liver"])
    from flare_utils.study.models import read_models
    assert read_models(run_dir)["teacher"]["path"] == str(results)
    assert json.loads((run_dir / "models.json").read_text())["teacher"]["path"] == \
        "nnUNet_results/Dataset512_TeacherTiny/FlareTeacherTrainer__nnUNetPlans_teachertest__3d_fullres"   # run-relative


@pytest.mark.e2e
def test_finished_run_is_shown_not_retrained(executed):
    """Opened by hand with only run_dir on a run whose teacher stage is complete (params.yaml + the runner's
    marker): the notebook shows the stage's files and trains nothing; a changed setting is refused."""
    run_dir, _, cases = executed
    params = {"stages": ["teacher"], "device": "cpu", "data": {"dataset_id": DATASET, "dataset_name": NAME},
              "teacher": {"plan_variants": [TINY_PLAN, "efficient_demo"], "plans": "teachertest", "folds": [0, 1],
                          "epochs": 1, "iterations_per_epoch": 2, "val_iterations": 1, "num_threads": 1,
                          "n_proc_da": 0, "splits": {"n_folds": 2, "always_train": [cases[0]]}}}
    marker = run_dir / ".flare_stages" / "teacher.json"
    written = [run_dir / "params.yaml", marker]
    files = [*sorted((run_dir / "teacher").iterdir()), run_dir / "models.json",
             *sorted((run_dir / "nnUNet_results").rglob("checkpoint_final.pth"))]
    stamps = [p.stat().st_mtime_ns for p in files]
    try:
        (run_dir / "params.yaml").write_text(yaml.safe_dump(params))
        marker.parent.mkdir(exist_ok=True)
        marker.write_text(json.dumps({"unit": "teacher"}))
        shown = run_dir.parent / "02.shown.ipynb"
        with preserved_environ():
            pm.execute_notebook(str(NOTEBOOK), str(shown), kernel_name="python3", progress_bar=False,
                                parameters={"run_dir": str(run_dir)})
        assert [p.stat().st_mtime_ns for p in files] == stamps               # nothing rewritten
        text, images = printed_and_pictures(shown)
        assert "shown from its files" in text and "custom split written" not in text and images == 1
        assert "nnUNetPlans_teachertest" in text and "cv_mean_dice" in text
        with preserved_environ(), pytest.raises(pm.PapermillExecutionError) as e:
            pm.execute_notebook(str(NOTEBOOK), str(run_dir.parent / "02.refused.ipynb"), kernel_name="python3",
                                progress_bar=False, parameters={"run_dir": str(run_dir), "epochs": 3})
        assert e.value.ename == "FlareInputError" and "epochs" in e.value.evalue and "replace" in e.value.evalue
        assert [p.stat().st_mtime_ns for p in files] == stamps
    finally:                  # the next test re-runs the notebook on this folder by its parameters
        for p in written:
            p.unlink(missing_ok=True)


@pytest.mark.e2e
def test_rerun_with_transfer_batch_size_and_fold_all(executed):
    """Re-run in the same run folder: preprocessed data and split reused; transfer init from fold 0 with a frozen
    stage, Dice loss, no mirroring, batch size 3 (a plans copy), nnU-Net's fold "all", no final validation."""
    run_dir, _, _ = executed
    pre = run_dir / "nnUNet_preprocessed" / f"Dataset{DATASET}_{NAME}"
    data = sorted((pre / "nnUNetPlans_teachertest_3d_fullres").glob("*.pkl"))
    stamps = [p.stat().st_mtime_ns for p in data]
    split = (pre / "splits_final.json").read_text()
    teacher = Path(json.loads((run_dir / "teacher" / "summary.json").read_text())["results_folder"])
    init = teacher / "fold_0" / "checkpoint_final.pth"
    out_nb = run_dir.parent / "02b.out.ipynb"
    with preserved_environ():
        pm.execute_notebook(str(NOTEBOOK), str(out_nb), kernel_name="python3", progress_bar=False,
                            parameters={"run_dir": str(run_dir), "replace": True, "dataset_id": DATASET,
                                        "plan_variants": [TINY_PLAN],
                                        "plans": "teachertest", "folds": "all", "epochs": 1, "iterations_per_epoch": 2,
                                        "val_iterations": 1, "device": "cpu", "loss": "dice", "mirroring": False,
                                        "init_checkpoint": str(init), "freeze_encoder_stages": 1, "batch_size": 3,
                                        "final_validation": False, "num_threads": 1, "n_proc_da": 0,
                                        "verify": False})
    assert [p.stat().st_mtime_ns for p in data] == stamps                 # preprocessing reused
    assert (pre / "splits_final.json").read_text() == split                # existing split kept
    out = run_dir / "teacher"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plans"] == "nnUNetPlans_teachertest_bs3" and summary["preprocessed_plans"] == "nnUNetPlans_teachertest"
    assert summary["folds"] == ["all"] and summary["cv_dice"] is None and not (out / "cv_dice.csv").exists()
    fold = Path(summary["results_folder"]) / "fold_all"
    assert Path(summary["results_folder"]).name == "FlareTeacherTrainer__nnUNetPlans_teachertest_bs3__3d_fullres"
    assert json.loads((fold / "debug.json").read_text())["batch_size"] in (3, "3")
    cfg = json.loads((fold / "flare_training_config.json").read_text())
    assert cfg["loss"] == "dice" and cfg["mirroring"] is False and cfg["init_checkpoint"] == str(init)
    assert cfg["freeze_encoder_stages"] == 1 and (fold / "flare_transfer_init.json").is_file()
    assert (fold / "checkpoint_final.pth").is_file()
    assert len(pd.read_csv(out / "learning_curves.csv")) == 1
