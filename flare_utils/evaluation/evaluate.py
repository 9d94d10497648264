"""Folder-level FLARE22 evaluation: per-case CSV in the official layout and a JSON summary.

``evaluate_folders(pred_dir, gt_dir, out_dir)`` matches predictions to ground truths by case id
(file name without .nii.gz/.nii), scores every case with flare_utils.evaluation.metrics in parallel
worker processes, and writes ``metrics_per_case.csv`` (the official column layout, values not
rounded unless ``decimals=4``) and ``summary.json`` (per-organ and overall means; NaN and inf
values are skipped and counted). Both files are written atomically. Label values outside 0-13
count as background, as in the official script, with a warning and a count in the summary
(``n_cases_with_unknown_labels``, ``unknown_label_values``); ``strict=True`` refuses them.

Details: docs/reference/metrics.md
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from flare_utils.errors import FlareInputError
from flare_utils.data.io import atomic_write_text, nifti_by_case, read_label_map
from flare_utils.data.labels import NUM_CLASSES, ORGANS
from flare_utils.evaluation.metrics import DEFAULT_REVISION, _check_revision, evaluate_case, scores_to_row
from flare_utils.distributed.cases import map_ordered

CSV_NAME = "metrics_per_case.csv"
SUMMARY_NAME = "summary.json"


@dataclass
class EvaluationResult:
    per_case: pd.DataFrame
    summary: dict[str, Any]

    @property
    def revision(self) -> str:
        return self.summary["revision"]


def _nifti_files(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise FlareInputError(folder, f"{what} folder does not exist")
    return nifti_by_case(folder)


def _fmt_ids(ids: Iterable[str], limit: int = 20) -> str:
    ids = sorted(ids)
    s = ", ".join(ids[:limit])
    return s + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def _unknown_labels(path: str, labels: np.ndarray, strict: bool) -> list[int]:
    """Label values of a map outside 0..13 (scored as background); a FlareInputError when `strict`."""
    values = np.unique(labels)
    bad = [int(v) for v in values if not 0 <= v < NUM_CLASSES]
    if bad and strict:
        raise FlareInputError(path, f"label values {bad} are outside 0-{NUM_CLASSES - 1} (the FLARE22 labels); "
                                    "strict evaluation refuses them (without strict=True / --strict they "
                                    "count as background, as in the official script)")
    return bad


def _evaluate_one(task: tuple) -> tuple[str, dict | None, tuple | None, list[int]]:
    """Worker (top level, so spawn can pickle it): (case id, row, error, label values outside 0-13)
    for one case."""
    case_id, pred_path, gt_path, kw, strict = task
    try:
        gt, g_geom = read_label_map(gt_path)
        unknown = _unknown_labels(gt_path, gt, strict)
        if pred_path is None:  # allow_missing: an empty prediction
            pred = np.zeros_like(gt)
        else:
            pred, p_geom = read_label_map(pred_path)
            problem = g_geom.mismatch(p_geom)
            if problem is not None:
                raise FlareInputError(pred_path, f"geometry differs from the ground truth {gt_path}: {problem}")
            unknown = sorted(set(unknown) | set(_unknown_labels(pred_path, pred, strict)))
        scores = evaluate_case(pred, gt, g_geom.spacing, **kw)
        return case_id, scores_to_row(scores, hd95=kw.get("hd95", False)), None, unknown
    except FlareInputError as e:
        # FlareInputError does not survive pickling (custom __init__): send its parts back.
        return case_id, None, (str(e.path) if e.path is not None else None, e.problem), []


def _stats(values: np.ndarray, skip_inf: bool = False) -> dict[str, float | int]:
    v = np.asarray(values, dtype=np.float64)
    nan = np.isnan(v)
    inf = np.isinf(v)
    keep = ~nan & ~inf if skip_inf else ~nan
    out: dict[str, float | int] = {
        "mean": float(np.mean(v[keep])) if keep.any() else float("nan"),
        "std": float(np.std(v[keep])) if keep.any() else float("nan"),
        "n_nan": int(nan.sum()),
    }
    if skip_inf:
        out["n_inf"] = int(inf.sum())
    return out


def summarize(per_case: pd.DataFrame, revision: str, hd95: bool = False) -> dict[str, Any]:
    """The summary.json content for a per-case table in the FLARE layout."""
    metrics = ["DSC", "NSD"] + (["HD95"] if hd95 else [])
    per_organ: dict[str, Any] = {}
    per_key: dict[str, Any] = {}
    for o in ORGANS:
        if f"{o.flare_key}_DSC" not in per_case.columns:
            continue
        entry: dict[str, Any] = {"label": o.label, "name": o.name, "flare_key": o.flare_key}
        for m in metrics:
            st = _stats(per_case[f"{o.flare_key}_{m}"].to_numpy(), skip_inf=(m == "HD95"))
            for k, v in st.items():
                entry[f"{m.lower()}_{k}"] = v
        per_organ[o.name] = entry
        per_key[o.flare_key] = entry
    def _mean_of(key: str) -> float:
        vals = [e[key] for e in per_organ.values() if not math.isnan(e[key])]
        return float(np.mean(vals)) if vals else float("nan")
    summary: dict[str, Any] = {
        "revision": revision,
        "n_cases": int(len(per_case)),
        "mean_dsc": _mean_of("dsc_mean"),
        "mean_nsd": _mean_of("nsd_mean"),
    }
    if hd95:
        summary["mean_hd95"] = _mean_of("hd95_mean")
    summary["std_ddof"] = 0
    summary["per_organ"] = per_organ
    summary["per_flare_key"] = per_key
    return summary



def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def evaluate_folders(pred_dir: str | Path, gt_dir: str | Path, out_dir: str | Path | None = None, *,
                     revision: str = DEFAULT_REVISION, hd95: bool = False, processes: int = 2,
                     cases: Iterable[str] | None = None, allow_missing: bool = False,
                     exact_official_zcut: bool = True, decimals: int | None = None,
                     strict: bool = False, client=None) -> EvaluationResult:
    """Score every ground-truth case in `gt_dir` against `pred_dir/<case>.nii.gz`.

    cases: restrict to these case ids (each must have a ground truth).
    allow_missing: score a missing prediction as an empty label map instead of raising.
    strict: refuse label values outside 0-13 (FlareInputError naming the file); by default they count
        as background, as in the official script, with a warning and counts in the summary.
    processes: worker processes (spawned); 1 evaluates in this process.
    client: a `distributed.Client` (`flare_utils.distributed.open_cluster`): one task per case on its
        workers instead of local processes (`distributed.cases.map_ordered`); the same results.
    decimals: round the CSV / DataFrame values (the official script rounds to 4); the summary is
        always computed from unrounded values.
    JSON has no NaN/inf: NaN is written as null and inf as the string "inf".
    """
    revision = _check_revision(revision)
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    gts = _nifti_files(gt_dir, "ground-truth")
    preds = _nifti_files(pred_dir, "prediction")
    if cases is not None:
        wanted = [str(c) for c in cases]
        unknown = [c for c in wanted if c not in gts]
        if unknown:
            raise FlareInputError(gt_dir, f"no ground truth for requested case(s): {_fmt_ids(unknown)}")
        gts = {c: gts[c] for c in wanted}
    else:
        extra = set(preds) - set(gts)
        if extra:
            raise FlareInputError(pred_dir, f"prediction(s) without ground truth in {gt_dir}: {_fmt_ids(extra)}")
    if not gts:
        raise FlareInputError(gt_dir, "no ground-truth NIfTI files to evaluate")
    missing = set(gts) - set(preds)
    if missing and not allow_missing:
        raise FlareInputError(pred_dir, f"missing prediction(s) for case(s): {_fmt_ids(missing)} "
                                        "(pass allow_missing=True, on the command line --allow-missing, to score them as empty)")

    kw = {"revision": revision, "hd95": hd95, "exact_official_zcut": exact_official_zcut}
    tasks = [(cid, str(preds[cid]) if cid in preds else None, str(gts[cid]), kw, bool(strict))
             for cid in sorted(gts)]
    results = map_ordered(_evaluate_one, tasks, client=client, processes=processes, key_prefix="evaluate")
    for _cid, _row, err, _unknown in results:
        if err is not None:
            raise FlareInputError(err[0], err[1])

    rows = []
    for (cid, row, _err, _unknown), task in zip(results, tasks):
        rows.append({"Name": Path(task[2]).name, **row})
    per_case = pd.DataFrame(rows)
    summary = summarize(per_case, revision, hd95)
    unknown = {cid: u for cid, _row, _err, u in results if u}
    values = sorted(set().union(*unknown.values())) if unknown else []
    summary["n_cases_with_unknown_labels"] = len(unknown)
    summary["unknown_label_values"] = values
    summary["cases_with_unknown_labels"] = sorted(unknown)
    if unknown:
        warnings.warn(f"{len(unknown)} case(s) hold label values outside 0-{NUM_CLASSES - 1} ({values}), scored as "
                      f"background as in the official script: {_fmt_ids(unknown)} (strict=True / --strict "
                      "refuses them)", UserWarning, stacklevel=2)
    per_case["Revision"] = revision
    if decimals is not None:
        num = per_case.columns[1:-1]
        per_case[num] = per_case[num].round(decimals)

    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / CSV_NAME, per_case.to_csv(index=False))
        atomic_write_text(out / SUMMARY_NAME, json.dumps(_json_safe(summary), indent=2) + "\n")
    return EvaluationResult(per_case, summary)
