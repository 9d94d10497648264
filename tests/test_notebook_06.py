"""notebooks/06_efficient_inference.ipynb end to end (papermill) on two tiny cases with the
session-trained tiny nnU-Net v2 model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

pm = pytest.importorskip("papermill")

from test_inference_support import tiny_cases, tiny_model  # noqa: E402,F401  (fixtures)
from notebook_support import outputs, tree_state  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "06_efficient_inference.ipynb"


@pytest.fixture(scope="module")
def executed(tiny_model, tiny_cases, tmp_path_factory):  # noqa: F811 (fixtures)
    root = tmp_path_factory.mktemp("nb06")
    (root / "images").mkdir()
    (root / "gt").mkdir()
    for i in (0, 1):                       # abdomen and whole body
        shutil.copy(tiny_cases / "images" / f"case{i}_0000.nii.gz", root / "images")
        shutil.copy(tiny_cases / "labels" / f"case{i}.nii.gz", root / "gt")
    out = root / "pred"
    out_nb = root / "06.out.ipynb"
    pm.execute_notebook(
        str(NOTEBOOK), str(out_nb), kernel_name="python3", progress_bar=False,
        parameters={"run_dir": str(root / "run"), "model_dir": str(tiny_model), "folds": [0],
                    "input_dir": str(root / "images"), "output_dir": str(out), "mode": "efficient",
                    "device": "cpu", "tta": False, "centre_threshold": 200, "inplane_step": 0.4,
                    "ground_truth_dir": str(root / "gt")})
    return root, out, out_nb


@pytest.mark.e2e
def test_predictions_and_reports_written(executed):
    root, out, _ = executed
    for i in (0, 1):
        pred, img = nib.load(out / f"case{i}.nii.gz"), nib.load(root / "images" / f"case{i}_0000.nii.gz")
        assert pred.shape == img.shape and np.array_equal(pred.affine, img.affine)
        assert np.asarray(pred.dataobj).dtype == np.uint8
    table = pd.read_csv(out / "efficiency" / "summary.csv")
    assert sorted(table["case_id"]) == ["case0", "case1"]
    assert (table["windows_evaluated"] <= table["windows_grid"]).all()
    assert (table["centre_threshold"] == 200).all()
    assert (table["inplane_step"] == 0.4).all()
    summary = json.loads((out / "efficiency" / "notebook_summary.json").read_text())
    assert summary["cases"] == 2 and summary["mode"] == "efficient" and summary["folds"] == [0]
    assert summary["inplane_step"] == 0.4
    assert summary["windows_evaluated"] == int(table["windows_evaluated"].sum())
    assert summary["windows_evaluated"] < summary["windows_nnunet_full"]
    assert summary["mean_dsc"] is not None and 0 <= summary["mean_dsc"] <= 1
    fig = Path(summary["figure"])
    assert fig.name == "windows_case1.png" and fig.stat().st_size > 5000      # the whole-body case


@pytest.mark.e2e
def test_executed_notebook_shows_table_and_picture(executed):
    _, _, out_nb = executed
    outs = outputs(out_nb)
    assert not [o for o in outs if o.get("output_type") == "error"]
    html = "".join(o.get("data", {}).get("text/html", "") for o in outs)
    assert "windows_evaluated" in html and "windows_nnunet_full" in html
    assert any("image/png" in o.get("data", {}) for o in outs)


def test_stored_notebook_is_clean_and_parameterised():
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    for name in ("run_dir", "model_dir", "folds", "input_dir", "output_dir", "mode", "device", "tta",
                 "centre_threshold", "inplane_step", "ground_truth_dir"):
        assert f"{name} =" in code[0].source
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)


# ---------------------------------------------------------------- a finished run, opened by setting run_dir


@pytest.fixture(scope="module")
def finished_run(tiny_model, tiny_cases, tmp_path_factory):  # noqa: F811 (fixtures)
    """A run whose infer stage the runner completed: params.yaml, two registered models (the teacher
    and a student), held-out images and labels in its raw dataset, and the stage's marker."""
    from flare_utils.study.models import register_model
    run_dir = tmp_path_factory.mktemp("nb06_run") / "run"
    raw = run_dir / "nnUNet_raw" / "Dataset990_Tiny"
    (raw / "imagesTs").mkdir(parents=True)
    (raw / "labelsTs").mkdir()
    for i in (0, 1):
        shutil.copy(tiny_cases / "images" / f"case{i}_0000.nii.gz", raw / "imagesTs")
        shutil.copy(tiny_cases / "labels" / f"case{i}.nii.gz", raw / "labelsTs")
    (run_dir / "params.yaml").write_text(yaml.safe_dump({
        "name": "nb06", "device": "cpu", "stages": ["infer"], "data": {"dataset_id": 990, "dataset_name": "Tiny"},
        "inference": {"centre_threshold": 200}}))
    for name in ("teacher", "student_selected"):
        register_model(run_dir, name, tiny_model, folds=[0], title=name, role=name.split("_")[0],
                       training_data="tiny phantom cases")
    pm.execute_notebook(str(NOTEBOOK), str(run_dir.parent / "06_runner.ipynb"), kernel_name="python3",
                        progress_bar=False, parameters={"run_dir": str(run_dir), "replace": True})   # the runner's
    (run_dir / ".flare_stages").mkdir()
    (run_dir / ".flare_stages" / "infer.json").write_text("{}")
    return run_dir


@pytest.mark.e2e
def test_stage_predicts_with_the_runs_models(finished_run):
    inference = finished_run / "inference"
    summary = json.loads((inference / "summary.json").read_text())
    assert list(summary["models"]) == ["teacher", "student_selected"] and summary["centre_threshold"] == 200
    for name in ("teacher", "student_selected"):
        assert sorted(p.name for p in (inference / name).glob("*.nii.gz")) == ["case0.nii.gz", "case1.nii.gz"]
    shown = json.loads((inference / "student_selected" / "efficiency" / "notebook_summary.json").read_text())
    assert shown["showcase"] == "student_selected" and shown["models"] == ["teacher", "student_selected"]
    assert set(shown["mean_dsc_per_model"]) == {"teacher", "student_selected"}
    assert Path(shown["figure"]).is_file()


@pytest.mark.e2e
def test_finished_run_is_shown_from_its_files_and_nothing_is_rewritten(finished_run):
    from flare_utils.inference.stage import load_inference_result
    before = tree_state(finished_run)
    out_nb = finished_run.parent / "06_show.ipynb"
    pm.execute_notebook(str(NOTEBOOK), str(out_nb), kernel_name="python3", progress_bar=False,
                        parameters={"run_dir": str(finished_run)})            # as "Run All" with run_dir set
    assert tree_state(finished_run) == before
    outs = outputs(nbformat.read(str(out_nb), as_version=4))
    assert not [o for o in outs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outs)
    assert "shown from its files" in text and "shown: student_selected" in text
    html = "".join(o.get("data", {}).get("text/html", "") for o in outs)
    assert "teacher" in html and "windows evaluated" in html and "mean DSC" in html
    assert any("image/png" in o.get("data", {}) for o in outs)
    result = load_inference_result(finished_run)
    assert list(result.overview.index) == ["teacher", "student_selected"]
    assert sorted(result.cases["case_id"]) == ["case0", "case1"] and result.wall_s is not None
    assert set(result.dsc) == {"teacher", "student_selected"} and result.figure.is_file()
    assert tree_state(finished_run) == before


@pytest.mark.e2e
def test_finished_run_refuses_other_settings_unless_sent_elsewhere(finished_run, tiny_model, tmp_path):  # noqa: F811 (fixtures)
    # another setting (the inplane step: efficient mode stays, so this costs seconds, not nnU-Net's
    # full sliding window) is refused on the finished run, and runs when sent elsewhere
    before = tree_state(finished_run)
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(NOTEBOOK), str(tmp_path / "refused.ipynb"), kernel_name="python3",
                            progress_bar=False, parameters={"run_dir": str(finished_run), "inplane_step": 0.33})
    assert "inplane_step" in e.value.evalue and "replace = True" in e.value.evalue and "output_dir" in e.value.evalue
    other = tmp_path / "elsewhere"
    pm.execute_notebook(str(NOTEBOOK), str(tmp_path / "elsewhere.ipynb"), kernel_name="python3", progress_bar=False,
                        parameters={"run_dir": str(finished_run), "inplane_step": 0.33, "output_dir": str(other),
                                    "models": {"teacher": {"path": str(tiny_model), "folds": [0]}}, "showcase": "teacher"})
    assert tree_state(finished_run) == before
    table = pd.read_csv(other / "teacher" / "efficiency" / "summary.csv")
    assert (other / "summary.json").is_file() and len(table) > 0 and (table["inplane_step"] == 0.33).all()
