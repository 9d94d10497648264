import copy
import json
from pathlib import Path

import pytest
import yaml

from flare_utils.errors import FlareInputError
from flare_utils.study.params import StudyParams, load_params
from flare_utils.study.runner import validate_stages

PARAMS_DIR = Path(__file__).resolve().parents[1] / "params"


@pytest.mark.parametrize("name", sorted(f.name for f in PARAMS_DIR.glob("*.yaml")))
def test_shipped_params_are_valid(name):
    """Every params file in params/ loads (whole-file validation included) and names real stages."""
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


# ---------------------------------------------------------------------------------------------
# Whole-file validation at load time (issue 15, section 6): each case a small change of smoke.yaml

SMOKE = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())


def _smoke(tmp_path, change=lambda p: None):
    """smoke.yaml with `change` applied, its run_dir in tmp_path, written to tmp_path/p.yaml."""
    p = copy.deepcopy(SMOKE)
    p["run_dir"] = str(tmp_path / "run")
    change(p)
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(p, sort_keys=False))
    return f


def _problems(f) -> str:
    with pytest.raises(FlareInputError) as e:
        load_params(f)
    assert str(e.value).startswith(str(f))
    return str(e.value)


def _set(section, key, value):
    def change(p):
        p[section][key] = value
    return change


def test_smoke_copy_loads(tmp_path):
    assert load_params(_smoke(tmp_path)).run_dir == str(tmp_path / "run")


@pytest.mark.parametrize("section, key, value", [
    ("teacher", "epochs", -1), ("teacher", "epochs", 0), ("teacher", "iterations_per_epoch", 0),
    ("teacher", "val_iterations", 0), ("pseudo", "retrain_epochs", 0), ("pseudo", "retrain_iterations", -5),
    ("student", "epochs", 0), ("student", "iterations_per_epoch", -1), ("student", "val_iterations", 0),
])
def test_budgets_below_one_are_errors_naming_the_key(tmp_path, section, key, value):
    msg = _problems(_smoke(tmp_path, _set(section, key, value)))
    assert f"params.{section}.{key}: must be >= 1, got {value}" in msg


def test_retrain_config_budgets_are_checked(tmp_path):
    msg = _problems(_smoke(tmp_path, _set("pseudo", "retrain_config", {"num_epochs": 0, "initial_lr": 0.003})))
    assert "params.pseudo.retrain_config.num_epochs: must be >= 1, got 0" in msg


def test_unknown_plan_names_list_the_known_variants(tmp_path):
    msg = _problems(_smoke(tmp_path, _set("teacher", "plans", "no_such_plan")))
    assert "params.teacher.plans: unknown plan 'no_such_plan'" in msg and "known variants" in msg
    assert "'efficient_demo'" in msg and "'accurate'" in msg
    msg = _problems(_smoke(tmp_path, _set("student", "plans", "tiny")))
    assert "params.student.plans: unknown plan 'tiny'" in msg
    msg = _problems(_smoke(tmp_path, _set("teacher", "plan_variants", ["efficient_demo", "acurate"])))
    assert "params.teacher.plan_variants[1]: unknown plan variant 'acurate'; known variants" in msg
    # a variant's plans identifier, a built-in variant the teacher stage adds, the file's own variant
    load_params(_smoke(tmp_path, _set("student", "plans", "nnUNetPlans_efficient_demo")))
    load_params(_smoke(tmp_path, _set("teacher", "plans", "accurate_demo")))
    demo = load_params(PARAMS_DIR / "demo.yaml")
    assert demo.teacher.plans == demo.student.plans == "cpu_demo"


def test_student_plan_must_be_prepared_by_the_study(tmp_path):
    msg = _problems(_smoke(tmp_path, _set("student", "plans", "efficient")))
    assert "params.student.plans: plan variant 'efficient' is not prepared by this study" in msg
    assert "teacher.plan_variants" in msg


def test_a_plans_file_the_run_already_has_is_a_known_plan(tmp_path):
    f = _smoke(tmp_path, _set("student", "plans", "nnUNetPlans_mine"))
    assert "unknown plan 'nnUNetPlans_mine'" in _problems(f)
    pre = tmp_path / "run" / "nnUNet_preprocessed" / "Dataset990_FLARE22Smoke"
    pre.mkdir(parents=True)
    (pre / "nnUNetPlans_mine.json").write_text(json.dumps({"plans_name": "nnUNetPlans_mine"}))
    assert load_params(f).student.plans == "nnUNetPlans_mine"


def test_load_plans_tells_an_unknown_name_from_an_unplanned_variant(tmp_path):
    from flare_utils.layout import RunLayout
    from flare_utils.planning.plans import load_plans
    (tmp_path / "nnUNet_preprocessed" / "Dataset991_T").mkdir(parents=True)
    with RunLayout(tmp_path).activated():
        with pytest.raises(FlareInputError) as e:
            load_plans("no_such_plan", "Dataset991_T")
        assert "unknown plans 'no_such_plan'" in str(e.value) and "'efficient_demo'" in str(e.value)
        assert "plan_and_preprocess" not in str(e.value)
        with pytest.raises(FlareInputError, match=r"run plan_and_preprocess first"):
            load_plans("nnUNetPlans_accurate", "Dataset991_T")


@pytest.mark.parametrize("change, key, allowed", [
    (_set("teacher", "folds", [0, 3]), "teacher.folds", "0-2 (3 folds: teacher.splits.n_folds)"),
    (_set("student", "folds", [-1]), "student.folds", "0-2"),
    (_set("pseudo", "retrain_folds", ["7"]), "pseudo.retrain_folds", "0-2"),
    (lambda p: p["teacher"].update(splits=None, folds=[0, 5]), "teacher.folds", "0-4 (5 folds: nnU-Net's default"),
    (lambda p: p["teacher"].update(splits={"folds": [["c0"], ["c1"]]}), "student.folds", None),
])
def test_folds_out_of_the_split_are_errors(tmp_path, change, key, allowed):
    def both(p):
        change(p)
        if allowed is None:                      # a custom split of 2 folds, student fold 2
            p["student"]["folds"] = [2]
    msg = _problems(_smoke(tmp_path, both))
    assert f"params.{key}: fold(s)" in msg and "not in the split" in msg and '"all"' in msg
    assert (allowed or "0-1 (2 folds: teacher.splits.folds)") in msg


def test_folds_follow_the_runs_split_file_and_accept_all(tmp_path):
    f = _smoke(tmp_path, lambda p: p["teacher"].update(splits=None, folds=[0, 6]))
    assert "0-4" in _problems(f)
    pre = tmp_path / "run" / "nnUNet_preprocessed" / "Dataset990_FLARE22Smoke"
    pre.mkdir(parents=True)
    (pre / "splits_final.json").write_text(json.dumps([{"train": [], "val": []}] * 7))
    assert load_params(f).teacher.folds == [0, 6]
    load_params(_smoke(tmp_path, lambda p: p["teacher"].update(folds="all")))
    assert "params.teacher.folds: no folds given" in _problems(_smoke(tmp_path, _set("teacher", "folds", [])))
    assert "params.teacher.splits.n_folds: must be an integer >= 2" in _problems(
        _smoke(tmp_path, _set("teacher", "splits", {"n_folds": 1})))


@pytest.mark.parametrize("rounds", [0, -2])
def test_rounds_below_one_are_errors(tmp_path, rounds):
    msg = _problems(_smoke(tmp_path, _set("pseudo", "rounds", rounds)))
    assert f"params.pseudo.rounds: must be >= 1" in msg and f"got {rounds}" in msg


def test_one_round_is_too_few_for_the_select_stage(tmp_path):
    msg = _problems(_smoke(tmp_path, _set("pseudo", "rounds", 1)))
    assert "params.pseudo.rounds: the select stage compares rounds: needs pseudo.rounds >= 2, got 1" in msg
    load_params(_smoke(tmp_path, lambda p: p.update(stages=["convert", "teacher", "pseudo"],
                                                    pseudo={**p["pseudo"], "rounds": 1})))


@pytest.mark.parametrize("selection, expected", [
    ({"threshold": None, "fraction": 0.0}, "params.selection.fraction: must be in (0, 1]"),
    ({"threshold": None, "fraction": 1.5}, "params.selection.fraction: must be in (0, 1]"),
    ({"threshold": 0, "fraction": None}, "params.selection.threshold: must be > 0"),
    ({"threshold": 0.1, "fraction": 0.5}, "params.selection: give threshold or fraction, not both"),
    ({"threshold": None, "fraction": None}, "params.selection: give a threshold"),
    ({"threshold": None, "fraction": 0.5, "labels_round": 2}, "params.selection.labels_round: must pick one of "
                                                              "the pseudo.rounds = 2 rounds: -2..1"),
])
def test_selection_rules_are_checked(tmp_path, selection, expected):
    assert expected in _problems(_smoke(tmp_path, _set_section("selection", selection)))


def _set_section(section, value):
    def change(p):
        p[section] = value
    return change


def test_students_that_need_a_selection_need_the_select_stage(tmp_path):
    no_select = ["convert", "teacher", "pseudo", "student", "infer", "evaluate"]
    msg = _problems(_smoke(tmp_path, lambda p: p.update(stages=no_select)))
    assert "params.student.variants: ['selected', 'all']" in msg and "'select' is not in params.stages" in msg
    load_params(_smoke(tmp_path, lambda p: p.update(stages=no_select,
                                                    student={**p["student"], "variants": ["labelled_only"]})))
    # a run that already has the select stage's files
    sel = tmp_path / "run" / "selection"
    sel.mkdir(parents=True)
    (sel / "selection.json").write_text("{}")
    (sel / "selection_all.json").write_text("{}")
    load_params(_smoke(tmp_path, lambda p: p.update(stages=no_select)))


def test_a_given_selection_file_must_exist(tmp_path):
    def change(p):
        p["stages"] = ["student"]
        p["student"].update(variants=["selected"], selection_file=str(tmp_path / "mine.json"))
    f = _smoke(tmp_path, change)
    assert "params.student.selection_file:" in _problems(f) and "not found" in _problems(f)
    (tmp_path / "mine.json").write_text("{}")
    assert load_params(f).student.selection_file == str(tmp_path / "mine.json")


def test_flare22_source_needs_its_root(tmp_path):
    msg = _problems(_smoke(tmp_path, _set("data", "source", "flare22")))
    assert "params.data.flare22_root: data.source flare22" in msg and "give flare22_root" in msg
    load_params(_smoke(tmp_path, lambda p: p["data"].update(source="flare22", flare22_root=str(tmp_path))))


def test_duplicate_keys_are_refused_with_their_lines(tmp_path):
    f = _write(tmp_path, "name: a\nteacher:\n  epochs: 1\n  folds: [0]\n  epochs: 2\nname: b\n")
    msg = _problems(f)
    assert "2 problems" in msg
    assert "line 5: key 'epochs' given twice in one mapping (first on line 3)" in msg
    assert "line 6: key 'name' given twice in one mapping (first on line 1)" in msg
    # a merge key's values may be overridden (YAML's own rule), aliases are fine
    ok = "data:\n  phantom: &p {n_labelled: 3}\nevaluation:\n  <<: {processes: 1}\n  processes: 2\n"
    assert load_params(_write(tmp_path, ok)).evaluation.processes == 2


@pytest.mark.parametrize("section, key, value, lowest", [
    ("data", "processes", 0, 1), ("evaluation", "processes", -1, 1), ("teacher", "num_threads", 0, 1),
    ("student", "n_proc_da", -1, 0), ("pseudo", "num_threads", 0, 1),
])
def test_processes_below_their_minimum_are_errors(tmp_path, section, key, value, lowest):
    msg = _problems(_smoke(tmp_path, _set(section, key, value)))
    assert f"params.{section}.{key}: must be >= {lowest}" in msg and f"got {value}" in msg


def test_every_problem_is_reported_at_once(tmp_path):
    def change(p):
        p["teacher"]["epochs"] = 0
        p["data"]["processes"] = 0
        p["selection"]["fraction"] = 2.0
    msg = _problems(_smoke(tmp_path, change))
    assert "3 problems" in msg
    for key in ("teacher.epochs", "data.processes", "selection.fraction"):
        assert f"params.{key}:" in msg


def test_a_mapping_is_validated_too(tmp_path):
    p = {**copy.deepcopy(SMOKE), "run_dir": str(tmp_path / "run")}
    p["teacher"]["epochs"] = 0
    with pytest.raises(FlareInputError, match=r"^params\.teacher\.epochs: must be >= 1"):
        load_params(p)


@pytest.mark.parametrize("command", ["status", "run"])
def test_cli_prints_the_problems_without_a_traceback(tmp_path, capsys, command):
    from flare_utils.study import cli
    f = _smoke(tmp_path, _set("teacher", "epochs", -3))
    assert cli.main([command, str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {f}: params.teacher.epochs: must be >= 1, got -3")
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()          # nothing started


def test_phantom_cohort_must_fill_the_split(tmp_path):
    msg = _problems(_smoke(tmp_path, lambda p: p["teacher"].update(splits={"n_folds": 4})))
    assert "params.data.phantom.n_labelled: 3 labelled cases cannot fill the split's 4 folds" in msg
    assert "params.teacher.splits: not a split specification" in _problems(
        _smoke(tmp_path, _set("teacher", "splits", {"folds": 3})))
