"""The study runner: papermill execution of stage notebooks, HTML rendering, failure reporting."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flare_utils.pipeline import StageFailed, run_study

PROJECT = Path(__file__).resolve().parents[1]


def _params(tmp_path, **data_overrides):
    p = yaml.safe_load((PROJECT / "params" / "smoke.yaml").read_text())
    p["data"].update(data_overrides)
    p["stages"] = ["convert"]
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(p))
    return f


@pytest.mark.slow
def test_conversion_notebook_runs_with_smoke_params(tmp_path):
    run_dir = tmp_path / "run"
    results = run_study(_params(tmp_path), run_dir=run_dir, log=lambda m: None)
    assert [r.name for r in results] == ["convert"]
    nb = run_dir / "notebooks" / "01_data_conversion.ipynb"
    assert nb.exists() and (run_dir / "notebooks" / "01_data_conversion.html").exists()
    assert not list((run_dir / "notebooks").glob("*.partial.*"))
    ds = run_dir / "nnUNet_raw" / "Dataset990_FLARE22Smoke"
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["numTraining"] == 3 and dj["labels"]["liver"] == 1
    assert len(list((ds / "imagesTr").glob("*_0000.nii.gz"))) == 3
    assert len(list((ds / "labelsTr").glob("*.nii.gz"))) == 3
    assert len(list((ds / "imagesUnlabelled").glob("*_0000.nii.gz"))) == 2
    assert len(list((ds / "imagesTs").glob("*_0000.nii.gz"))) == 2
    import pandas as pd
    summary = pd.read_csv(run_dir / "conversion" / "summary.csv")
    assert len(summary) == 3 + 2 + 2
    assert (summary.loc[summary["split"] == "train", "liver"] > 0).all()
    assert json.loads((run_dir / "conversion" / "summary.json").read_text())
    html = (run_dir / "notebooks" / "01_data_conversion.html").read_text()
    assert "integrity check passed" in html and "<img" in html      # the case pictures rendered
    stages = json.loads((run_dir / "stages.json").read_text())
    assert stages[0]["stage"] == "convert" and stages[0]["status"] == "done"
    # executed notebook got the params, and the committed notebook stayed clean
    src = json.loads((PROJECT / "notebooks" / "01_data_conversion.ipynb").read_text())
    assert not any(c.get("outputs") for c in src["cells"] if c["cell_type"] == "code")


@pytest.mark.slow
def test_failing_stage_names_notebook_cell_and_partial_report(tmp_path):
    params = _params(tmp_path, source="flare22", flare22_root=str(tmp_path / "no_such_folder"))
    with pytest.raises(StageFailed) as e:
        run_study(params, run_dir=tmp_path / "run", log=lambda m: None)
    msg = str(e.value)
    assert "stage 'convert' failed" in msg and "01_data_conversion" in msg
    assert "cell" in msg and "no_such_folder" in msg
    assert e.value.html is not None and e.value.html.exists()
    # nothing half-written: no dataset folder, no completed notebook
    assert not (tmp_path / "run" / "nnUNet_raw" / "Dataset990_FLARE22Smoke").exists()
    assert not (tmp_path / "run" / "notebooks" / "01_data_conversion.ipynb").exists()


def test_cli_run_reports_bad_params_clearly(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("stages: [convert]\ndata: {sorce: phantom}\n")
    r = subprocess.run([sys.executable, "-m", "flare_utils", "run", str(f)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "sorce" in r.stderr and str(f) in r.stderr


@pytest.mark.slow
def test_smoke_study_trains_teacher_and_labelled_only_student(tmp_path):
    run_dir = tmp_path / "run"
    results = run_study(PROJECT / "params" / "smoke.yaml", run_dir=run_dir, log=lambda m: None)
    assert [r.name for r in results] == ["convert", "teacher", "student"]
    teacher = json.loads((run_dir / "teacher" / "summary.json").read_text())
    assert teacher["trainer"] == "FlareTeacherTrainer"
    assert Path(teacher["results_folder"], "fold_0", "checkpoint_final.pth").exists()
    student = json.loads((run_dir / "student_training" / "summary.json").read_text())
    assert student["stages"]["student"]["trainer"] == "FlareStudentTrainer" and student["n_selected"] == 0
    assert Path(student["final_results_folder"], "fold_0", "checkpoint_final.pth").exists()
    for nb in ("01_data_conversion", "02_teacher_training", "05_student_training"):
        assert (run_dir / "notebooks" / f"{nb}.html").exists()
