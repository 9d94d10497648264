"""The run's model registry: complete copies, clear errors for unknown names and missing checkpoints."""
from __future__ import annotations

import json

import pytest

from flare_utils.errors import FlareInputError
from flare_utils.study.models import read_models, register_model, select_models, snapshot_model


def _results(tmp_path, folds=("0",)):
    res = tmp_path / "nnUNet_results" / "Dataset001_X" / "Trainer__Plans__3d_fullres"
    for f in folds:
        (res / f"fold_{f}").mkdir(parents=True)
        (res / f"fold_{f}" / "checkpoint_final.pth").write_bytes(b"weights" + f.encode())
        (res / f"fold_{f}" / "training_log_1.txt").write_text("log")
        (res / f"fold_{f}" / "checkpoint_latest.pth").write_bytes(b"not copied")
    for name in ("plans.json", "dataset.json"):
        (res / name).write_text("{}")
    return res


def test_snapshot_is_a_complete_model_folder(tmp_path):
    res = _results(tmp_path, ("0", "all"))
    dest = snapshot_model(res, tmp_path / "models" / "student_selected", ["0", "all"], marker=("m.json", {"a": 1}))
    assert (dest / "plans.json").is_file() and (dest / "dataset.json").is_file()
    assert (dest / "fold_all" / "checkpoint_final.pth").read_bytes() == b"weightsall"
    assert (dest / "fold_0" / "training_log_1.txt").is_file()
    assert not (dest / "fold_0" / "checkpoint_latest.pth").exists()
    assert json.loads((dest / "m.json").read_text()) == {"a": 1}


def test_snapshot_without_checkpoint_leaves_nothing(tmp_path):
    res = _results(tmp_path, ("0",))
    with pytest.raises(FlareInputError, match="checkpoint_final"):
        snapshot_model(res, tmp_path / "models" / "x", ["0", "1"])
    assert not (tmp_path / "models" / "x").exists()
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]


def test_register_orders_canonically_and_checks_folds(tmp_path):
    res = _results(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    register_model(run, "student_selected", res, folds=[0], title="S", role="student", training_data="l+p")
    register_model(run, "teacher", res, folds=[0], title="T", role="teacher", training_data="l")
    assert list(read_models(run)) == ["teacher", "student_selected"]
    with pytest.raises(FlareInputError, match=r"fold\(s\) \['1'\]"):
        register_model(run, "teacher_pseudo", res, folds=[1], title="P", role="teacher", training_data="l+p")
    assert "teacher_pseudo" not in read_models(run)
    assert list(select_models(run, ["teacher"])) == ["teacher"]
    with pytest.raises(FlareInputError, match="unknown model"):
        select_models(run, ["student_all"])


def test_models_inside_the_run_are_stored_relative_so_a_moved_run_keeps_them(tmp_path):
    run = tmp_path / "run"
    res = _results(run)
    register_model(run, "teacher", res, folds=["0"], title="T", role="teacher", training_data="x")
    stored = json.loads((run / "models.json").read_text())
    assert stored["teacher"]["path"] == "nnUNet_results/Dataset001_X/Trainer__Plans__3d_fullres"
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    run.rename(moved)
    m = read_models(moved)["teacher"]
    assert m["path"] == str(moved.resolve() / "nnUNet_results/Dataset001_X/Trainer__Plans__3d_fullres")
    assert (moved / m["path"] / "fold_0" / "checkpoint_final.pth").is_file()
