"""The efficient-inference stage (notebook 06): one or several models on a folder, and what it cost.

`run_inference_stage` predicts `input_dir` with each model (`flare_utils.inference.runs.predict_models`:
resumable, one output folder per model, an overview with several models), scores the DSC against a
ground truth when one is given, draws which windows ran on the longest scan (like Figure 2 of the
FLARE22 winner's paper) and writes `<showcase output>/efficiency/notebook_summary.json`.
`load_inference_result` rebuilds the same result from a finished stage's files, predicting nothing.

Files (unchanged from the notebook's own): under each model's output folder `<case>.nii.gz` and
`efficiency/` (`<case>.json`, `summary.csv`, `run.json`, `cases_efficiency.json`); under the shown
model's also `efficiency/windows_<case>.png` and `efficiency/notebook_summary.json`; with several
models `summary.csv` / `summary.json` in the output root (the evaluation stage reads the latter).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from flare_utils.data.io import atomic_write_text
from flare_utils.errors import FlareInputError
from flare_utils.inference.case_report import EFFICIENCY_DIR, RUN_JSON, SUMMARY_CSV
from flare_utils.inference.sliding_window import DEFAULT_CENTRE_THRESHOLD, DEFAULT_INPLANE_GRID, DEFAULT_INPLANE_STEP
from flare_utils.layout import RunLayout

NOTEBOOK_SUMMARY = "notebook_summary.json"     # <showcase output>/efficiency/notebook_summary.json

# per-case table of the shown model: file column -> title shown in the notebook
CASE_COLUMNS = {
    "case_id": "case", "skipped_existing": "skipped (existed)", "z_steps": "z steps",
    "windows_evaluated": "windows evaluated", "windows_grid": "windows of the 3x3 grid",
    "windows_paper_eq2": "windows, paper eq. (2)", "windows_nnunet_full": "windows, nnU-Net full",
    "time_read_s": "read (s)", "time_preprocess_s": "preprocess (s)", "time_network_s": "network (s)",
    "network_forward_s": "forward calls (s)", "time_resample_s": "resample (s)", "time_write_s": "write (s)",
    "total_s": "total (s)", "peak_rss_mib": "peak RAM (MiB)",
}


@dataclass
class InferenceResult:
    """What the inference stage produced: per model its predictions and efficiency, and the shown
    model's per-case table and window picture."""
    run: RunLayout
    models: dict[str, dict[str, Any]]          # name -> {"path": results folder, "folds": [...]}
    outputs: dict[str, Path]                   # name -> prediction folder
    showcase: str                              # the model whose cases and windows are shown
    overview: pd.DataFrame                     # one row per model (summary.csv's columns)
    cases: pd.DataFrame                        # per-case table of the showcase (efficiency/summary.csv's columns)
    dsc: dict[str, float | None] = field(default_factory=dict)   # mean DSC per model (with a ground truth)
    figure: Path | None = None                 # the window picture (PNG)
    summary: dict[str, Any] = field(default_factory=dict)        # notebook_summary.json
    summary_dir: Path | None = None            # where summary.csv / summary.json are (several models)
    wall_s: float | None = None                # wall time of the showcase's folder run

    @property
    def efficiency_dir(self) -> Path:
        return self.outputs[self.showcase] / EFFICIENCY_DIR

    def case_table(self) -> pd.DataFrame:
        """The showcase's per-case table with readable column titles (the files keep theirs)."""
        cols = [c for c in CASE_COLUMNS if c in self.cases.columns]
        return self.cases[cols].rename(columns=CASE_COLUMNS).set_index("case")

    def dsc_table(self) -> pd.DataFrame:
        return pd.Series(self.dsc, name="mean DSC (organs and cases)", dtype=float).to_frame()


def _resolve_models(run: RunLayout, models, model_dir, folds, output_dir, mode):
    """({name: model}, {name: output folder}, summary folder or None), as the notebook always did."""
    if models:
        root = Path(output_dir) if output_dir else run.inference
        return dict(models), {name: root / name for name in models}, root
    if not model_dir:
        found = sorted(p for p in run.nnunet_results.glob("Dataset*/*__*") if list(p.glob("fold_*")))
        if not found:
            raise FlareInputError(run.root, "model_dir is empty and no nnU-Net results folder was found in the run")
        model_dir = found[0]
    name = Path(model_dir).name
    return ({name: {"path": str(model_dir), "folds": folds}},
            {name: Path(output_dir) if output_dir else run.inference / mode}, None)


def _mean_dsc(outputs: Mapping[str, Path], tables: Mapping[str, pd.DataFrame],
              ground_truth_dir: str | Path | None, client=None) -> dict[str, float | None]:
    """Mean DSC (organs and cases) of each model's predictions with a ground truth."""
    if not ground_truth_dir:
        return {}
    from flare_utils.evaluation.evaluate import evaluate_folders
    gt = Path(ground_truth_dir)
    dsc = {}
    for name, t in tables.items():
        cases = [c for c in t["case_id"] if (gt / f"{c}.nii.gz").exists()]
        if not cases:
            dsc[name] = None
            continue
        res = evaluate_folders(outputs[name], gt, processes=1, allow_missing=False, cases=cases, client=client)
        dsc[name] = res.summary.get("mean_dsc")
    return dsc


def window_figure(model: Mapping[str, Any], eff_dir: Path, case_ids: Sequence[str], *, mode: str, device: str,
                  tta: bool, centre_threshold: int, inplane_step: float,
                  inplane_grid: str = DEFAULT_INPLANE_GRID) -> Path | None:
    """Draw which windows ran on the longest scan (most z steps) of `case_ids` into
    `eff_dir/windows_<case>.png` (the case is predicted once more to show its labels)."""
    import matplotlib.pyplot as plt

    from flare_utils.inference.figures import legend_handles, plot_window_map
    from flare_utils.inference.predictor import EfficientPredictor
    reports = {c: json.loads((eff_dir / f"{c}.json").read_text()) for c in case_ids
               if (eff_dir / f"{c}.json").is_file()}
    if not reports:
        return None
    predictor = EfficientPredictor.from_results_folder(model["path"], folds=model["folds"], mode=mode, device=device,
                                                       tta=tta, centre_threshold=centre_threshold,
                                                       inplane_step=inplane_step, inplane_grid=inplane_grid)
    case_id = max(reports, key=lambda c: (reports[c]["z_steps"], c))
    rep = reports[case_id]
    pre = predictor.preprocess(rep["input"], case_id=case_id)
    image = pre.data[0].cpu().numpy()
    labels, _, _ = predictor.predict_preprocessed(pre.data, pre.long_axis)
    labels = labels.cpu().numpy()
    la = rep["long_axis"]
    # network axis of the file's first voxel axis (left-right in RAS files) and of its second (front-back)
    lr_axis, ap_axis = pre.perm.index(0), pre.perm.index(1)
    fig, axes = plt.subplots(1, 2, figsize=(9, 6))
    for ax, (view_axis, name) in zip(axes, [(ap_axis, "coronal"), (lr_axis, "sagittal")]):
        if view_axis == la:
            ax.axis("off")
            continue
        plot_window_map(image, rep, view_axis, labels=labels, ax=ax, title=f"{case_id}: {name}")
    fig.legend(handles=legend_handles(), loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(f"{rep['windows_evaluated']} of {rep['windows_grid']} windows evaluated "
                 f"(nnU-Net full sliding window: {rep['windows_nnunet_full']})")
    path = eff_dir / f"windows_{case_id}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def run_inference_stage(run_dir: str | Path, models: Mapping[str, Mapping[str, Any]] | None = None,
                        model_dir: str | Path | None = None, folds: Sequence[int | str] | str = (0,),
                        input_dir: str | Path | None = None, output_dir: str | Path | None = None,
                        showcase: str | None = None, mode: str = "efficient", device: str = "auto",
                        tta: bool = False, centre_threshold: int = DEFAULT_CENTRE_THRESHOLD,
                        inplane_step: float = DEFAULT_INPLANE_STEP, ground_truth_dir: str | Path | None = None,
                        inplane_grid: str = DEFAULT_INPLANE_GRID,
                        cluster: Mapping[str, Any] | None = None,
                        *, log: Callable[[str], None] = print) -> InferenceResult:
    """Predict `input_dir` with `models` ({name: {"path", "folds"}}, the runner's) or the one model
    `model_dir` / `folds` (default: the run's first nnU-Net results folder) and write the reports.

    output_dir: several models: the root of one folder per model (default `<run>/inference`, with
    summary.csv / summary.json); one model: its predictions (default `<run>/inference/<mode>`).
    showcase: the model whose per-case table and window picture are made (default: the last one).
    ground_truth_dir: `<case>.nii.gz` label maps, for the mean DSC of each model.
    cluster: the params' `cluster:` section (`flare_utils.distributed.ClusterParams` fields; None or
    type local: in-process): the cases are predicted (and scored) on that Dask cluster, one task per
    case, opened for the stage and closed at its end (the window picture is drawn in this process)."""
    from flare_utils.distributed.cluster import as_cluster_params, open_cluster
    from flare_utils.inference.runs import predict_models
    cluster_params = as_cluster_params(cluster or None)     # a bad section fails before anything runs
    run = RunLayout(run_dir)
    if not input_dir:
        raise FlareInputError(None, "input_dir is empty: give the folder of images to segment")
    folds = list(folds) if isinstance(folds, (list, tuple)) else [folds]
    models, outputs, summary_dir = _resolve_models(run, models, model_dir, folds, output_dir, mode)
    showcase = showcase or list(models)[-1]
    if showcase not in models:
        raise FlareInputError(None, f"showcase {showcase!r} is not one of the models {list(models)}")
    log(f"{len(models)} model(s): {', '.join(models)}; mode {mode}, TTA {tta}, device {device}\ninput: {input_dir}")
    with open_cluster(cluster_params, device=device, say=log) as client:
        overview, tables = predict_models(models, input_dir, outputs, mode=mode, device=device, tta=tta,
                                          centre_threshold=centre_threshold, inplane_step=inplane_step,
                                          inplane_grid=inplane_grid, summary_dir=summary_dir, log=log, client=client)
        dsc = _mean_dsc(outputs, tables, ground_truth_dir, client=client)
    table = tables[showcase]
    eff_dir = outputs[showcase] / EFFICIENCY_DIR
    figure = window_figure(models[showcase], eff_dir, list(table["case_id"]), mode=mode, device=device, tta=tta,
                           centre_threshold=centre_threshold, inplane_step=inplane_step,
                           inplane_grid=inplane_grid)
    summary = {
        "model_dir": str(models[showcase]["path"]), "showcase": showcase, "models": list(models),
        "folds": [int(f) if str(f).isdigit() else f for f in models[showcase]["folds"]],
        "mode": mode, "tta": bool(tta), "device": str(device), "centre_threshold": int(centre_threshold),
        "inplane_step": float(inplane_step), "inplane_grid": inplane_grid,
        "output_dir": str(outputs[showcase]), "cases": int(len(table)),
        "windows_evaluated": int(table["windows_evaluated"].sum()),
        "windows_nnunet_full": int(table["windows_nnunet_full"].sum()), "mean_dsc": dsc.get(showcase),
        "figure": str(figure) if figure else None,
        "mean_dsc_per_model": dsc,
    }
    atomic_write_text(eff_dir / NOTEBOOK_SUMMARY, json.dumps(summary, indent=2))
    return InferenceResult(run, models, outputs, showcase, overview, table, dsc, figure, summary, summary_dir,
                           table.attrs.get("wall_s"))


def _overview_row(name: str, table: pd.DataFrame) -> dict[str, Any]:
    """A model's row of the overview, from its per-case table (as `predict_models` makes it)."""
    skipped = table["skipped_existing"].astype(bool) if "skipped_existing" in table else pd.Series(False, table.index)
    return {"model": name, "cases": int(len(table)), "predicted now": int((~skipped).sum()),
            "windows_evaluated": int(table["windows_evaluated"].sum()),
            "windows_nnunet_full": int(table["windows_nnunet_full"].sum()),
            "mean_total_s": float(table["total_s"].mean()), "mean_network_s": float(table["time_network_s"].mean()),
            "peak_rss_mib": float(table["peak_rss_mib"].max()) if "peak_rss_mib" in table else float("nan")}


def _existing(path: str | Path, fallback: Path) -> Path:
    """A recorded folder, or where it is now when the run folder was moved."""
    p = Path(path)
    return p if p.exists() or not fallback.exists() else fallback


def load_inference_result(run_dir: str | Path, output_dir: str | Path | None = None) -> InferenceResult:
    """The result of a finished inference stage, read from its files (nothing is predicted or written).

    output_dir: the folder the stage wrote to, when not the run's `inference/` (several models: the
    root of the model folders; one model: its prediction folder or the root holding it)."""
    from flare_utils.inference.runs import SUMMARY_CSV as OVERVIEW_CSV, SUMMARY_JSON
    run = RunLayout(run_dir)
    root = Path(output_dir) if output_dir else run.inference
    summary_dir, outputs, models = None, {}, {}
    if (root / SUMMARY_JSON).is_file():                       # several models
        summary_dir = root
        entries = json.loads((root / SUMMARY_JSON).read_text())["models"]
        for name, e in entries.items():
            outputs[name] = _existing(root / e["output_dir"], root / name)       # relative to the summary
            models[name] = {"path": e["path"], "folds": e["folds"]}
        candidates = [outputs[n] / EFFICIENCY_DIR / NOTEBOOK_SUMMARY for n in outputs]
    else:                                                     # one model: <root>/<mode> or root itself
        candidates = [root / EFFICIENCY_DIR / NOTEBOOK_SUMMARY, *root.glob(f"*/{EFFICIENCY_DIR}/{NOTEBOOK_SUMMARY}")]
    candidates = [c for c in candidates if c.is_file()]
    if not candidates:
        raise FlareInputError(root, "the inference stage of this run has not finished (no "
                                    f"{EFFICIENCY_DIR}/{NOTEBOOK_SUMMARY} of a model's predictions)")
    summary_file = max(candidates, key=lambda c: c.stat().st_mtime_ns)
    summary = json.loads(summary_file.read_text())
    showcase = summary["showcase"]
    eff_dir = summary_file.parent
    if not models:
        outputs = {showcase: eff_dir.parent}
        models = {showcase: {"path": summary["model_dir"], "folds": summary["folds"]}}
    cases = pd.read_csv(eff_dir / SUMMARY_CSV)
    if summary_dir is not None and (summary_dir / OVERVIEW_CSV).is_file():
        overview = pd.read_csv(summary_dir / OVERVIEW_CSV, index_col="model")
    else:
        overview = pd.DataFrame([_overview_row(showcase, cases)]).set_index("model")
    dsc = summary.get("mean_dsc_per_model")
    if dsc is None:                                           # written before the per-model DSC was kept
        dsc = {showcase: summary["mean_dsc"]} if summary.get("mean_dsc") is not None else {}
    figure = None
    if summary.get("figure"):
        figure = _existing(summary["figure"], eff_dir / Path(summary["figure"]).name)
        figure = figure if figure.is_file() else None
    wall_s = None
    if (eff_dir / RUN_JSON).is_file():
        wall_s = json.loads((eff_dir / RUN_JSON).read_text()).get("wall_s")
    return InferenceResult(run, models, outputs, showcase, overview, cases, dsc, figure, summary, summary_dir,
                           wall_s)
