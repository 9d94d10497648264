"""flare_utils.evaluation.compare: paired per-case differences with percentile-bootstrap intervals."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flare_utils.data.labels import ORGANS
from flare_utils.evaluation import compare
from flare_utils.evaluation.compare import (PairedDifference, case_scores, over_seeds, paired_difference,
                                            pooled_difference)
from flare_utils.study import report


# ----------------------------------------------------------------------------------------------
# paired_difference / pooled_difference

def test_constant_shift_is_exact_and_distinguishable():
    base = np.random.default_rng(1).uniform(0.6, 0.9, 10)
    d = paired_difference(base + 0.02, base)
    assert d.n_cases == 10
    assert d.mean == pytest.approx(0.02, abs=1e-12)
    assert d.low == pytest.approx(0.02, abs=1e-12) and d.high == pytest.approx(0.02, abs=1e-12)
    assert d.distinguishable and d.sign() == 1
    assert d.describe() == "+0.020 [95 % CI +0.020, +0.020]; above zero (10 cases)"
    assert d.to_dict() == {"n_cases": 10, "mean": d.mean, "low": d.low, "high": d.high, "level": 0.95,
                           "distinguishable": True}


def test_constant_loss_is_below_zero():
    base = np.linspace(0.5, 0.9, 8)
    d = paired_difference(base - 0.05, base)
    assert d.mean == pytest.approx(-0.05) and d.high == pytest.approx(-0.05)
    assert d.distinguishable and d.sign() == -1
    assert "below zero (8 cases)" in d.describe()


def test_zero_mean_noise_is_not_distinguishable():
    noise = np.random.default_rng(2).normal(0.0, 0.03, 20)
    noise -= noise.mean()                                   # mean exactly (up to rounding) zero
    base = np.full(20, 0.8)
    d = paired_difference(base + noise, base)
    assert d.mean == pytest.approx(0.0, abs=1e-12)
    assert d.low < 0 < d.high
    assert d.high - d.low > 0.01                          # a real interval, of about 4 standard errors
    assert not d.distinguishable and d.sign() == 0
    assert "not distinguishable from zero (20 cases)" in d.describe()
    # All differences zero: a zero-width interval at 0 still holds 0.
    same = paired_difference(base, base)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0) and not same.distinguishable


def test_expanded_percentile_interval_of_a_two_valued_difference_is_the_binomial_one():
    # Differences +0.04 and -0.02, five of each: a bootstrap mean is -0.02 + 0.006 k with k ~ Bin(10, 1/2)
    # the number of +0.04 drawn. The expanded percentile interval reads the tails at
    # Phi(-sqrt(10/9) t_9,0.975) = 0.855 %; P(k <= 0) = 0.1 % and P(k <= 1) = 1.1 %, so the low end is
    # k = 1 (-0.014) and, by symmetry, the high end k = 9 (+0.034). (A plain percentile interval would
    # read 2.5 %: k = 2 and 8, [-0.008, +0.028], too narrow for 10 cases.)
    base = np.full(10, 0.7)
    d = paired_difference(base + np.tile([0.04, -0.02], 5), base)
    assert d.mean == pytest.approx(0.01)
    assert compare.expanded_tail(0.95, 10) == pytest.approx(0.00855, abs=1e-5)
    assert d.low == pytest.approx(-0.014) and d.high == pytest.approx(0.034)
    assert d.describe() == "+0.010 [95 % CI -0.014, +0.034]; not distinguishable from zero (10 cases)"


def test_nan_pairs_are_left_out():
    model = np.array([0.9, np.nan, 0.8, 0.7, 0.6, 0.85])
    baseline = np.array([0.8, 0.7, np.nan, 0.6, 0.5, 0.75])
    d = paired_difference(model, baseline)
    assert d.n_cases == 4                               # cases 1 and 2 have one score missing
    assert d.mean == pytest.approx(0.1)
    clean = paired_difference(model[[0, 3, 4, 5]], baseline[[0, 3, 4, 5]])
    assert (d.low, d.high) == (clean.low, clean.high)   # the same four pairs, the same draws


def test_no_pair_and_one_pair():
    none = paired_difference([np.nan, 0.5], [0.4, np.nan])
    assert none.n_cases == 0 and math.isnan(none.mean) and not none.distinguishable
    assert none.describe() == "no paired cases"
    assert paired_difference([], []).n_cases == 0
    one = paired_difference([0.9], [0.5])
    assert one.n_cases == 1 and one.mean == pytest.approx(0.4)
    assert math.isnan(one.low) and math.isnan(one.high)
    assert not one.distinguishable and one.sign() == 0   # one case says nothing about the spread


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same cases"):
        paired_difference([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="same cases"):
        pooled_difference([([0.1, 0.2], [0.1, 0.2]), ([0.1], [0.1, 0.2])])


def test_pooled_over_groups_is_the_mean_over_all_pairs_and_narrower():
    rng = np.random.default_rng(3)
    groups = []
    for n in (15, 15):
        baseline = rng.uniform(0.6, 0.9, n)
        groups.append((baseline + rng.normal(0.01, 0.02, n), baseline))
    pooled = pooled_difference(groups)
    diffs = np.concatenate([m - b for m, b in groups])
    assert pooled.n_cases == 30
    assert pooled.mean == pytest.approx(diffs.mean(), abs=1e-12)
    assert pooled.low <= pooled.mean <= pooled.high
    for m, b in groups:
        alone = paired_difference(m, b)
        assert pooled.high - pooled.low < alone.high - alone.low
    # Unequal groups weigh every (group, case) pair alike, not every group.
    small = pooled_difference([(np.full(2, 1.0), np.zeros(2)), (np.zeros(6), np.zeros(6))])
    assert small.n_cases == 8 and small.mean == pytest.approx(0.25)
    # One group: exactly paired_difference.
    m, b = groups[0]
    assert pooled_difference([(m, b)]) == paired_difference(m, b)


def test_same_seed_same_interval():
    rng = np.random.default_rng(4)
    b = rng.uniform(0.6, 0.9, 12)
    m = b + rng.normal(0.0, 0.02, 12)
    first, again = paired_difference(m, b, seed=7), paired_difference(m, b, seed=7)
    assert (first.low, first.high) == (again.low, again.high)
    other = paired_difference(m, b, seed=8)
    assert (other.low, other.high) != (first.low, first.high)
    assert other.low == pytest.approx(first.low, abs=0.003)    # another seed moves it only a little
    assert paired_difference(m, b) == paired_difference(m, b, seed=0, n_boot=compare.N_BOOT)


def test_interval_covers_the_true_difference_about_as_often_as_it_says():
    # 1000 data sets of 12 cases, differences ~ N(0.01, 0.02). A plain percentile interval covers the
    # truth about 91 % of the time here (measured; it is about the normal interval with the ddof=0
    # standard error); the expanded one 94.7 % (6 cases: 93.8 %). The bounds leave room for the
    # simulation's own error (about 0.7 %).
    rng = np.random.default_rng(2024)
    n_sets, hits = 1000, 0
    for i in range(n_sets):
        d = rng.normal(0.01, 0.02, 12)
        ci = paired_difference(d, np.zeros(12), n_boot=2000, seed=i)
        hits += ci.low <= 0.01 <= ci.high
    assert 0.93 <= hits / n_sets <= 0.97


def test_level_changes_the_interval():
    b = np.zeros(30)
    m = np.random.default_rng(5).normal(0.0, 0.02, 30)
    wide, narrow = paired_difference(m, b, level=0.99), paired_difference(m, b, level=0.80)
    assert wide.low < narrow.low and narrow.high < wide.high
    assert "80 % CI" in narrow.describe()


# ----------------------------------------------------------------------------------------------
# per-case scores

def per_case_frame(names: list[str], dsc: list[float], nsd_offset: float = 0.05) -> pd.DataFrame:
    """The evaluate stage's metrics_per_case.csv layout: Name, <flare_key>_DSC x 13, _NSD x 13, Revision;
    every organ of a case has the same score."""
    cols: dict[str, list] = {"Name": names}
    for metric, off in (("DSC", 0.0), ("NSD", nsd_offset)):
        for o in ORGANS:
            cols[f"{o.flare_key}_{metric}"] = [v - off for v in dsc]
    cols["Revision"] = ["2022"] * len(names)
    return pd.DataFrame(cols)


def test_case_scores_average_organs_per_case():
    df = pd.DataFrame({
        "Name": ["case_01.nii.gz", "case_02.nii.gz", "case_03.nii.gz"],
        "Liver_DSC": [0.9, np.nan, np.nan],
        "RK_DSC": [0.7, 0.6, np.nan],
        "Spleen_DSC": ["0.8", 0.4, np.nan],              # text from a hand-edited CSV still counts
        "Liver_NSD": [1.0, 0.5, 0.2],
        "Revision": ["2022"] * 3,
    })
    dsc = case_scores(df, "DSC")
    assert list(dsc.index) == ["case_01.nii.gz", "case_02.nii.gz"]      # case_03 has no DSC at all
    assert dsc.dtype == np.float64
    assert dsc["case_01.nii.gz"] == pytest.approx(0.8) and dsc["case_02.nii.gz"] == pytest.approx(0.5)
    nsd = case_scores(df, "NSD")
    assert nsd.to_dict() == pytest.approx({"case_01.nii.gz": 1.0, "case_02.nii.gz": 0.5, "case_03.nii.gz": 0.2})
    assert case_scores(df, "HD95").empty
    assert case_scores(df.drop(columns="Name"), "DSC").empty


def test_case_scores_of_the_evaluate_layout():
    df = per_case_frame(["a.nii.gz", "b.nii.gz"], [0.8, 0.6])
    df.loc[0, "Liver_DSC"] = np.nan                        # skipped: case a still averages 0.8
    assert case_scores(df, "DSC").to_dict() == pytest.approx({"a.nii.gz": 0.8, "b.nii.gz": 0.6})
    assert case_scores(df, "NSD").to_dict() == pytest.approx({"a.nii.gz": 0.75, "b.nii.gz": 0.55})


# ----------------------------------------------------------------------------------------------
# a run folder as the evaluate stage writes it

NAMES = [f"case_{i:04d}.nii.gz" for i in range(10)]
BASE = [0.70 + 0.02 * i for i in range(10)]
SHIFTS = {
    "teacher": np.zeros(10),
    "teacher_pseudo": np.tile([0.04, -0.02], 5),            # mean +0.010, interval holds 0
    "student_labelled_only": np.zeros(10),
    "student_selected": np.tile([0.03, 0.05], 5),           # +0.040 over labelled only
    "student_all": -np.tile([0.03, 0.05], 5),               # -0.040 over labelled only
}


def fabricate_run(root: Path, models: dict[str, np.ndarray] = SHIFTS, *, cases: dict[str, slice] | None = None) -> Path:
    """evaluation/overview.csv and evaluation/<slug>/metrics_per_case.csv as flare_utils.evaluation.stage
    writes them (overview indexed by set, one folder per set named by report.set_slugs)."""
    ev = root / "evaluation"
    slugs = report.set_slugs(models)
    rows = []
    for name, shift in models.items():
        keep = (cases or {}).get(name, slice(None))
        df = per_case_frame(NAMES[keep], list((np.asarray(BASE) + shift)[keep]))
        (ev / slugs[name]).mkdir(parents=True, exist_ok=True)
        df.to_csv(ev / slugs[name] / report.PER_CASE_CSV, index=False)
        rows.append({"set": name, "cases": len(df), "mean DSC": float(case_scores(df, "DSC").mean()),
                     "mean NSD": float(case_scores(df, "NSD").mean()), "revision": "2022", "folder": slugs[name]})
    report.save_table(pd.DataFrame(rows).set_index("set"), ev / "overview.csv")
    (root / "models.json").write_text(json.dumps({name: {"title": name} for name in models}))
    return root


def test_run_case_scores_reads_every_evaluated_set(tmp_path):
    run = fabricate_run(tmp_path / "run")
    assert (run / "evaluation" / "teacher-pseudo" / "metrics_per_case.csv").is_file()
    scores = compare.run_case_scores(run)
    assert set(scores) == set(SHIFTS)
    assert list(scores["teacher"].index) == NAMES
    assert scores["teacher_pseudo"].to_numpy() == pytest.approx(np.asarray(BASE) + SHIFTS["teacher_pseudo"])
    nsd = compare.run_case_scores(run, "NSD")
    assert nsd["teacher"].to_numpy() == pytest.approx(np.asarray(BASE) - 0.05)
    assert compare.run_case_scores(tmp_path / "nothing") == {}


def test_run_comparisons_table(tmp_path):
    run = fabricate_run(tmp_path / "run")
    table = compare.run_comparisons(run)
    assert list(table.columns) == ["model", "baseline", "question", "metric", "cases", "difference", "ci_low",
                                   "ci_high", "distinguishable", "verdict", "summary"]
    assert len(table) == 2 * len(compare.COMPARISONS)
    assert list(table["metric"]) == ["DSC"] * 4 + ["NSD"] * 4
    dsc = table[table["metric"] == "DSC"].set_index(["model", "baseline"])
    expected = {   # (difference, ci_low, ci_high, verdict); the intervals are the binomial ones (see above)
        ("teacher_pseudo", "teacher"): (0.010, -0.014, 0.034, "not distinguishable from zero"),
        ("student_selected", "student_labelled_only"): (0.040, 0.032, 0.048, "as in the papers"),
        ("student_selected", "student_all"): (0.080, 0.064, 0.096, "as in the papers"),
        ("student_all", "student_labelled_only"): (-0.040, -0.048, -0.032, "opposite to the papers"),
    }
    for key, (diff, low, high, verdict) in expected.items():
        row = dsc.loc[key]
        assert row["cases"] == 10
        assert (row["difference"], row["ci_low"], row["ci_high"]) == pytest.approx((diff, low, high), abs=1e-9)
        assert row["verdict"] == verdict
        assert row["distinguishable"] == (verdict != "not distinguishable from zero")
    assert dsc.loc[("teacher_pseudo", "teacher"), "summary"] == \
        "+0.010 [95 % CI -0.014, +0.034]; not distinguishable from zero (10 cases)"
    # NSD is DSC - 0.05 in every cell: the same differences.
    nsd = table[table["metric"] == "NSD"]
    assert nsd["difference"].to_numpy() == pytest.approx(table[table["metric"] == "DSC"]["difference"].to_numpy())


def test_run_comparisons_pairs_common_cases_and_skips_missing_models(tmp_path):
    models = {k: SHIFTS[k] for k in ("student_labelled_only", "student_selected", "teacher")}
    run = fabricate_run(tmp_path / "run", models, cases={"student_selected": slice(2, 10)})
    table = compare.run_comparisons(run, ("DSC",))
    (row,) = table.itertuples()                          # no teacher_pseudo, no student_all: one comparison
    assert (row.model, row.baseline, row.cases) == ("student_selected", "student_labelled_only", 8)
    assert row.difference == pytest.approx(0.04)
    assert compare.run_comparisons(tmp_path / "nothing").empty


def test_paired_difference_is_a_value():
    d = PairedDifference(6, 0.1, 0.05, 0.15)
    assert d.level == compare.LEVEL and d.distinguishable
    assert PairedDifference(6, 0.1, -0.01, 0.15).sign() == 0


def test_fewer_than_five_cases_give_no_interval_and_no_verdict():
    """Four cases of the same sign: a bootstrap interval would be their range, excluding 0 for a
    coin-flip pattern that arises 1 time in 8 under no effect; no interval is given instead."""
    d = paired_difference([0.5, 0.6, 0.7, 0.8], [0.4, 0.55, 0.69, 0.7])
    assert d.n_cases == 4 and d.mean == pytest.approx(0.065)
    assert math.isnan(d.low) and math.isnan(d.high) and not d.distinguishable
    assert d.describe() == "+0.065; too few cases (4) for an interval"
    assert compare.verdict(d, compare.COMPARISONS[0]) == "too few cases to tell"
    assert paired_difference(np.arange(5.0), np.zeros(5)).distinguishable


def test_shared_cases_count_once_across_seeds():
    """Training seeds on one cohort: the same cases in every group. Pooled, a case is one unit: the
    mean is over all pairs, the interval as wide as for the per-case averages, wider than treating
    the groups' cases as independent."""
    rng = np.random.default_rng(5)
    case_effect = rng.normal(0.01, 0.03, 10)             # what varies between cases
    groups = [(case_effect + rng.normal(0, 0.002, 10), np.zeros(10)) for _ in range(4)]
    shared = pooled_difference(groups, shared_cases=True)
    independent = pooled_difference(groups)
    averaged = paired_difference(np.mean([g[0] for g in groups], axis=0), np.zeros(10))
    assert shared.n_cases == 10 and independent.n_cases == 40
    assert shared.mean == pytest.approx(independent.mean) == pytest.approx(averaged.mean)
    assert (shared.low, shared.high) == (pytest.approx(averaged.low), pytest.approx(averaged.high))
    assert shared.high - shared.low > 1.8 * (independent.high - independent.low)
    with pytest.raises(ValueError, match="same cases"):
        pooled_difference([(np.zeros(3), np.zeros(3)), (np.zeros(4), np.zeros(4))], shared_cases=True)


def test_over_seeds_is_a_t_interval_over_the_per_seed_means():
    from scipy import stats
    means = [0.031, -0.009, 0.038, -0.001, 0.002]
    o = over_seeds(means)
    half = stats.t.ppf(0.975, 4) * np.std(means, ddof=1) / np.sqrt(5)
    assert o["n_seeds"] == 5 and o["mean"] == pytest.approx(np.mean(means))
    assert (o["low"], o["high"]) == pytest.approx((np.mean(means) - half, np.mean(means) + half))
    assert not o["distinguishable"] and o["verdict"] == "not distinguishable from zero"
    assert over_seeds([0.02, 0.03, 0.025])["verdict"] == "as in the papers"
    assert over_seeds([0.02, 0.03, 0.025], direction=-1)["verdict"] == "opposite to the papers"
    one = over_seeds([0.05, float("nan")])           # a seed without a value is left out
    assert one["n_seeds"] == 1 and np.isnan(one["low"]) and one["verdict"] == "too few seeds to tell"
