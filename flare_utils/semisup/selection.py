"""Stability-based selection of pseudo labels (FLARE22 winner, equation (1)).

After K pseudo-labelling rounds (`flare_utils.semisup.rounds`), a case's stability score u is the
mean over consecutive round pairs of the voxels whose label changed, relative to the later round's
foreground. Small u = the rounds agree = a reliable pseudo label; the paper keeps u < 0.1.
`select_pseudo_labels(...)` scores every case, selects by threshold or fraction (`select_cases`),
and writes atomically the scores table and the selection files the pseudo-label trainers read.
A case whose organs vanished between two rounds has u = inf and is never selected.

Details: docs/reference/selection.md
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from flare_utils.errors import FlareInputError
from flare_utils.layout import RunLayout
from flare_utils.data.io import Geometry, atomic_write_text, nifti_by_case, read_label_map
from flare_utils.data.labels import LABELS
from flare_utils.utilities.parallel import map_processes

__all__ = ["DEFAULT_THRESHOLD", "SCORES_CSV", "SELECTION_FILE", "ALL_CASES_FILE", "SUMMARY_FILE", "stability_score",
           "pair_term", "compare_labels", "label_files", "check_rounds", "stability_scores",
           "select_cases", "select_pseudo_labels", "write_trainer_selection", "SelectionResult",
           "selection_quality", "case_overlay"]

DEFAULT_THRESHOLD = 0.1          # the paper's
SCORES_CSV = "stability_scores.csv"
SELECTION_FILE = "selection.json"
ALL_CASES_FILE = "selection_all.json"
SUMMARY_FILE = "selection_summary.json"
N_LABELS = max(LABELS) + 1       # 0 (background) .. 13


# ----------------------------------------------------------------------------------------------
# Equation (1)

def pair_term(prev: np.ndarray, cur: np.ndarray) -> tuple[float, int, int]:
    """(term, changed, foreground) of one round pair: SUM(cur != prev) / SUM(cur > 0), with the
    empty-prediction rule of the module docstring (0/0 -> 0, c/0 -> inf)."""
    if prev.shape != cur.shape:
        raise FlareInputError(None, f"label maps of consecutive rounds differ in shape: {prev.shape} vs {cur.shape}")
    changed = int(np.count_nonzero(cur != prev))
    fg = int(np.count_nonzero(cur > 0))
    if fg == 0:
        return (0.0 if changed == 0 else math.inf), changed, fg
    return changed / fg, changed, fg


def stability_score(rounds: Sequence[np.ndarray]) -> float:
    """u of equation (1) for one case's label maps y_1..y_K (arrays of one shape, K >= 2)."""
    rounds = list(rounds)
    if len(rounds) < 2:
        raise FlareInputError(None, f"the stability score needs at least two rounds, got {len(rounds)}")
    terms = [pair_term(rounds[i - 1], rounds[i])[0] for i in range(1, len(rounds))]
    return float(sum(terms) / (len(rounds) - 1))


def compare_labels(prev: np.ndarray, cur: np.ndarray, labels: Iterable[int] | None = None) -> dict[str, Any]:
    """Changed voxels, foreground volumes and per-organ Dice of two label maps (one pass).

    Returns {"changed", "fg_prev", "fg_cur", "changed_fraction" (changed / voxels), "term" (equation
    (1)'s ratio), "dsc": {label: Dice}} with Dice = 1 when the organ is absent from both maps.
    """
    if prev.shape != cur.shape:
        raise FlareInputError(None, f"label maps differ in shape: {prev.shape} vs {cur.shape}")
    a = np.asarray(prev).ravel()
    b = np.asarray(cur).ravel()
    n = int(max(N_LABELS, int(a.max(initial=0)) + 1, int(b.max(initial=0)) + 1))
    conf = np.bincount(a.astype(np.int64) * n + b.astype(np.int64), minlength=n * n).reshape(n, n)
    changed = int(conf.sum() - np.trace(conf))
    fg_prev = int(conf[1:, :].sum())
    fg_cur = int(conf[:, 1:].sum())
    term = (0.0 if changed == 0 else math.inf) if fg_cur == 0 else changed / fg_cur
    wanted = sorted(LABELS) if labels is None else [int(x) for x in labels]
    dsc = {}
    for lab in wanted:
        if lab >= n:
            dsc[lab] = 1.0
            continue
        sa, sb, inter = int(conf[lab, :].sum()), int(conf[:, lab].sum()), int(conf[lab, lab])
        dsc[lab] = 1.0 if sa + sb == 0 else 2.0 * inter / (sa + sb)
    return {"changed": changed, "fg_prev": fg_prev, "fg_cur": fg_cur,
            "changed_fraction": changed / max(1, a.size), "term": term, "dsc": dsc}


# ----------------------------------------------------------------------------------------------
# Files

def label_files(folder: str | Path) -> dict[str, Path]:
    """{case id: path} of the label maps (`<case>.nii.gz` / `.nii`) directly in a round folder;
    hidden files (unfinished atomic writes) are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FlareInputError(folder, "round folder not found")
    return nifti_by_case(folder)


def check_rounds(round_dirs: Sequence[str | Path], cases: Iterable[str] | None = None) -> list[str]:
    """The case ids present in every round folder (sorted); a case missing from one of them, or
    fewer than two folders, is a FlareInputError."""
    dirs = [Path(d) for d in round_dirs]
    if len(dirs) < 2:
        raise FlareInputError(None, f"the stability score needs at least two rounds (K >= 2), got {len(dirs)}")
    files = [label_files(d) for d in dirs]
    wanted = sorted(set().union(*[set(f) for f in files])) if cases is None else sorted({str(c) for c in cases})
    if not wanted:
        raise FlareInputError(dirs[0], "no label maps in the round folders")
    for d, f in zip(dirs, files):
        missing = [c for c in wanted if c not in f]
        if missing:
            more = f" ... ({len(missing)} in all)" if len(missing) > 10 else ""
            raise FlareInputError(d, f"round misses case(s) {missing[:10]}{more} that other rounds (or the "
                                     f"requested case list) have")
    return wanted


def _score_case(job: tuple) -> dict[str, Any]:
    case, paths = job
    prev: np.ndarray | None = None
    prev_geom: Geometry | None = None
    row: dict[str, Any] = {"case": case}
    terms = []
    fg_first = None
    for i, p in enumerate(paths, start=1):
        cur, geom = read_label_map(p)
        if prev_geom is not None:
            problem = prev_geom.mismatch(geom)
            if problem is not None:
                raise FlareInputError(p, f"case {case}: geometry differs from round {i - 1} "
                                         f"({paths[i - 2]}): {problem}")
        if prev is None:
            fg_first = int(np.count_nonzero(cur))
        else:
            term, changed, fg = pair_term(prev, cur)
            row[f"changed_{i}"] = changed
            row[f"fg_{i}"] = fg
            row[f"term_{i}"] = term
            terms.append(term)
        prev, prev_geom = cur, geom
    k = len(paths)
    row["u"] = float(sum(terms) / (k - 1))
    row["fg_first"] = fg_first
    row["fg_last"] = int(np.count_nonzero(prev))
    row["empty_last"] = row["fg_last"] == 0
    row["voxel_ml"] = float(np.prod(prev_geom.spacing)) / 1000.0
    return row


def stability_scores(round_dirs: Sequence[str | Path], cases: Iterable[str] | None = None,
                     processes: int = 1) -> pd.DataFrame:
    """u of every case present in the round folders (in round order y_1..y_K), one row per case
    (index `case`): u, changed_i / fg_i / term_i for i = 2..K, fg_first, fg_last, empty_last,
    voxel_ml. Only one case's K maps are in memory at a time (per worker)."""
    dirs = [Path(d) for d in round_dirs]
    ids = check_rounds(dirs, cases)
    files = [label_files(d) for d in dirs]
    jobs = [(c, [str(f[c]) for f in files]) for c in ids]
    rows = map_processes(_score_case, jobs, processes)
    df = pd.DataFrame(rows).set_index("case")
    df.attrs["rounds"] = [str(d) for d in dirs]
    return df


# ----------------------------------------------------------------------------------------------
# Selection

def _as_scores(scores: pd.DataFrame | pd.Series | Mapping[str, float]) -> pd.DataFrame:
    if isinstance(scores, pd.DataFrame):
        if "u" not in scores.columns:
            raise FlareInputError(None, "scores table has no 'u' column")
        df = scores.copy()
    elif isinstance(scores, pd.Series):
        df = scores.rename("u").to_frame()
    else:
        df = pd.DataFrame({"u": pd.Series(dict(scores), dtype=float)})
    df.index = df.index.map(str)
    df.index.name = "case"
    if df.index.has_duplicates:
        raise FlareInputError(None, f"case id(s) listed twice: {sorted(set(df.index[df.index.duplicated()]))}")
    u = pd.to_numeric(df["u"], errors="coerce").astype(float)
    if u.isna().any() or (u < 0).any():
        bad = list(df.index[u.isna() | (u < 0)])[:10]
        raise FlareInputError(None, f"stability scores must be numbers >= 0 (inf allowed); bad case(s): {bad}")
    df["u"] = u
    return df


def select_cases(scores: pd.DataFrame | pd.Series | Mapping[str, float], threshold: float | None = DEFAULT_THRESHOLD,
                 fraction: float | None = None, *, exclude_empty: bool = False) -> pd.DataFrame:
    """Mark the cases to keep: `selected` (bool) and `rank` (1 = most stable; by u, then case id).

    Exactly one rule: `threshold` (keep u < threshold) or `fraction` (keep round(fraction * N)
    cases, round half up, at least one when fraction > 0, lowest u first, ties by case id).
    Cases with u = inf are never kept; with `exclude_empty` neither are cases whose last-round
    label is empty (needs the `empty_last` column). Returns a copy sorted by rank.
    """
    if (threshold is None) == (fraction is None):
        raise FlareInputError(None, "give exactly one of threshold and fraction (pass threshold=None with fraction)")
    df = _as_scores(scores)
    df = df.assign(_case=df.index).sort_values(["u", "_case"], kind="mergesort").drop(columns="_case")
    df["rank"] = np.arange(1, len(df) + 1)
    eligible = np.isfinite(df["u"].to_numpy())
    if exclude_empty:
        if "empty_last" not in df.columns:
            raise FlareInputError(None, "exclude_empty needs the 'empty_last' column (from stability_scores)")
        eligible &= ~df["empty_last"].astype(bool).to_numpy()
    if threshold is not None:
        t = float(threshold)
        if not t > 0 or math.isnan(t):
            raise FlareInputError(None, f"threshold must be > 0, got {threshold}")
        selected = eligible & (df["u"].to_numpy() < t)
        rule = {"rule": "threshold", "threshold": t}
    else:
        f = float(fraction)
        if not 0.0 <= f <= 1.0:
            raise FlareInputError(None, f"fraction must be in [0, 1], got {fraction}")
        n_keep = int(math.floor(f * len(df) + 0.5 + 1e-9))
        if f > 0:
            n_keep = max(1, n_keep)
        order = np.flatnonzero(eligible)[:n_keep]          # df is sorted: eligible rows by rank
        selected = np.zeros(len(df), bool)
        selected[order] = True
        rule = {"rule": "fraction", "fraction": f, "n_requested": n_keep}
    df["selected"] = selected
    df.attrs["rule"] = {**rule, "exclude_empty": bool(exclude_empty)}
    return df


def write_trainer_selection(path: str | Path, cases: Sequence[str], labels_folder: str | Path,
                            images_folder: str | Path, meta: Mapping[str, Any] | None = None,
                            within: str | Path | None = None) -> Path:
    """Write the selection file that the pseudo-label trainers read - the ONE place that knows its
    format (`flare_utils.semisup.selection_file.write_selection_file`, which validates every file).
    `within`: the run folder (folders inside it are stored relative to the file)."""
    from flare_utils.semisup.selection_file import write_selection_file
    return write_selection_file(path, list(cases), labels_folder, images_folder, meta=dict(meta or {}),
                                within=within)


@dataclass
class SelectionResult:
    scores: pd.DataFrame              # every case, sorted by rank, with `selected`
    selected: list[str]
    rejected: list[str]
    rule: dict
    scores_csv: Path
    selection_file: Path | None       # None when nothing was selected (see `error`)
    summary_file: Path
    labels_folder: Path
    round_dirs: list[Path] = field(default_factory=list)
    all_cases_file: Path | None = None    # every scored case, same format (None: no case at all)
    within: Path | None = None            # the run folder: paths inside it are recorded relative to it

    def recorded(self, path: Path | None) -> str | None:
        """A path as the summary records it (relative to `within` when inside it)."""
        if path is None:
            return None
        return RunLayout(self.within).stored(path) if self.within is not None else str(path)

    @property
    def n_selected(self) -> int:
        return len(self.selected)

    def summary(self) -> dict[str, Any]:
        u = self.scores["u"]
        finite = u[np.isfinite(u)]
        return {"rule": self.rule, "n_cases": int(len(u)), "n_selected": self.n_selected,
                "n_rejected": len(self.rejected), "n_infinite": int((~np.isfinite(u)).sum()),
                "n_empty_last": int(self.scores.get("empty_last", pd.Series(False, index=u.index)).sum()),
                "u_min": float(finite.min()) if len(finite) else None,
                "u_median": float(finite.median()) if len(finite) else None,
                "u_max_finite": float(finite.max()) if len(finite) else None,
                "rounds": [self.recorded(d) for d in self.round_dirs], "labels_folder": self.recorded(self.labels_folder),
                "selection_file": self.recorded(self.selection_file),
                "all_cases_file": self.recorded(self.all_cases_file), "scores_csv": self.recorded(self.scores_csv)}


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    return v


def select_pseudo_labels(round_dirs: Sequence[str | Path], images_folder: str | Path, out_dir: str | Path, *,
                         threshold: float | None = DEFAULT_THRESHOLD, fraction: float | None = None,
                         labels_round: int = -1, exclude_empty: bool = False, cases: Iterable[str] | None = None,
                         processes: int = 1, meta: Mapping[str, Any] | None = None,
                         allow_empty_selection: bool = False, within: str | Path | None = None) -> SelectionResult:
    """Score every case over the rounds (equation (1)), select, write the scores CSV, the trainer's
    selection file and a summary (see module docstring), all atomically.

    round_dirs: the K round folders in order (y_1..y_K). images_folder: the unlabelled images
    (`<case>_0000.nii.gz`). labels_round: which round's labels the student learns from (index into
    round_dirs, default the last). Nothing selected is a FlareInputError (the scores CSV is
    written first, to look at) unless `allow_empty_selection` (then no selection file is written).
    """
    dirs = [Path(d) for d in round_dirs]
    rec = (lambda p: RunLayout(within).stored(p)) if within is not None else str     # noqa: E731
    out_dir = Path(out_dir)
    scores = stability_scores(dirs, cases, processes)
    sel = select_cases(scores, threshold, fraction, exclude_empty=exclude_empty)
    rule = dict(sel.attrs["rule"])
    try:
        labels_folder = dirs[labels_round]
    except IndexError:
        raise FlareInputError(None, f"labels_round {labels_round} is not one of the {len(dirs)} rounds") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    scores_csv = out_dir / SCORES_CSV
    atomic_write_text(scores_csv, sel.to_csv())
    selected = [str(c) for c in sel.index[sel["selected"]]]
    rejected = [str(c) for c in sel.index[~sel["selected"]]]
    selection_path: Path | None = out_dir / SELECTION_FILE
    if not selected:
        u = sel["u"]
        finite = u[np.isfinite(u)]
        msg = (f"no case selected by {rule} among {len(sel)} cases (smallest u: "
               f"{float(finite.min()) if len(finite) else 'none finite'}); raise the threshold or use a fraction; "
               f"scores: {scores_csv}")
        if not allow_empty_selection:
            raise FlareInputError(out_dir, msg)
        if selection_path.exists():
            selection_path.unlink()          # a stale selection must not outlive this decision
        selection_path = None
    else:
        m = {"source": "flare_utils.semisup.selection", "equation": "u = 1/(K-1) sum_i SUM(y_i != y_i-1) / SUM(y_i > 0)",
             "rounds": [rec(d) for d in dirs], "labels_round": rec(labels_folder), **rule,
             "scores": {c: _json_safe(float(sel.at[c, "u"])) for c in selected}, **dict(meta or {})}
        write_trainer_selection(selection_path, selected, labels_folder, images_folder, m, within=within)
    all_path: Path | None = out_dir / ALL_CASES_FILE
    if len(sel):
        write_trainer_selection(all_path, [str(c) for c in sel.index], labels_folder, images_folder,
                                {"source": "flare_utils.semisup.selection", "rule": "all", "rounds": [rec(d) for d in dirs],
                                 "labels_round": rec(labels_folder), **dict(meta or {})}, within=within)
    else:
        all_path = None
    result = SelectionResult(sel, selected, rejected, rule, scores_csv, selection_path, out_dir / SUMMARY_FILE,
                             labels_folder, dirs, all_path, None if within is None else Path(within))
    atomic_write_text(result.summary_file, json.dumps({k: _json_safe(v) for k, v in result.summary().items()},
                                                      indent=2, default=str))
    return result


# ----------------------------------------------------------------------------------------------
# Does the score find the good pseudo labels? (synthetic cohort: ground truth exists)

def selection_quality(scores: pd.DataFrame, quality: pd.DataFrame | pd.Series,
                      column: str = "mean_dsc") -> tuple[pd.DataFrame, dict[str, Any]]:
    """Join the scores (with `selected`) to a per-case pseudo-label quality (e.g. the mean DSC of
    the selected round's labels against ground truth) and summarise: Spearman's rho between u and
    the error 1 - quality (positive = unstable cases are the worse ones), mean quality of the
    selected and the rejected cases. Cases without a finite quality value are left out; u = inf
    ranks above every finite u."""
    from scipy.stats import spearmanr
    q = quality[column] if isinstance(quality, pd.DataFrame) else quality
    q = pd.to_numeric(q, errors="coerce").rename("quality")
    q.index = q.index.map(str)
    df = scores.join(q, how="inner")
    df = df[np.isfinite(df["quality"])]
    df["error"] = 1.0 - df["quality"]
    out: dict[str, Any] = {"n_cases": int(len(df)), "quality_column": column}
    if len(df) >= 3 and df["u"].nunique() > 1 and df["error"].nunique() > 1:
        u_rank = df["u"].replace(np.inf, np.finfo(float).max)
        rho, p = spearmanr(u_rank, df["error"])
        out.update(spearman_rho=float(rho), spearman_p=float(p))
    else:
        out.update(spearman_rho=None, spearman_p=None)
    if "selected" in df.columns:
        sel = df["selected"].astype(bool)
        out.update(n_selected=int(sel.sum()), n_rejected=int((~sel).sum()),
                   mean_quality_selected=float(df.loc[sel, "quality"].mean()) if sel.any() else None,
                   mean_quality_rejected=float(df.loc[~sel, "quality"].mean()) if (~sel).any() else None)
    return df, out


def case_overlay(case: str, labels_dir: str | Path, images_dir: str | Path | None = None,
                 truth_dir: str | Path | None = None, title: str | None = None):
    """Axial + coronal picture of one case: its pseudo label (and the ground truth when
    `truth_dir` has it) over the CT, in RAS+ orientation (`flare_utils.study.report.overlay_figure`)."""
    import nibabel as nib

    from flare_utils.data.io import load_nifti
    from flare_utils.study.report import find_case_file, overlay_figure

    def canonical(path, label):
        img = nib.as_closest_canonical(load_nifti(path))
        a = np.asanyarray(img.dataobj)
        a = a.reshape(a.shape[:3])
        return (np.rint(a).astype(np.int16) if label else a.astype(np.float32)), img.header.get_zooms()[:3]

    lp = find_case_file(labels_dir, case)
    if lp is None:
        raise FlareInputError(labels_dir, f"no label map for case {case!r}")
    pred, spacing = canonical(lp, True)
    image = gt = None
    if images_dir:
        ip = find_case_file(images_dir, case, image=True)
        if ip is not None:
            image, _ = canonical(ip, False)
    if truth_dir:
        tp = find_case_file(truth_dir, case)
        if tp is not None:
            gt, _ = canonical(tp, True)
    return overlay_figure(image, gt, pred, spacing=spacing, title=title or case)
