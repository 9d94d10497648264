"""notebooks/07_evaluation.ipynb end to end on three tiny cases and two prediction sets (papermill)."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

pytest.importorskip("flare_utils.evaluation.evaluate")
pm = pytest.importorskip("papermill")

from flare_utils.evaluation.efficiency import EfficiencyReport  # noqa: E402
from notebook_support import outputs, tree_state  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "07_evaluation.ipynb"
SPACING = (1.5, 1.5, 3.0)
SHAPE = (24, 24, 12)


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([*SPACING, 1.0])), str(path))


def _case(i: int) -> tuple[np.ndarray, np.ndarray]:
    lab = np.zeros(SHAPE, np.uint8)
    lab[3 + i:13 + i, 4:14, 2:10] = 1         # liver
    lab[16:20, 5:9, 4:8] = 2                  # right kidney
    lab[15:21, 15:21, 3:9] = 3                # spleen
    lab[10:12, 18:20, 1:11] = 5               # aorta
    img = np.full(SHAPE, -800.0, np.float32)
    img[lab > 0] = 50.0 + 10 * lab[lab > 0]
    return img, lab


def _perturb(lab: np.ndarray, i: int) -> np.ndarray:
    p = lab.copy()
    p[p == 1] = 0
    p[np.roll(lab == 1, 2, axis=0)] = 1       # liver shifted by two voxels
    if i == 2:
        p[p == 2] = 0                         # right kidney missed in the last case
    return p


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """images/, gt/, preds_a/ (perfect), preds_b/ (perturbed) and timing_a.json in one folder."""
    root = tmp_path_factory.mktemp("nb07")
    for i in range(3):
        img, lab = _case(i)
        _save(img, root / "images" / f"case_{i:04d}_0000.nii.gz")
        _save(lab, root / "gt" / f"case_{i:04d}.nii.gz")
        _save(lab, root / "preds_a" / f"case_{i:04d}.nii.gz")
        _save(_perturb(lab, i), root / "preds_b" / f"case_{i:04d}.nii.gz")
    timing = root / "timing_a.json"
    timing.write_text(json.dumps(EfficiencyReport(
        wall_s=12.5, peak_rss_mib=3100.0, cpu_util_mean=48.0, cpu_auc=600.0, gpu_mem_peak_mib=None,
        gpu_auc=None, samples=125, device="cpu").to_dict()))
    return root


@pytest.fixture(scope="module")
def executed(cases):
    root = cases
    timing = root / "timing_a.json"
    run_dir = root / "run"
    out_nb = root / "07_evaluation.out.ipynb"
    pm.execute_notebook(
        str(NOTEBOOK), str(out_nb), kernel_name="python3", progress_bar=False,
        parameters={
            "run_dir": str(run_dir),
            "ground_truth_dir": str(root / "gt"),
            "image_dir": str(root / "images"),
            "prediction_sets": {"labelled only": str(root / "preds_a"),
                                "with pseudo labels": str(root / "preds_b")},
            "timing_files": {"labelled only": str(timing)},
            "revision": "2022",
            "hd95": False,
            "processes": 1,
        })
    return run_dir / "evaluation", out_nb


@pytest.mark.e2e
def test_per_set_outputs_and_summary_values(executed):
    ev, _ = executed
    perfect = json.loads((ev / "labelled-only" / "summary.json").read_text())
    perturbed = json.loads((ev / "with-pseudo-labels" / "summary.json").read_text())
    assert perfect["revision"] == perturbed["revision"] == "2022"
    assert perfect["n_cases"] == perturbed["n_cases"] == 3
    assert perfect["mean_dsc"] == 1.0 and perfect["mean_nsd"] == 1.0
    assert perturbed["mean_dsc"] < 1.0 and perturbed["mean_nsd"] < 1.0
    csv = pd.read_csv(ev / "with-pseudo-labels" / "metrics_per_case.csv")
    assert list(csv["Name"]) == [f"case_{i:04d}.nii.gz" for i in range(3)]
    assert csv["Liver_DSC"].max() < 1.0 and csv["RK_DSC"].iloc[2] == 0.0
    assert csv["Spleen_DSC"].min() == 1.0


@pytest.mark.e2e
def test_organ_tables_overview_and_pictures(executed):
    ev, _ = executed
    dsc = pd.read_csv(ev / "organ_table_DSC.csv", index_col=0)
    assert list(dsc.columns) == ["labelled only", "with pseudo labels"]
    assert dsc.index[0] == "Liver" and dsc.index[-1] == "Mean" and len(dsc) == 14
    assert dsc.loc["Mean", "labelled only"] == "1.0000 ± 0.0000"
    assert dsc.loc["Liver", "with pseudo labels"] != "1.0000 ± 0.0000"
    assert (ev / "organ_table_NSD.csv").is_file()
    num = pd.read_csv(ev / "organ_table_DSC_numeric.csv", header=[0, 1], index_col=0)
    perturbed = json.loads((ev / "with-pseudo-labels" / "summary.json").read_text())
    assert num.loc["Mean", ("with pseudo labels", "mean")] == pytest.approx(perturbed["mean_dsc"])
    assert num.loc["Liver", ("with pseudo labels", "mean")] == pytest.approx(
        perturbed["per_flare_key"]["Liver"]["dsc_mean"])
    overview = pd.read_csv(ev / "overview.csv", index_col=0)
    assert overview.loc["labelled only", "mean DSC"] == 1.0
    assert overview.loc["with pseudo labels", "mean DSC"] < 1.0
    for name in ("box_DSC.png", "box_NSD.png"):
        assert (ev / name).stat().st_size > 1000
    overlays = sorted(p.name for p in ev.glob("overlay_*.png"))
    assert len(overlays) == 2 and overlays[0].startswith("overlay_best_") and overlays[1].startswith("overlay_worst_")
    eff = pd.read_csv(ev / "efficiency_table.csv", index_col=0)
    assert eff.loc["labelled only", "GPU AUC (MiB·s)"] == "not measured"
    assert eff.loc["labelled only", "time (s)"] == 12.5


@pytest.mark.e2e
def test_executed_notebook_states_revision_and_shows_figures(executed):
    _, out_nb = executed
    nb = nbformat.read(str(out_nb), as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Metric revision: 2022" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 4                      # two box plots, two overlays


def test_stored_notebook_is_clean_and_parameterised():
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    for name in ("run_dir", "ground_truth_dir", "image_dir", "prediction_sets", "timing_files",
                 "revision", "hd95", "processes"):
        assert f"{name} =" in code[0].source
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)


# ---------------------------------------------------------------- a finished run, opened by setting run_dir


@pytest.fixture(scope="module")
def finished_run(cases):
    """A run whose evaluate stage the runner completed: its params.yaml, its inference stage's summary
    (two models, one timing file) and the stage's marker."""
    root = cases
    run_dir = root / "finished"
    inference = run_dir / "inference"
    inference.mkdir(parents=True)
    (inference / "summary.json").write_text(json.dumps({"models": {
        "teacher": {"output_dir": str(root / "preds_a"), "run_report": str(root / "timing_a.json")},
        "student_selected": {"output_dir": str(root / "preds_b"), "run_report": None}}}))
    (run_dir / "params.yaml").write_text(yaml.safe_dump({
        "name": "nb07", "device": "cpu", "stages": ["evaluate"],
        "evaluation": {"ground_truth_dir": str(root / "gt"), "image_dir": str(root / "images"), "processes": 1}}))
    pm.execute_notebook(str(NOTEBOOK), str(root / "07_runner.ipynb"), kernel_name="python3", progress_bar=False,
                        parameters={"run_dir": str(run_dir), "replace": True})     # what the runner passes
    (run_dir / ".flare_stages").mkdir()
    (run_dir / ".flare_stages" / "evaluate.json").write_text("{}")
    return run_dir


@pytest.mark.e2e
def test_stage_takes_the_runs_prediction_sets_and_timing_files(finished_run):
    ev = finished_run / "evaluation"
    overview = pd.read_csv(ev / "overview.csv", index_col=0)
    assert list(overview.index) == ["teacher", "student_selected"]
    assert overview.loc["teacher", "mean DSC"] == 1.0 and overview.loc["student_selected", "mean DSC"] < 1.0
    eff = pd.read_csv(ev / "efficiency_table.csv", index_col=0)
    assert list(eff.index) == ["teacher"] and eff.loc["teacher", "time (s)"] == 12.5
    assert not list(finished_run.glob(".evaluation*"))         # no temporary folder left


@pytest.mark.e2e
def test_finished_run_is_shown_from_its_files_and_nothing_is_rewritten(finished_run):
    before = tree_state(finished_run)
    out_nb = finished_run.parent / "07_show.ipynb"
    pm.execute_notebook(str(NOTEBOOK), str(out_nb), kernel_name="python3", progress_bar=False,
                        parameters={"run_dir": str(finished_run)})            # as "Run All" with run_dir set
    assert tree_state(finished_run) == before
    outs = outputs(nbformat.read(str(out_nb), as_version=4))
    text = "".join(o.get("text", "") for o in outs)
    assert "shown from its files" in text and "Metric revision: 2022" in text
    html = "".join(o.get("data", {}).get("text/html", "") for o in outs)
    assert "student_selected" in html and "12.5" in html          # the run's sets and its timing file
    assert sum("image/png" in o.get("data", {}) for o in outs) >= 4


@pytest.mark.e2e
def test_finished_run_refuses_other_settings_without_replace(finished_run):
    before = tree_state(finished_run)
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(NOTEBOOK), str(finished_run.parent / "07_refused.ipynb"), kernel_name="python3",
                            progress_bar=False, parameters={"run_dir": str(finished_run), "hd95": True})
    assert "hd95" in e.value.evalue and "replace = True" in e.value.evalue
    assert tree_state(finished_run) == before


@pytest.mark.e2e
def test_rewriting_leaves_nothing_of_sets_no_longer_evaluated(cases, tmp_path):
    from flare_utils.evaluation.stage import evaluate_stage, load_evaluation_result
    both = {"labelled only": str(cases / "preds_a"), "with pseudo labels": str(cases / "preds_b")}
    kw = dict(ground_truth_dir=cases / "gt", image_dir=cases / "images", processes=1, log=lambda m: None)
    evaluate_stage(tmp_path, prediction_sets=both, timing_files={"labelled only": cases / "timing_a.json"}, **kw)
    ev = tmp_path / "evaluation"
    (ev / "my_notes.txt").write_text("kept")                     # not the stage's: kept
    res = evaluate_stage(tmp_path, prediction_sets={"with pseudo labels": both["with pseudo labels"]}, **kw)
    assert sorted(p.name for p in ev.iterdir() if p.is_dir()) == ["with-pseudo-labels"]
    assert list(pd.read_csv(ev / "organ_table_DSC.csv", index_col=0).columns) == ["with pseudo labels"]
    assert list(pd.read_csv(ev / "overview.csv")["set"]) == ["with pseudo labels"]
    assert not (ev / "efficiency_table.csv").exists()
    overlays = [p.name for p in ev.glob("overlay_*.png")]
    assert len(overlays) == 2 and set(overlays) == {p.name for p in res.overlays().values()}
    assert (ev / "my_notes.txt").read_text() == "kept"
    loaded = load_evaluation_result(tmp_path)
    assert list(loaded.overview.index) == ["with pseudo labels"] and loaded.metrics == ["DSC", "NSD"]
    assert loaded.organ_tables["DSC"].equals(pd.read_csv(ev / "organ_table_DSC.csv", index_col=0))
    assert loaded.figures == res.figures and loaded.efficiency is None
    assert loaded.extremes.equals(res.extremes)
