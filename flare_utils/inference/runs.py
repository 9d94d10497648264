"""Efficient inference of several trained models on one folder (the study's held-out cases).

The comparison of a study (teacher vs students, with and without pseudo labels) needs every
model's predictions on the same cases, with the same predictor settings, and their efficiency
side by side. `predict_models` runs `EfficientPredictor.predict_folder` per model (resumable: cases
already written are skipped), collects each case's efficiency figures into one timing file per
model (the format `flare_utils.study.report.efficiency_table` reads) and writes an overview.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from flare_utils.data.io import atomic_write_text
from flare_utils.errors import FlareInputError
from flare_utils.inference.case_report import EFFICIENCY_DIR
from flare_utils.inference.defaults import DEFAULT_CENTRE_THRESHOLD, DEFAULT_INPLANE_GRID, DEFAULT_INPLANE_STEP

CASES_EFFICIENCY = "cases_efficiency.json"
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"


def _timing_file(out_dir: Path, case_ids) -> Path | None:
    """One EfficiencyReport per predicted case (monitor figures), under "cases"."""
    eff = out_dir / EFFICIENCY_DIR
    cases = []
    for c in case_ids:
        f = eff / f"{c}.json"
        if f.is_file():
            e = json.loads(f.read_text()).get("efficiency")
            if e:
                cases.append(e)
    if not cases:
        return None
    return atomic_write_text(eff / CASES_EFFICIENCY, json.dumps({"cases": cases}, indent=1))


def _recorded(path: Path, folder: Path) -> str:
    """`path` relative to `folder` when inside it, else absolute (readers join it to the folder)."""
    p = Path(path).resolve()
    return p.relative_to(folder.resolve()).as_posix() if p.is_relative_to(folder.resolve()) else str(p)


def predict_models(models: Mapping[str, Mapping[str, Any]], input_dir: str | Path,
                   outputs: Mapping[str, str | Path], *, mode: str = "efficient", device: str = "auto",
                   tta: bool = False, centre_threshold: int = DEFAULT_CENTRE_THRESHOLD,
                   inplane_step: float = DEFAULT_INPLANE_STEP, inplane_grid: str = DEFAULT_INPLANE_GRID,
                   summary_dir: str | Path | None = None,
                   log=print, client=None) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Predict `input_dir` with each model ({name: {"path": results folder, "folds": [...]}}) into
    `outputs[name]`. Returns (one overview row per model, {name: per-case table}); with
    `summary_dir` the overview is also written there (summary.csv, summary.json with each model's
    output folder and timing file, which the evaluation stage reads).
    `client`: a `distributed.Client` (`flare_utils.distributed.open_cluster`): each model's cases are
    predicted on its workers, one task per case, each worker building the model once
    (`cluster_folder.predict_folder_on_cluster`: the same files; this process writes the summaries)."""
    if not models:
        raise FlareInputError(None, "no model to predict with")
    missing = [n for n in models if n not in outputs]
    if missing:
        raise FlareInputError(None, f"no output folder for model(s) {missing}")
    options = {"mode": mode, "device": device, "tta": tta, "centre_threshold": centre_threshold,
               "inplane_step": inplane_step, "inplane_grid": inplane_grid}
    rows, tables, entries = [], {}, {}
    for name, m in models.items():
        out = Path(outputs[name])
        if client is not None:
            from flare_utils.inference.cluster_folder import predict_folder_on_cluster
            log(f"{name}: {m['path']} folds {list(m.get('folds', (0,)))} -> {out} (on the Dask cluster)")
            table = predict_folder_on_cluster(client, m["path"], input_dir, out, folds=m.get("folds", (0,)),
                                              options=options, log=log)
        else:
            from flare_utils.inference.predictor import EfficientPredictor   # imports nnU-Net: only when used
            predictor = EfficientPredictor.from_results_folder(m["path"], folds=m.get("folds", (0,)), **options)
            log(f"{name}: {m['path']} folds {list(predictor.folds)} -> {out}")
            table = predictor.predict_folder(input_dir, out)
            del predictor
        tables[name] = table
        timing = _timing_file(out, table["case_id"])
        predicted = table[~table["skipped_existing"].astype(bool)] if "skipped_existing" in table else table
        rows.append({
            "model": name, "cases": int(len(table)), "predicted now": int(len(predicted)),
            "windows_evaluated": int(table["windows_evaluated"].sum()),
            "windows_nnunet_full": int(table["windows_nnunet_full"].sum()),
            "mean_total_s": float(table["total_s"].mean()),
            "mean_network_s": float(table["time_network_s"].mean()),
            "peak_rss_mib": float(table["peak_rss_mib"].max()) if "peak_rss_mib" in table else float("nan"),
        })
        entries[name] = {"path": str(m["path"]), "folds": [str(f) for f in m.get("folds", (0,))],
                         "output_dir": out, "run_report": timing}
    overview = pd.DataFrame(rows).set_index("model")
    if summary_dir is not None:
        d = Path(summary_dir)
        d.mkdir(parents=True, exist_ok=True)
        for e in entries.values():       # folders beside the summary are recorded relative to it (a moved run keeps them)
            for key in ("output_dir", "run_report"):
                e[key] = None if e[key] is None else _recorded(e[key], d)
        atomic_write_text(d / SUMMARY_CSV, overview.to_csv())
        atomic_write_text(d / SUMMARY_JSON, json.dumps(
            {"input_dir": str(input_dir), "mode": mode, "tta": bool(tta), "device": device,
             "centre_threshold": int(centre_threshold), "inplane_step": float(inplane_step),
             "inplane_grid": inplane_grid, "models": entries}, indent=1))
    return overview, tables
