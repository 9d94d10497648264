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

pm = pytest.importorskip("papermill")

from test_inference_support import tiny_cases, tiny_model  # noqa: E402,F401  (fixtures)

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "06_efficient_inference.ipynb"


@pytest.fixture(scope="module")
def executed(tiny_model, tiny_cases, tmp_path_factory):
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_executed_notebook_shows_table_and_picture(executed):
    _, _, out_nb = executed
    nb = nbformat.read(str(out_nb), as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "windows_evaluated" in html and "windows_nnunet_full" in html
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_stored_notebook_is_clean_and_parameterised():
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    for name in ("run_dir", "model_dir", "folds", "input_dir", "output_dir", "mode", "device", "tta",
                 "centre_threshold", "inplane_step", "ground_truth_dir"):
        assert f"{name} =" in code[0].source
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
