"""The study runner: papermill execution of stage notebooks, HTML rendering, failure reporting."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from flare_utils.study.runner import StageFailed, run_study
from notebook_support import execute_as_jupyterlab, tree_state

PROJECT = Path(__file__).resolve().parents[1]


def _params(tmp_path, **data_overrides):
    p = yaml.safe_load((PROJECT / "params" / "smoke.yaml").read_text())
    p["data"].update(data_overrides)
    p["stages"] = ["convert"]
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(p))
    return f


@pytest.mark.e2e
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
    # the stage's peak memory: at least the kernel's numpy/torch/nnU-Net imports, and shown in the index
    assert 100 < stages[0]["peak_ram_mib"] < 24 * 1024
    assert f"{stages[0]['peak_ram_mib'] / 1024:.2f} GiB" in (run_dir / "index.html").read_text()
    # executed notebook got the params, and the committed notebook stayed clean
    src = json.loads((PROJECT / "notebooks" / "01_data_conversion.ipynb").read_text())
    assert not any(c.get("outputs") for c in src["cells"] if c["cell_type"] == "code")


@pytest.mark.e2e
def test_failing_stage_names_notebook_cell_and_partial_report(tmp_path):
    params = _params(tmp_path, source="flare22", flare22_root=str(tmp_path / "no_such_folder"))
    with pytest.raises(StageFailed) as e:
        run_study(params, run_dir=tmp_path / "run", log=lambda m: None)
    msg = str(e.value)
    assert "stage 'convert' failed" in msg and "01_data_conversion" in msg
    assert "cell" in msg and "no_such_folder" in msg
    assert e.value.html is not None and e.value.html.exists()
    stages = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert stages[0]["status"] == "failed" and stages[0]["html"].endswith("01_data_conversion.partial.html")
    assert "01_data_conversion.partial.html" in (tmp_path / "run" / "index.html").read_text()
    assert not (tmp_path / "run" / ".flare_stages" / "convert.json").exists()
    # nothing half-written: no dataset folder, no completed notebook
    assert not (tmp_path / "run" / "nnUNet_raw" / "Dataset990_FLARE22Smoke").exists()
    assert not (tmp_path / "run" / "notebooks" / "01_data_conversion.ipynb").exists()


def test_cli_run_reports_bad_params_clearly(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("stages: [convert]\ndata: {sorce: phantom}\n")
    r = subprocess.run([sys.executable, "-m", "flare_utils", "run", str(f)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "sorce" in r.stderr and str(f) in r.stderr


# ------------------------------------------------------------------------- the whole smoke study

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke study through the runner: every stage, once (about 2-3 minutes on 2 CPU cores)."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    results = run_study(PROJECT / "params" / "smoke.yaml", run_dir=run_dir, log=lambda m: None)
    return run_dir, results


MODELS = ["teacher", "teacher_pseudo", "student_labelled_only", "student_selected", "student_all"]


@pytest.mark.e2e
def test_smoke_study_runs_every_stage_and_registers_five_models(smoke_run):
    run_dir, results = smoke_run
    assert [r.name for r in results] == ["convert", "teacher", "pseudo", "select", "student:selected",
                                         "student:labelled_only", "student:all", "infer", "evaluate"]
    assert all(r.status == "done" for r in results)
    from flare_utils.study.models import read_models
    models = read_models(run_dir)                  # paths inside the run are stored relative to it
    assert sorted(models) == sorted(MODELS)
    for name, m in models.items():
        for f in m["folds"]:
            assert Path(m["path"], f"fold_{f}", "checkpoint_final.pth").is_file(), name
    # students are separate copies: selected and all share a trainer but not a folder
    assert models["student_selected"]["path"] != models["student_all"]["path"]
    sel = json.loads((run_dir / "selection" / "selection.json").read_text())
    every = json.loads((run_dir / "selection" / "selection_all.json").read_text())
    assert set(sel["cases"]) <= set(every["cases"]) and len(every["cases"]) == 2
    # every model predicted the 2 held-out cases; the evaluation scored five sets
    held_out = sorted(p.name.replace("_0000", "") for p in
                      (run_dir / "nnUNet_raw" / "Dataset990_FLARE22Smoke" / "imagesTs").glob("*.nii.gz"))
    for name in MODELS:
        assert sorted(p.name for p in (run_dir / "inference" / name).glob("*.nii.gz")) == held_out
    overview = pd.read_csv(run_dir / "evaluation" / "overview.csv")
    assert sorted(overview["set"]) == sorted(MODELS) and (overview["cases"] == 2).all()
    assert (run_dir / "evaluation" / "efficiency_table.csv").is_file()


@pytest.mark.e2e
def test_index_report_links_stages_and_shows_the_comparison(smoke_run):
    from flare_utils.study.index_report import comparison_table
    run_dir, results = smoke_run
    html = (run_dir / "index.html").read_text()
    assert "Do pseudo labels help?" in html
    for title in ("Teacher, labelled only", "Teacher + pseudo labels", "Student, labelled only",
                  "Student + selected pseudo labels", "Student + all pseudo labels"):
        assert title in html
    for r in results:                  # every executed notebook is linked, relatively, and exists
        rel = r.html.relative_to(run_dir).as_posix()
        assert f'href="{rel}"' in html and r.html.is_file()
    assert html.count("data:image/png;base64,") >= 3          # selection plot, box plot, overlays
    # the comparison's numbers are the evaluation's: per-case organ means, averaged over cases
    table = comparison_table(run_dir)
    for name in MODELS:
        folder = overview_folder(run_dir, name)
        per_case = pd.read_csv(folder / "metrics_per_case.csv")
        dsc = per_case[[c for c in per_case.columns if c.endswith("_DSC")]].mean(axis=1).mean()
        assert table.loc[name, "cases"] == 2
        assert table.loc[name, "DSC mean"] == pytest.approx(dsc, abs=1e-9)
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["packages"]["nnunetv2"] and prov["packages"]["torch"] and prov["device"]["resolved"] == "cpu"
    assert prov["seeds"]["study"] == 0 and prov["params"]["name"] == "smoke" and "commit" in prov["git"]
    log = (run_dir / "logs" / "run.log").read_text()
    assert "[evaluate] done" in log and "epochs: 1/1" in log       # runner lines and per-epoch progress


def overview_folder(run_dir: Path, name: str) -> Path:
    overview = pd.read_csv(run_dir / "evaluation" / "overview.csv").set_index("set")
    return run_dir / "evaluation" / overview.loc[name, "folder"]


@pytest.mark.e2e
def test_second_run_skips_every_stage_and_changes_nothing(smoke_run):
    run_dir, _ = smoke_run
    stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "notebooks").glob("*.ipynb")}
    results = run_study(PROJECT / "params" / "smoke.yaml", run_dir=run_dir, log=lambda m: None)
    assert [r.status for r in results] == ["skipped"] * 9
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "notebooks").glob("*.ipynb")} == stamps
    stages = json.loads((run_dir / "stages.json").read_text())
    assert [s["status"] for s in stages] == ["skipped"] * 9
    assert all(s["seconds"] is not None for s in stages)        # the time of the run that made it
    assert all(s["peak_ram_mib"] > 0 for s in stages)           # ... and its memory


STAGE_NOTEBOOKS = sorted(p.name for p in (PROJECT / "notebooks").glob("0*.ipynb"))


@pytest.mark.e2e
def test_every_notebook_opens_on_the_finished_run_by_setting_run_dir_and_rewrites_nothing(smoke_run):
    run_dir, _ = smoke_run
    before = tree_state(run_dir)
    for name in STAGE_NOTEBOOKS:
        nb = execute_as_jupyterlab(PROJECT / "notebooks" / name, run_dir)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors, (name, errors)
        text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
        assert "shown from its files" in text, name
    after = tree_state(run_dir)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                     and "__pycache__" not in k)
    assert not changed, changed


@pytest.mark.e2e
def test_a_copied_run_folder_is_complete_where_it_lies(smoke_run, tmp_path):
    """Paths inside a run are recorded relative to it: a copy elsewhere shows every stage complete
    and its index report, and would re-run nothing."""
    import shutil
    from flare_utils.study.runner import study_status
    run_dir, _ = smoke_run
    copy = tmp_path / "sent" / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    status = study_status(PROJECT / "params" / "smoke.yaml", run_dir=copy)
    assert [why for _, done, why in status if not done] == []
    from flare_utils.study.models import read_models
    assert all(Path(m["path"]).is_relative_to(copy.resolve()) for m in read_models(copy).values())


@pytest.mark.e2e
def test_deleted_outputs_and_a_killed_runner_show_in_status(smoke_run, tmp_path):
    """A unit whose folders or registered models were deleted is not complete; a unit left "running"
    by a killed runner (no live lock holder) reads "interrupted" in status, stages.json and the index."""
    import shutil
    from flare_utils.study.runner import study_status
    run_dir, _ = smoke_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    shutil.rmtree(copy / "models")
    shutil.rmtree(copy / "inference")
    status = {u: (done, why) for u, done, why in study_status(PROJECT / "params" / "smoke.yaml", run_dir=copy)}
    assert status["teacher"] == (True, "") and status["select"] == (True, "")
    for variant in ("labelled_only", "selected", "all"):
        assert status[f"student:{variant}"] == (False, f"outputs missing: models/student_{variant}")
    assert status["infer"][0] is False and status["evaluate"][0] is False

    # a runner killed during the evaluation: no marker, stages.json says running, nobody holds the lock
    copy2 = tmp_path / "run2"
    shutil.copytree(run_dir, copy2, symlinks=True)
    (copy2 / ".flare_stages" / "evaluate.json").unlink()
    stages = json.loads((copy2 / "stages.json").read_text())
    stages[-1]["status"] = "running"
    (copy2 / "stages.json").write_text(json.dumps(stages))
    status = study_status(PROJECT / "params" / "smoke.yaml", run_dir=copy2)
    assert status[-1] == ("evaluate", False, "interrupted during its last run")
    assert json.loads((copy2 / "stages.json").read_text())[-1]["status"] == "interrupted"
    index = (copy2 / "index.html").read_text()
    assert "interrupted" in index and ">running<" not in index


@pytest.mark.parametrize("name", [n for n in STAGE_NOTEBOOKS if not n.startswith("01")])
def test_stage_notebooks_with_their_defaults_stop_at_once_naming_run_dir(name):
    from nbclient.exceptions import CellExecutionError
    with pytest.raises(CellExecutionError) as e:
        execute_as_jupyterlab(PROJECT / "notebooks" / name)
    assert "FlareInputError" in str(e.value) and "set run_dir" in str(e.value)


@pytest.mark.e2e
def test_conversion_notebook_runs_on_its_own_in_a_new_folder(tmp_path):
    killed = tmp_path / "standalone" / "nnUNet_raw" / ".Dataset990_FLARE22Smoke.x1y2.partial"   # a killed build
    (killed / "imagesTr").mkdir(parents=True)
    nb = execute_as_jupyterlab(PROJECT / "notebooks" / "01_data_conversion.ipynb", tmp_path / "standalone")
    assert (tmp_path / "standalone" / "conversion" / "summary.csv").is_file()
    assert yaml.safe_load((tmp_path / "standalone" / "params.yaml").read_text())["name"] == "smoke"  # a run now
    assert not killed.exists()
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.e2e
def test_from_and_only_rerun_parts_and_staleness_propagates(smoke_run, tmp_path):
    from flare_utils.study.runner import study_status
    run_dir, _ = smoke_run
    params = PROJECT / "params" / "smoke.yaml"
    results = run_study(params, run_dir=run_dir, start_from="evaluate", log=lambda m: None)
    assert [r.status for r in results] == ["skipped"] * 8 + ["done"]
    # a changed parameter makes its stage run again, nothing before it
    p = yaml.safe_load(params.read_text())
    p["evaluation"]["hd95"] = True
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(p))
    status = study_status(changed, run_dir=run_dir)
    assert [u for u, done, _ in status if not done] == ["evaluate"]
    assert status[-1][2] == "parameters changed"
    # --only re-runs one stage; everything after it is then stale
    results = run_study(params, run_dir=run_dir, only=["select"], log=lambda m: None)
    assert [r.name for r in results if r.status == "done"] == ["select"]
    status = {u: (done, why) for u, done, why in study_status(params, run_dir=run_dir)}
    assert status["pseudo"] == (True, "") and status["select"] == (True, "")
    assert status["student:selected"] == (False, "an earlier stage ran again")
    assert not status["evaluate"][0]


def test_from_and_only_name_real_stages(tmp_path):
    from flare_utils.errors import FlareInputError
    with pytest.raises(FlareInputError, match="unknown stage"):
        run_study(PROJECT / "params" / "smoke.yaml", run_dir=tmp_path / "r", start_from="teach", log=None)
    p = yaml.safe_load((PROJECT / "params" / "smoke.yaml").read_text())
    p["stages"] = ["convert"]
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(p))
    with pytest.raises(FlareInputError, match="not in this study"):
        run_study(f, run_dir=tmp_path / "r", only=["evaluate"], log=None)


def test_from_needs_complete_earlier_stages(tmp_path):
    from flare_utils.errors import FlareInputError
    with pytest.raises(FlareInputError, match="not complete"):
        run_study(PROJECT / "params" / "smoke.yaml", run_dir=tmp_path / "r", start_from="select", log=None,
                  index=False)
