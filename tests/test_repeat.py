"""Repeated studies over seeds (issue 16 §2): seed params, the aggregate and its report; the slow tests
run the smoke study for real (twice for determinism, over two seeds for `flare-study repeat`)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flare_utils.data.labels import ORGANS
from flare_utils.errors import FlareInputError
from flare_utils.evaluation.compare import pooled_difference
from flare_utils.study import cli
from flare_utils.study.params import load_params
from flare_utils.study.repeat import (SEEDS_JSON, aggregate_seeds, markdown_comparisons, markdown_table,
                                      repeat_study, seed_params, write_aggregate)

PROJECT = Path(__file__).resolve().parents[1]
TITLES = {"student_labelled_only": "Student, labelled only", "student_selected": "Student, selected pseudo"}


def _fake_run(root: Path, scores: dict[str, list[float]]) -> None:
    """A finished run's evaluation: per model one per-case CSV (every organ the same score)."""
    ev = root / "evaluation"
    rows = []
    for name, values in scores.items():
        df = pd.DataFrame({"Name": [f"case_{i}.nii.gz" for i in range(len(values))],
                           **{f"{o.flare_key}_{m}": values for o in ORGANS for m in ("DSC", "NSD")}})
        (ev / name).mkdir(parents=True)
        df.to_csv(ev / name / "metrics_per_case.csv", index=False)
        rows.append({"set": name, "cases": len(values), "mean DSC": np.mean(values), "mean NSD": np.mean(values),
                     "revision": "2022", "folder": name})
    pd.DataFrame(rows).to_csv(ev / "overview.csv", index=False)
    (root / "models.json").write_text(json.dumps({n: {"title": TITLES[n], "path": f"models/{n}", "folds": ["0"]}
                                                  for n in scores}))


SEED_SCORES = {
    0: {"student_labelled_only": [0.50, 0.60, 0.70, 0.40, 0.55], "student_selected": [0.52, 0.63, 0.71, 0.44, 0.58]},
    1: {"student_labelled_only": [0.30, 0.50, 0.45], "student_selected": [0.29, 0.52, 0.47]},
}


def test_aggregate_over_seeds_pairs_cases_within_each_seed(tmp_path):
    for s, scores in SEED_SCORES.items():
        _fake_run(tmp_path / f"seed_{s}", scores)
    agg = aggregate_seeds(tmp_path, [0, 1], name="t", n_boot=2000)
    m = agg["models"]["student_selected"]
    assert m["per_seed"]["0"]["DSC"] == pytest.approx(0.576)
    assert m["per_seed"]["1"]["DSC"] == pytest.approx(np.mean([0.29, 0.52, 0.47]))
    assert m["DSC mean over seeds"] == pytest.approx(np.mean([0.576, np.mean([0.29, 0.52, 0.47])]))
    (c,) = [c for c in agg["comparisons"] if c["model"] == "student_selected"
            and c["baseline"] == "student_labelled_only" and c["metric"] == "DSC"]
    d0 = np.subtract(SEED_SCORES[0]["student_selected"], SEED_SCORES[0]["student_labelled_only"])
    d1 = np.subtract(SEED_SCORES[1]["student_selected"], SEED_SCORES[1]["student_labelled_only"])
    assert c["per_seed"]["0"]["mean"] == pytest.approx(d0.mean(), abs=1e-6)
    assert c["per_seed"]["0"]["verdict"] == "as in the papers"          # every case better by 0.01-0.04
    assert c["per_seed"]["1"]["verdict"] == "too few cases to tell"     # 3 cases
    assert c["pooled"]["mean"] == pytest.approx(np.concatenate([d0, d1]).mean(), abs=1e-6)
    assert c["pooled"]["n_cases"] == 8 and c["seeds"] == 2
    assert c["seeds_in_papers_direction"] == 2
    expected = pooled_difference([(SEED_SCORES[s]["student_selected"], SEED_SCORES[s]["student_labelled_only"])
                                  for s in (0, 1)], n_boot=2000)
    assert (c["pooled"]["low"], c["pooled"]["high"]) == (pytest.approx(expected.low, abs=1e-6),
                                                        pytest.approx(expected.high, abs=1e-6))
    o = c["over_seeds"]                      # the seed as the unit: the per-seed means and a t interval
    assert o["n_seeds"] == 2 and o["mean"] == pytest.approx(np.mean([d0.mean(), d1.mean()]), abs=1e-6)
    assert o["low"] < o["mean"] < o["high"]
    # comparisons whose models the runs lack are left out, not shown empty
    assert {c["baseline"] for c in agg["comparisons"]} == {"student_labelled_only"}

    write_aggregate(tmp_path, agg)
    assert json.loads((tmp_path / SEEDS_JSON).read_text())["seeds"] == [0, 1]
    page = (tmp_path / "index.html").read_text()
    assert "seed_0/index.html" in page and "seed_1/index.html" in page and "not distinguishable" in page
    assert "over seeds (t interval)" in page
    table = markdown_table(agg)
    assert "| Student, selected pseudo | 0.576 | 0.427 | 0.501 ± 0.106 |" in table
    assert "selected pseudo labels improve the student" in markdown_comparisons(agg)


def test_aggregate_names_a_seed_without_evaluation(tmp_path):
    _fake_run(tmp_path / "seed_0", SEED_SCORES[0])
    with pytest.raises(FlareInputError, match="seed 3"):
        aggregate_seeds(tmp_path, [0, 3])


def test_seed_params_set_the_cohort_and_training_seeds(tmp_path):
    p = load_params(PROJECT / "params" / "smoke.yaml")
    d = seed_params(p, 7, tmp_path)
    assert d["seed"] == 7 and d["data"]["phantom"]["seed"] == 7 and d["run_dir"] == str(tmp_path / "seed_7")
    d = seed_params(p, 7, tmp_path, vary=["training"])
    assert d["seed"] == 7 and d["data"]["phantom"]["seed"] == p.data.phantom.seed
    d = seed_params(p, 7, tmp_path, vary=["cohort"])
    assert d["seed"] == p.seed and d["data"]["phantom"]["seed"] == 7
    load_params(d)                                     # a valid params mapping
    with pytest.raises(FlareInputError, match="vary"):
        seed_params(p, 1, tmp_path, vary=["weather"])


@pytest.mark.parametrize("seeds, match", [([], "at least one seed"), ([1, 1], "repeat"), ([-1], "non-negative")])
def test_bad_seeds_are_refused_before_anything_runs(tmp_path, seeds, match):
    with pytest.raises(FlareInputError, match=match):
        repeat_study(PROJECT / "params" / "smoke.yaml", seeds, run_dir=tmp_path / "r", log=None)
    assert not (tmp_path / "r").exists()


def test_cli_repeat_parses_seeds_and_vary():
    a = cli.build_parser().parse_args(["repeat", "p.yaml", "--seeds", "0", "1", "2", "--vary", "cohort"])
    assert a.seeds == [0, 1, 2] and a.vary == ["cohort"] and a.func is cli._cmd_repeat


# ------------------------------------------------------------------------------ slow: real smoke studies

def _outputs_digest(run: Path) -> dict[str, str]:
    """sha256 of every label map and metric table a run made (timing files excluded)."""
    files = [p for p in run.rglob("*") if p.is_file() and (
        p.name.endswith(".nii.gz") and any(part in ("pseudo_labels", "inference", "selection") for part in p.parts)
        or p.name in ("metrics_per_case.csv", "overview.csv", "selection.json", "all_cases.json", "scores.csv"))]
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


@pytest.mark.slow
def test_the_smoke_study_is_deterministic(tmp_path):
    """Issue 16 §1: the same params into two run folders give bit-identical pseudo labels, selections,
    predicted label maps and metric CSVs."""
    from flare_utils.study.runner import run_study
    digests = []
    for name in ("a", "b"):
        run_study(PROJECT / "params" / "smoke.yaml", run_dir=tmp_path / name, log=None, index=False)
        digests.append(_outputs_digest(tmp_path / name))
    assert len(digests[0]) > 10
    assert digests[0] == digests[1]


@pytest.mark.slow
def test_repeat_runs_each_seed_and_resumes(tmp_path):
    base = tmp_path / "seeds"
    agg = repeat_study(PROJECT / "params" / "smoke.yaml", [0, 1], run_dir=base, log=None)
    assert agg["seeds"] == [0, 1] and set(agg["runs"]) == {"0", "1"}
    for s in (0, 1):
        assert (base / f"seed_{s}" / "evaluation" / "overview.csv").is_file()
        assert load_params(base / f"seed_{s}" / "params.yaml").data.phantom.seed == s
    assert len(agg["models"]) == 5 and agg["comparisons"]
    # the cohorts differ by seed: same case names, different images
    images = [{p.name: hashlib.sha256(p.read_bytes()).hexdigest()
               for p in (base / f"seed_{s}").glob("nnUNet_raw/*/imagesTs/*")} for s in (0, 1)]
    assert images[0] and images[0].keys() == images[1].keys() and images[0] != images[1]
    before = {s: (base / f"seed_{s}" / ".flare_stages" / "evaluate.json").stat().st_mtime_ns for s in (0, 1)}
    repeat_study(PROJECT / "params" / "smoke.yaml", [0, 1], run_dir=base, log=None)
    assert before == {s: (base / f"seed_{s}" / ".flare_stages" / "evaluate.json").stat().st_mtime_ns for s in (0, 1)}
