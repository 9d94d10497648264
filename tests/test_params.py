from pathlib import Path

import pytest

from flare_utils.errors import FlareInputError
from flare_utils.study.params import StudyParams, load_params
from flare_utils.study.runner import validate_stages

PARAMS_DIR = Path(__file__).resolve().parents[1] / "params"


@pytest.mark.parametrize("name", ["smoke.yaml", "demo.yaml", "flare22.yaml"])
def test_shipped_params_are_valid(name):
    p = load_params(PARAMS_DIR / name)
    assert isinstance(p, StudyParams)
    assert validate_stages(p)


def _write(tmp_path, text):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    return f


def test_unknown_top_level_key_is_an_error(tmp_path):
    with pytest.raises(FlareInputError, match=r"unknown key\(s\) \['sed'\]"):
        load_params(_write(tmp_path, "sed: 1\n"))


def test_unknown_nested_key_names_its_path(tmp_path):
    with pytest.raises(FlareInputError, match=r"params\.data\.phantom: unknown key\(s\) \['n_labeled'\]"):
        load_params(_write(tmp_path, "data:\n  phantom:\n    n_labeled: 3\n"))


@pytest.mark.parametrize("text, where", [
    ("seed: three\n", "params.seed"),
    ("seed: true\n", "params.seed"),
    ("stages: convert\n", "params.stages"),
    ("device: tpu\n", "params.device"),
    ("data:\n  phantom:\n    n_labelled: 2.5\n", "params.data.phantom.n_labelled"),
    ("data:\n  source: nifti\n", "params.data.source"),
    ("evaluation:\n  prediction_sets: [a, b]\n", "params.evaluation.prediction_sets"),
])
def test_wrong_types_are_errors_with_the_key_path(tmp_path, text, where):
    f = _write(tmp_path, text)
    with pytest.raises(FlareInputError) as e:
        load_params(f)
    assert str(f) in str(e.value) and where in str(e.value)


def test_unknown_stage_is_an_error(tmp_path):
    p = load_params(_write(tmp_path, "stages: [convert, teleport]\n"))
    with pytest.raises(FlareInputError, match="teleport"):
        validate_stages(p)


def test_missing_or_invalid_yaml(tmp_path):
    with pytest.raises(FlareInputError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(FlareInputError, match="YAML"):
        load_params(_write(tmp_path, "a: [1,\n"))


def test_overrides_and_defaults(tmp_path):
    p = load_params(_write(tmp_path, "name: x\n"), {"run_dir": "elsewhere"})
    assert p.run_dir == "elsewhere" and p.data.source == "phantom" and p.evaluation.revision == "2022"


def test_folds_accept_a_list_or_all(tmp_path):
    assert load_params(_write(tmp_path, "teacher: {folds: all}\n")).teacher.folds == "all"
    assert load_params(_write(tmp_path, "student: {folds: [0, 2]}\n")).student.folds == [0, 2]
    with pytest.raises(FlareInputError, match="params.teacher.folds"):
        load_params(_write(tmp_path, "teacher: {folds: some}\n"))
    with pytest.raises(FlareInputError, match="params.student.recipe"):
        load_params(_write(tmp_path, "student: {recipe: mean_teacher}\n"))


def test_phantom_fov_mix_per_split_as_name_or_weights(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("data:\n  phantom:\n    fov_mix:\n      labelled: abdomen\n"
                 "      validation: {abdomen: 0.6, abdomen_pelvis: 0.4}\n")
    mix = load_params(p).data.phantom.fov_mix
    assert mix == {"labelled": "abdomen", "validation": {"abdomen": 0.6, "abdomen_pelvis": 0.4}}
    p.write_text("data:\n  phantom:\n    fov_mix: {labelled: [abdomen]}\n")
    with pytest.raises(FlareInputError, match="fov_mix.labelled"):
        load_params(p)
