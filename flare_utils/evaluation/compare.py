"""Paired comparisons of two models on the same held-out cases, with bootstrap confidence intervals.

Whether pseudo labels help is a paired question: both models score every held-out case, and the
per-case differences say how much one beats the other. The interval is a bootstrap over cases (cases
resampled with replacement, a fixed number of draws from a fixed seed, so a report is reproducible),
read with Hesterberg's expanded percentiles: a plain percentile interval covers far less than 95 %
with the 4-12 held-out cases of a small study, the expanded one about what it says. Over several
seeds (`pooled_difference`) the cases are resampled within each seed (different cohorts) or jointly
(one cohort, several training seeds), and the pooled difference is the mean over every (seed, case)
pair. A difference whose interval holds 0 is reported as not distinguishable from zero.

Details: docs/reference/metrics.md ("Comparing two models")
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from flare_utils.data.labels import ORGANS

__all__ = ["COMPARISONS", "Comparison", "PairedDifference", "paired_difference", "pooled_difference",
           "over_seeds", "case_scores", "run_case_scores", "run_comparisons"]

N_BOOT = 10_000
LEVEL = 0.95
# Below this many cases a bootstrap interval is the range of the differences or close to it, so two
# or three cases of the same sign would read as "distinguishable": no interval is given then.
MIN_CASES = 5


@dataclass(frozen=True)
class Comparison:
    """`model` against `baseline`; `direction` +1: the papers report `model` better."""
    model: str
    baseline: str
    question: str
    direction: int = 1


# The comparisons of the FLARE22 winner's Table 5 (names as registered in models.json).
COMPARISONS: tuple[Comparison, ...] = (
    Comparison("teacher_pseudo", "teacher", "pseudo labels improve the teacher"),
    Comparison("student_selected", "student_labelled_only", "selected pseudo labels improve the student"),
    Comparison("student_selected", "student_all", "selecting pseudo labels beats using all of them"),
    Comparison("student_all", "student_labelled_only", "all pseudo labels improve the student"),
)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of `model - baseline` over paired cases, with its bootstrap interval."""
    n_cases: int
    mean: float
    low: float
    high: float
    level: float = LEVEL

    @property
    def too_few_cases(self) -> bool:
        return self.n_cases < MIN_CASES

    @property
    def distinguishable(self) -> bool:
        """Whether the interval excludes zero."""
        return not self.too_few_cases and (self.low > 0 or self.high < 0)

    def sign(self) -> int:
        """+1 / -1 when the interval lies above / below zero, 0 when it holds zero."""
        return 0 if not self.distinguishable else (1 if self.mean > 0 else -1)

    def describe(self, decimals: int = 3) -> str:
        """e.g. "+0.012 [95 % CI -0.004, +0.027]; not distinguishable from zero (6 cases)"."""
        if self.n_cases == 0 or math.isnan(self.mean):
            return "no paired cases"
        f = f"{{:+.{decimals}f}}"
        if self.too_few_cases:
            return f"{f.format(self.mean)}; too few cases ({self.n_cases}) for an interval"
        verdict = ("not distinguishable from zero" if not self.distinguishable else
                   "above zero" if self.mean > 0 else "below zero")
        return (f"{f.format(self.mean)} [{self.level:.0%} CI {f.format(self.low)}, {f.format(self.high)}]; "
                f"{verdict} ({self.n_cases} cases)").replace("%", " %")

    def to_dict(self) -> dict:
        return {**asdict(self), "distinguishable": self.distinguishable}


def expanded_tail(level: float, n: int) -> float:
    """The tail probability at which to read the bootstrap distribution for a `level` interval of a
    mean of `n` values (Hesterberg 2015, "expanded percentile"): Phi(-sqrt(n/(n-1)) t_{n-1}), where a
    plain percentile interval reads (1 - level) / 2; this widens it for the small-sample bias of
    the bootstrap spread and the t-shape of a mean's distribution."""
    from scipy import stats
    t = stats.t.ppf(1 - (1 - level) / 2, df=n - 1)
    return float(stats.norm.cdf(-np.sqrt(n / (n - 1)) * t))


def _interval(draws: np.ndarray, level: float, n: int) -> tuple[float, float]:
    tail = expanded_tail(level, n)
    lo, hi = np.quantile(draws, [tail, 1 - tail])
    return float(lo), float(hi)


def paired_difference(model: Sequence[float], baseline: Sequence[float], *, n_boot: int = N_BOOT,
                      level: float = LEVEL, seed: int = 0) -> PairedDifference:
    """Mean per-case difference `model - baseline` (same cases, same order) and its percentile
    bootstrap interval over cases. Pairs where either score is NaN are left out."""
    return pooled_difference([(model, baseline)], n_boot=n_boot, level=level, seed=seed)


def pooled_difference(groups: Sequence[tuple[Sequence[float], Sequence[float]]], *, n_boot: int = N_BOOT,
                      level: float = LEVEL, seed: int = 0, shared_cases: bool = False) -> PairedDifference:
    """The paired difference pooled over groups (seeds): the mean over every (group, case) pair.

    Its interval resamples cases within each group (a stratified bootstrap: each seed its own cohort)
    or, with `shared_cases`, one draw of case indices for all groups (the same held-out cases in the
    same order in every group, e.g. training seeds on one cohort), so that a case counts once."""
    pairs = []
    for a, b in groups:
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            raise ValueError(f"paired scores need the same cases: {a.shape} vs {b.shape}")
        pairs.append(a - b)
    if shared_cases:
        if len({d.shape for d in pairs}) > 1:
            raise ValueError("shared_cases: every group needs the same cases")
        # a case is one unit: its differences over the groups are averaged (NaN groups skipped)
        stacked = np.vstack(pairs) if pairs else np.empty((0, 0))
        finite = np.isfinite(stacked)
        with np.errstate(invalid="ignore"):
            per_case = np.where(finite.any(axis=0),
                                np.nansum(np.where(finite, stacked, 0), axis=0) / np.maximum(finite.sum(axis=0), 1),
                                np.nan)
        weights = finite.sum(axis=0)
        keep = weights > 0
        diffs, weights = [per_case[keep]], [weights[keep].astype(np.float64)]
    else:
        diffs = [d[np.isfinite(d)] for d in pairs]
        weights = [np.ones(d.size) for d in diffs]
    kept = [(d, w) for d, w in zip(diffs, weights) if d.size]
    n_units = int(sum(d.size for d, _ in kept))
    n_pairs = int(sum(w.sum() for _, w in kept))
    if n_units == 0:
        return PairedDifference(0, math.nan, math.nan, math.nan, level)
    mean = float(sum((d * w).sum() for d, w in kept) / n_pairs)
    if n_units < MIN_CASES:
        return PairedDifference(n_units, mean, math.nan, math.nan, level)
    rng = np.random.default_rng(seed)
    totals, counts = np.zeros(n_boot), np.zeros(n_boot)
    for d, w in kept:     # each group's resampled weighted sum and weight, for every draw at once
        idx = rng.integers(0, d.size, size=(n_boot, d.size))
        totals += (d * w)[idx].sum(axis=1)
        counts += w[idx].sum(axis=1)
    low, high = _interval(totals / counts, level, n_units)
    return PairedDifference(n_units, mean, low, high, level)


def over_seeds(seed_means: Sequence[float], direction: int = 1, level: float = LEVEL) -> dict:
    """The difference with the seed as the unit: the mean of the per-seed mean differences and its
    t interval over seeds (n - 1 degrees of freedom). The pooled bootstrap resamples cases within
    the seeds that were run, so it leaves out how much a result moves from one cohort and training
    seed to the next; this interval includes that spread (and is wide with few seeds)."""
    from scipy import stats
    x = np.asarray([v for v in seed_means if v is not None and math.isfinite(v)], dtype=np.float64)
    n = int(x.size)
    out = {"n_seeds": n, "mean": float(x.mean()) if n else math.nan, "low": math.nan, "high": math.nan,
           "level": level, "method": "t interval over per-seed mean differences"}
    if n >= 2:
        half = float(stats.t.ppf(1 - (1 - level) / 2, df=n - 1) * x.std(ddof=1) / math.sqrt(n))
        out["low"], out["high"] = out["mean"] - half, out["mean"] + half
    above, below = out["low"] > 0, out["high"] < 0          # False when NaN
    out["distinguishable"] = bool(above or below)
    s = (1 if above else -1 if below else 0) * direction
    out["verdict"] = ("too few seeds to tell" if n < 2 else "as in the papers" if s > 0 else
                      "opposite to the papers" if s < 0 else "not distinguishable from zero")
    return out


def case_scores(per_case: pd.DataFrame, metric: str) -> pd.Series:
    """Each case's organ-averaged `metric` (NaN organs skipped), indexed by case name; cases without
    any value are dropped."""
    cols = [f"{o.flare_key}_{metric}" for o in ORGANS if f"{o.flare_key}_{metric}" in per_case.columns]
    if not cols or "Name" not in per_case.columns:
        return pd.Series(dtype=np.float64)
    values = per_case[cols].apply(pd.to_numeric, errors="coerce").astype(np.float64)
    scores = values.mean(axis=1, skipna=True)
    scores.index = per_case["Name"].astype(str)
    return scores.dropna()


def run_case_scores(run_dir: str | Path, metric: str = "DSC") -> dict[str, pd.Series]:
    """{model: per-case scores} of every prediction set the run's evaluation stage scored."""
    from flare_utils.layout import RunLayout
    from flare_utils.study.report import PER_CASE_CSV
    ev = RunLayout(Path(run_dir)).evaluation
    overview = ev / "overview.csv"
    if not overview.is_file():
        return {}
    from flare_utils.study.report import slug
    table = pd.read_csv(overview, dtype={"set": str, "folder": str})
    folders = table["folder"] if "folder" in table.columns else [None] * len(table)
    out = {}
    for name, folder in zip(table["set"], folders):
        candidates = [str(folder)] if isinstance(folder, str) and folder else []
        f = next((ev / c / PER_CASE_CSV for c in [*candidates, slug(name), str(name)]
                  if (ev / c / PER_CASE_CSV).is_file()), None)
        if f is not None:
            out[str(name)] = case_scores(pd.read_csv(f), metric)
    return out


def paired_scores(scores: dict[str, pd.Series], c: Comparison) -> tuple[np.ndarray, np.ndarray] | None:
    """The two models' scores on their common cases (sorted by name), or None when one is missing."""
    if c.model not in scores or c.baseline not in scores:
        return None
    common = sorted(set(scores[c.model].index) & set(scores[c.baseline].index))
    return scores[c.model].loc[common].to_numpy(), scores[c.baseline].loc[common].to_numpy()


def run_comparisons(run_dir: str | Path, metrics: Sequence[str] = ("DSC", "NSD"), *,
                    comparisons: Sequence[Comparison] = COMPARISONS, n_boot: int = N_BOOT,
                    seed: int = 0) -> pd.DataFrame:
    """One row per comparison and metric that the run can make: model, baseline, question, metric,
    cases, mean difference, CI low/high, whether it is distinguishable from zero, and the verdict
    relative to the papers' direction ("as in the papers", "opposite", "no difference shown")."""
    rows = []
    for metric in metrics:
        scores = run_case_scores(run_dir, metric)
        for c in comparisons:
            pair = paired_scores(scores, c)
            if pair is None:
                continue
            d = paired_difference(*pair, n_boot=n_boot, seed=seed)
            rows.append({"model": c.model, "baseline": c.baseline, "question": c.question, "metric": metric,
                         "cases": d.n_cases, "difference": d.mean, "ci_low": d.low, "ci_high": d.high,
                         "distinguishable": d.distinguishable, "verdict": verdict(d, c),
                         "summary": d.describe()})
    return pd.DataFrame(rows)


def verdict(d: PairedDifference, c: Comparison) -> str:
    """The difference read against the papers' direction."""
    if d.too_few_cases:
        return "too few cases to tell"
    s = d.sign() * c.direction
    return "as in the papers" if s > 0 else "opposite to the papers" if s < 0 else "not distinguishable from zero"
