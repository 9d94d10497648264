"""Tables and pictures for the study's reports. No metric is computed here.

Everything reads what other stages wrote (per-case metric CSVs, efficiency JSON files, NIfTI
images and label maps, the conversion summary). Figures are `matplotlib.figure.Figure` objects,
never pyplot's global state, and are drawn inside ``plot_style()``, isolated from the process's
rcParams (nnU-Net's logger sets seaborn's 2.5x fonts while training). Slice pictures expect arrays
in RAS+ voxel order and are shown in the radiological convention.

Details: docs/reference/reports.md
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import pandas as pd
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from flare_utils.errors import FlareInputError
from flare_utils.data.io import atomic_path, atomic_write_text, case_id_from_path, load_nifti
from flare_utils.data.labels import LABELS, ORGANS

NOT_MEASURED = "not measured"     # same text as flare_utils.evaluation.efficiency.NOT_MEASURED
CT_WINDOW = (-160.0, 240.0)       # abdominal soft-tissue window (HU) for the slice pictures
PER_CASE_CSV = "metrics_per_case.csv"
METRICS = ("DSC", "NSD", "HD95")

# The FLARE colour of each organ label (RGB 0-255), defined once for every picture.
LABEL_COLORS: dict[int, tuple[int, int, int]] = {
    1: (221, 84, 60),     # liver
    2: (73, 196, 84),     # right kidney
    3: (62, 112, 230),    # spleen
    4: (242, 202, 60),    # pancreas
    5: (232, 30, 50),     # aorta
    6: (40, 190, 225),    # inferior vena cava
    7: (250, 135, 20),    # right adrenal gland
    8: (170, 95, 225),    # left adrenal gland
    9: (150, 230, 110),   # gallbladder
    10: (245, 120, 190),  # esophagus
    11: (150, 155, 250),  # stomach
    12: (200, 160, 100),  # duodenum
    13: (25, 135, 90),    # left kidney
}
assert set(LABEL_COLORS) == set(LABELS), "one colour per FLARE22 label"


def label_colormap() -> ListedColormap:
    """14 colours: index 0 (background) fully transparent, then the 13 organ colours."""
    colors = [(0.0, 0.0, 0.0, 0.0)]
    colors += [(*(c / 255.0 for c in LABEL_COLORS[o.label]), 1.0) for o in ORGANS]
    return ListedColormap(colors, name="flare22")


def label_norm() -> BoundaryNorm:
    """Maps label value v to colormap index v exactly (use with label_colormap)."""
    return BoundaryNorm(np.arange(-0.5, len(ORGANS) + 1.0), len(ORGANS) + 1)


# ----------------------------------------------------------------------------------------------
# plotting style, isolated from the process's global rcParams

# Applied on top of matplotlib's defaults (not of whatever rcParams hold: see plot_style).
PLOT_STYLE: dict[str, object] = {
    "font.size": 10.0,
    "axes.titlesize": 11.0,
    "axes.labelsize": 10.0,
    "xtick.labelsize": 9.0,
    "ytick.labelsize": 9.0,
    "legend.fontsize": 9.0,
    "legend.title_fontsize": 9.0,
    "figure.titlesize": 12.0,
    "figure.dpi": 100.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
}

_F = TypeVar("_F", bound=Callable)


@contextlib.contextmanager
def plot_style() -> Iterator[None]:
    """matplotlib's default rcParams plus PLOT_STYLE for the duration of the block; the previous
    rcParams (e.g. seaborn's ``sns.set(font_scale=2.5)``, which nnU-Net's logger applies
    process-wide) come back afterwards. The backend is left alone."""
    import matplotlib.style
    with matplotlib.style.context(PLOT_STYLE, after_reset=True):
        yield


def _freeze_ticks(ax, *, from_style: bool = False) -> None:
    """Make the tick label size of `ax` explicit. matplotlib creates (and counts) ticks again at
    every draw, reading ``x/ytick.labelsize`` from the rcParams of that moment unless the Axis holds
    an explicit size; a figure shown or saved after seaborn's style was set would get other ticks.
    The size is the one the ticks were made with, or (from_style, for an Axes the caller made
    outside plot_style) the current rcParams', which then also size the axis labels."""
    import matplotlib as mpl
    for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
        if from_style:
            axis.label.set_fontsize(mpl.rcParams["axes.labelsize"])
        for which, ticks in (("major", axis.majorTicks), ("minor", axis.minorTicks)):
            size = mpl.rcParams[f"{name}tick.labelsize"] if from_style else ticks[0].label1.get_fontsize()
            axis.set_tick_params(which=which, labelsize=size)


def styled(func: _F) -> _F:
    """Decorator: run a figure function inside plot_style().

    Font sizes, colours and tick settings are fixed when the artists are created, and the tick
    label sizes are made explicit (_freeze_ticks), so a Figure made here looks the same when it is
    saved or shown later, outside the block, whatever the global rcParams are then. A function that
    draws on a caller's Axes (and returns it) gets the same treatment for that Axes.
    """
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from matplotlib.axes import Axes
        with plot_style():
            out = func(*args, **kwargs)
            if isinstance(out, Figure):
                for ax in out.axes:
                    _freeze_ticks(ax)
            elif isinstance(out, Axes):
                _freeze_ticks(out, from_style=True)
        return out
    return wrapper  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# small helpers

def slug(name: str) -> str:
    """A folder-safe form of a prediction-set name: 'With pseudo labels' -> 'with-pseudo-labels'."""
    s = re.sub(r"[^0-9a-zA-Z]+", "-", str(name)).strip("-").lower()
    return s or "set"


def set_slugs(names: Iterable[str]) -> dict[str, str]:
    """slug() of each name; two names with the same slug are an error (their outputs would mix)."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for n in names:
        s = slug(n)
        if s in seen:
            raise FlareInputError(None, f"prediction sets {seen[s]!r} and {n!r} have the same folder "
                                        f"name {s!r}; rename one of them")
        seen[s] = n
        out[n] = s
    return out



def save_table(df: pd.DataFrame, path: str | Path, *, index: bool = True) -> Path:
    """Write a table as CSV atomically (temporary sibling, then rename)."""
    return atomic_write_text(Path(path), df.to_csv(index=index))


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 110) -> Path:
    """Write a figure (format from the suffix) atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    return Path(path)


def read_per_case(path: str | Path) -> pd.DataFrame:
    """A per-case metric table: a CSV file, or a folder holding metrics_per_case.csv."""
    path = Path(path)
    if path.is_dir():
        path = path / PER_CASE_CSV
    if not path.is_file():
        raise FlareInputError(path, "per-case metrics CSV is missing")
    try:
        df = pd.read_csv(path)
    except (ValueError, OSError) as e:
        raise FlareInputError(path, f"unreadable CSV ({type(e).__name__}: {e})") from e
    if "Name" not in df.columns:
        raise FlareInputError(path, "not a per-case metrics table (no 'Name' column)")
    return df


def _metric_columns(df: pd.DataFrame, metric: str) -> list[tuple[str, str]]:
    """(organ title, column) for each organ whose `<flare_key>_<metric>` column the frame has."""
    return [(o.title, f"{o.flare_key}_{metric}") for o in ORGANS if f"{o.flare_key}_{metric}" in df.columns]


def _check_metric(metric: str) -> str:
    m = str(metric).upper()
    if m not in METRICS:
        raise FlareInputError(None, f"metric must be one of {list(METRICS)}, got {metric!r}")
    return m


def _check_frames(per_case_frames: Mapping[str, pd.DataFrame], metric: str) -> None:
    if not per_case_frames:
        raise FlareInputError(None, "no prediction sets to report (per_case_frames is empty)")
    for name, df in per_case_frames.items():
        if not _metric_columns(df, metric):
            raise FlareInputError(None, f"prediction set {name!r}: no '<organ>_{metric}' columns "
                                        f"(columns: {list(df.columns)[:8]} ...)")


def _numeric(df: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    """The metric columns as floats; "inf" strings (HD95) become inf."""
    return df[list(cols)].apply(pd.to_numeric, errors="coerce").astype(np.float64)


# ----------------------------------------------------------------------------------------------
# tables

def organ_table(per_case_frames: Mapping[str, pd.DataFrame], metric: str = "DSC", *,
                numeric: bool = False, decimals: int = 4, percent: bool = False,
                ddof: int = 0) -> pd.DataFrame:
    """Per-organ mean ± std of one metric, one column per prediction set (FLARE22 papers' tables).

    Rows are the organs by title (those present in any set, in label order), then "Mean".
    The "Mean" row's mean is the mean of the organ means (as summary.json's mean_dsc/mean_nsd);
    its std is the spread over cases of each case's organ-averaged score.
    Statistics skip NaN; std uses ``ddof`` (0, population, as flare_utils.evaluation.evaluate's summary).

    numeric=False: cells are strings "0.9712 ± 0.0123" ("n/a" where a set lacks the organ).
    numeric=True: float columns with a (set, "mean" | "std") MultiIndex.
    percent=True multiplies by 100 (then `decimals` applies to the percentages).
    """
    metric = _check_metric(metric)
    _check_frames(per_case_frames, metric)
    organs = [o for o in ORGANS
              if any(f"{o.flare_key}_{metric}" in df.columns for df in per_case_frames.values())]
    scale = 100.0 if percent else 1.0
    index = [o.title for o in organs] + ["Mean"]
    stats: dict[tuple[str, str], list[float]] = {}
    for name, df in per_case_frames.items():
        means, stds = [], []
        cols = [c for _, c in _metric_columns(df, metric)]
        values = _numeric(df, cols) * scale
        if metric == "HD95":
            values = values.replace([np.inf, -np.inf], np.nan)
        for o in organs:
            col = f"{o.flare_key}_{metric}"
            if col in values.columns and values[col].notna().any():
                v = values[col].dropna().to_numpy()
                means.append(float(v.mean()))
                stds.append(float(v.std(ddof=ddof)) if len(v) > ddof else float("nan"))
            else:
                means.append(float("nan"))
                stds.append(float("nan"))
        organ_means = [m for m in means if not math.isnan(m)]
        case_means = values.mean(axis=1, skipna=True).dropna().to_numpy()
        means.append(float(np.mean(organ_means)) if organ_means else float("nan"))
        stds.append(float(case_means.std(ddof=ddof)) if len(case_means) > ddof else float("nan"))
        stats[(name, "mean")] = means
        stats[(name, "std")] = stds
    table = pd.DataFrame(stats, index=pd.Index(index, name="Organ"))
    table.columns = pd.MultiIndex.from_tuples(table.columns, names=["set", "stat"])
    if numeric:
        return table
    out = pd.DataFrame(index=table.index)
    for name in per_case_frames:
        out[name] = [_pm(m, s, decimals) for m, s in zip(table[(name, "mean")], table[(name, "std")])]
    out.columns.name = f"{metric} (mean ± std)"
    return out


def _pm(mean: float, std: float, decimals: int) -> str:
    if math.isnan(mean):
        return "n/a"
    if math.isnan(std):
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def best_and_worst(per_case: pd.DataFrame, metric: str = "DSC", n: int = 1) -> pd.DataFrame:
    """The n best and n worst cases by their organ-averaged metric (NaN skipped).

    Columns: "which" ("best" / "worst"), "Name", "case_id" (Name without .nii.gz) and
    f"mean_{metric}". Best first, then worst (worst last). Ties break by name. With fewer than
    2n cases the two lists share cases.
    """
    metric = _check_metric(metric)
    cols = [c for _, c in _metric_columns(per_case, metric)]
    if not cols:
        raise FlareInputError(None, f"per-case table has no '<organ>_{metric}' columns")
    if n < 1:
        raise FlareInputError(None, f"n must be at least 1, got {n}")
    values = _numeric(per_case, cols)
    if metric == "HD95":
        values = values.replace([np.inf, -np.inf], np.nan)
    score = values.mean(axis=1, skipna=True)
    ranked = pd.DataFrame({"Name": per_case["Name"].astype(str), "score": score}).dropna()
    if ranked.empty:
        raise FlareInputError(None, f"no case has a {metric} value")
    higher_better = metric != "HD95"
    ranked = ranked.sort_values(["score", "Name"], ascending=[not higher_better, True], kind="mergesort")
    best = ranked.head(n).assign(which="best")
    worst = ranked.tail(n).assign(which="worst")
    out = pd.concat([best, worst], ignore_index=True)
    out["case_id"] = [case_id_from_path(nm) for nm in out["Name"]]
    out = out.rename(columns={"score": f"mean_{metric}"})
    return out[["which", "Name", "case_id", f"mean_{metric}"]]


def _load_timing(path: Path) -> list[dict]:
    """The per-case report dicts in one efficiency JSON file (one report, a list, or a mapping)."""
    if not path.is_file():
        raise FlareInputError(path, "efficiency (timing) JSON file is missing")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise FlareInputError(path, f"unreadable JSON ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict) and "cases" in obj and "wall_s" not in obj:
        obj = obj["cases"]
    if isinstance(obj, dict) and "wall_s" in obj:
        reports = [obj]
    elif isinstance(obj, dict):
        reports = list(obj.values())
    elif isinstance(obj, list):
        reports = obj
    else:
        reports = []
    if not reports or not all(isinstance(r, dict) and "wall_s" in r for r in reports):
        raise FlareInputError(path, "not an efficiency report (expected EfficiencyReport.to_dict() "
                                    "output, or a list / mapping of them)")
    return reports


def _mean_field(reports: list[dict], key: str) -> float | str | None:
    vals = [r.get(key) for r in reports]
    if any(v is None or v == NOT_MEASURED for v in vals):
        return NOT_MEASURED if key.startswith("gpu") else None
    try:
        return float(np.mean([float(v) for v in vals]))
    except (TypeError, ValueError):
        return None


def efficiency_table(timing_files: Mapping[str, str | Path] | Sequence[str | Path], *,
                     decimals: int = 1) -> pd.DataFrame:
    """One row per timing file: time, peak RAM, CPU and GPU figures as the FLARE22 harness reports.

    Each file holds one EfficiencyReport.to_dict() (one case or one whole run), or a list /
    mapping of them (one per case, optionally under a "cases" key); then every figure is the mean
    per case, as the challenge reports them, and "cases" says how many. GPU figures that were not
    measured (no GPU) read "not measured", never 0.
    """
    if isinstance(timing_files, Mapping):
        items = [(str(k), Path(v)) for k, v in timing_files.items()]
    else:
        items = [(Path(p).stem, Path(p)) for p in timing_files]
    if not items:
        raise FlareInputError(None, "no timing files given")
    rows = []
    for name, path in items:
        reports = _load_timing(path)
        devices = sorted({str(r.get("device", "?")) for r in reports})
        row = {"set": name, "device": ", ".join(devices), "cases": len(reports)}
        for label, key in (("time (s)", "wall_s"), ("peak RAM (MiB)", "peak_rss_mib"),
                           ("CPU util mean (%)", "cpu_util_mean"), ("CPU AUC (%·s)", "cpu_auc"),
                           ("GPU peak (MiB)", "gpu_mem_peak_mib"), ("GPU AUC (MiB·s)", "gpu_auc")):
            v = _mean_field(reports, key)
            row[label] = round(v, decimals) if isinstance(v, float) else (v if v is not None else "n/a")
        rows.append(row)
    return pd.DataFrame(rows).set_index("set")


def volume_table(summary: pd.DataFrame, *, decimals: int = 1) -> pd.DataFrame:
    """Per-organ volume statistics (ml) over the labelled cases of a conversion summary.

    `summary` is flare_utils.data.convert.dataset_summary's frame (one column per organ name, NaN for
    unlabelled cases). Rows: organ titles; columns: cases, mean, std, min, max (ml), "absent" (how
    many labelled cases have a zero volume).
    """
    rows = []
    for o in ORGANS:
        if o.name not in summary.columns:
            continue
        v = pd.to_numeric(summary[o.name], errors="coerce").dropna().to_numpy(dtype=np.float64)
        rows.append({"Organ": o.title, "cases": int(len(v)),
                     "mean (ml)": round(float(v.mean()), decimals) if len(v) else float("nan"),
                     "std (ml)": round(float(v.std()), decimals) if len(v) else float("nan"),
                     "min (ml)": round(float(v.min()), decimals) if len(v) else float("nan"),
                     "max (ml)": round(float(v.max()), decimals) if len(v) else float("nan"),
                     "absent": int((v == 0).sum())})
    if not rows:
        raise FlareInputError(None, "summary has no organ volume columns")
    return pd.DataFrame(rows).set_index("Organ")


# ----------------------------------------------------------------------------------------------
# plots

def _set_colors(n: int) -> list:
    from matplotlib import colormaps
    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


BOX_PANEL_COLUMNS = 5          # organ panels per row of box_plots (13 organs: 3 rows, legend in the last)


@styled
def box_plots(per_case_frames: Mapping[str, pd.DataFrame], metric: str = "DSC", *,
              title: str | None = None) -> Figure:
    """One small panel per organ, one box per prediction set in it (per-case values, NaN skipped).

    Panels come in rows of BOX_PANEL_COLUMNS with a shared y axis (0-1 for DSC and NSD), so the
    figure stays about 1150 px wide at 110 dpi however many sets there are; the sets' colours are
    explained once, in the first free panel (or under the panels). Each panel's title is the organ.
    """
    metric = _check_metric(metric)
    _check_frames(per_case_frames, metric)
    organs = [o for o in ORGANS
              if any(f"{o.flare_key}_{metric}" in df.columns for df in per_case_frames.values())]
    names = list(per_case_frames)
    colors = _set_colors(len(names))
    ncols = min(BOX_PANEL_COLUMNS, len(organs))
    nrows = math.ceil(len(organs) / ncols)
    fig = Figure(figsize=(2.1 * ncols + 0.4, 2.0 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    flat = list(axes.ravel())
    width = min(0.75, 2.4 / max(1, len(names)) + 0.25)
    for oi, o in enumerate(organs):
        ax = flat[oi]
        col = f"{o.flare_key}_{metric}"
        for si, name in enumerate(names):
            df = per_case_frames[name]
            if col not in df.columns:
                continue
            v = pd.to_numeric(df[col], errors="coerce").replace([np.inf, -np.inf], np.nan).dropna()
            if len(v) == 0:
                continue
            bp = ax.boxplot([v.to_numpy()], positions=[si], widths=width, patch_artist=True,
                            manage_ticks=False, flierprops={"markersize": 3})
            for box in bp["boxes"]:
                box.set_facecolor(colors[si])
                box.set_alpha(0.75)
            for med in bp["medians"]:
                med.set_color("black")
        ax.set_title(o.title)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_xticks([])
        ax.grid(axis="y", alpha=0.3)
        if metric in ("DSC", "NSD"):
            ax.set_ylim(-0.02, 1.02)
        if oi % ncols == 0:
            ax.set_ylabel(metric)
    handles = [Patch(facecolor=c, alpha=0.75, label=n) for c, n in zip(colors, names)]
    spare = flat[len(organs):]
    for ax in spare:
        ax.set_axis_off()
    if spare:
        spare[0].legend(handles=handles, loc="center left", frameon=False, title="prediction set")
    else:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(names), 4), frameon=False)
    fig.suptitle(title or f"{metric} per organ")
    return fig


def _fg_index(label: np.ndarray, axis: int) -> int:
    """Index along `axis` of the slice with the most labelled voxels (centre when none)."""
    other = tuple(a for a in range(label.ndim) if a != axis)
    counts = (label > 0).sum(axis=other)
    return int(np.argmax(counts)) if counts.any() else label.shape[axis] // 2


def _show_slice(ax, image2d: np.ndarray | None, label2d: np.ndarray | None, aspect: float,
                window: tuple[float, float] | None, alpha: float) -> None:
    """Draw one (i, other) voxel-order slice: transposed, origin lower, radiological left-right."""
    if image2d is not None:
        if window is None:
            lo, hi = np.percentile(image2d, [1, 99]) if image2d.size else (0, 1)
        else:
            lo, hi = window
        ax.imshow(image2d.T, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect,
                  interpolation="nearest")
    if label2d is not None:
        if image2d is None:
            ax.imshow(np.zeros(label2d.T.shape), cmap="gray", vmin=0, vmax=1, origin="lower",
                      aspect=aspect)
        ax.imshow(label2d.T, cmap=label_colormap(), norm=label_norm(), origin="lower",
                  aspect=aspect, interpolation="nearest", alpha=alpha)
    ax.invert_xaxis()          # RAS+: the patient's right on the viewer's left
    ax.set_xticks([])
    ax.set_yticks([])


def _legend_handles(*labels: np.ndarray | None) -> list[Patch]:
    present: set[int] = set()
    for lab in labels:
        if lab is not None:
            present |= set(int(v) for v in np.unique(lab)) - {0}
    return [Patch(facecolor=np.array(LABEL_COLORS[v]) / 255.0, label=LABELS[v].title)
            for v in sorted(present) if v in LABEL_COLORS]


@styled
def overlay_figure(image: np.ndarray | None, gt: np.ndarray | None, pred: np.ndarray | None = None, *,
                   spacing: Sequence[float] = (1.0, 1.0, 1.0), title: str | None = None,
                   window: tuple[float, float] | None = CT_WINDOW, alpha: float = 0.45,
                   slices: tuple[int, int] | None = None) -> Figure:
    """Axial and coronal slices with the ground truth and the prediction overlaid side by side.

    Arrays are 3D in RAS+ voxel order (i, j, k) with `spacing` the matching voxel sizes in mm.
    The axial slice (fixed k) and the coronal slice (fixed j) are those with the largest
    labelled area in the ground truth (in the prediction when the ground truth is empty), unless
    `slices=(k, j)` is given. CT window in HU (None: 1st-99th percentile of the slice).
    Columns: "ground truth", "prediction" (each only when given); rows: axial, coronal.
    """
    arrays = [a for a in (image, gt, pred) if a is not None]
    if not arrays:
        raise FlareInputError(None, "overlay_figure needs at least one of image, gt, pred")
    shape = arrays[0].shape
    for a in arrays:
        if a.ndim != 3 or a.shape != shape:
            raise FlareInputError(None, f"overlay_figure: arrays must be 3D with one shape, got "
                                        f"{[x.shape for x in arrays]}")
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(s > 0 for s in sp):
        raise FlareInputError(None, f"spacing must be three positive numbers, got {spacing!r}")
    ref = gt if gt is not None and np.any(gt) else pred if pred is not None and np.any(pred) else gt
    if slices is not None:
        k, j = (int(s) for s in slices)
    elif ref is not None:
        k, j = _fg_index(ref, 2), _fg_index(ref, 1)
    else:
        k, j = shape[2] // 2, shape[1] // 2
    columns = [(n, lab) for n, lab in (("ground truth", gt), ("prediction", pred)) if lab is not None]
    if not columns:
        columns = [("image", None)]
    width = 3.6 * len(columns) + 1.6
    fig = Figure(figsize=(width, 7.2), layout="constrained")
    axes = fig.subplots(2, len(columns), squeeze=False)
    for c, (cname, lab) in enumerate(columns):
        _show_slice(axes[0, c], None if image is None else image[:, :, k],
                    None if lab is None else lab[:, :, k], sp[1] / sp[0], window, alpha)
        _show_slice(axes[1, c], None if image is None else image[:, j, :],
                    None if lab is None else lab[:, j, :], sp[2] / sp[0], window, alpha)
        axes[0, c].set_title(cname)
    axes[0, 0].set_ylabel(f"axial (k={k})")
    axes[1, 0].set_ylabel(f"coronal (j={j})")
    handles = _legend_handles(gt, pred)
    if handles:
        fig.legend(handles=handles, loc="outside right center", fontsize="small", frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def _canonical(path: Path, label: bool) -> tuple[np.ndarray, tuple[float, float, float]]:
    import nibabel as nib
    img = nib.as_closest_canonical(load_nifti(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim > 3:
        data = data.reshape(data.shape[:3])
    data = np.rint(data).astype(np.int16) if label else data.astype(np.float32)
    return data, tuple(float(z) for z in img.header.get_zooms()[:3])


def find_case_file(folder: str | Path, case_id: str, *, image: bool = False) -> Path | None:
    """`<case>.nii.gz` / `.nii` in folder (images also `<case>_0000.nii.gz`), or None."""
    folder = Path(folder)
    stems = [f"{case_id}_0000", case_id] if image else [case_id]
    for stem in stems:
        for ext in (".nii.gz", ".nii"):
            p = folder / f"{stem}{ext}"
            if p.is_file():
                return p
    return None


def overlay_case(case: str, gt_dir: str | Path, pred_dir: str | Path | None = None,
                 image_dir: str | Path | None = None, *, title: str | None = None,
                 window: tuple[float, float] | None = CT_WINDOW) -> Figure:
    """overlay_figure for one case read from folders (case id or file name), in RAS+ order."""
    cid = case_id_from_path(case)
    gt_path = find_case_file(gt_dir, cid)
    if gt_path is None:
        raise FlareInputError(gt_dir, f"no ground truth for case {cid!r}")
    gt, spacing = _canonical(gt_path, label=True)
    pred = image = None
    if pred_dir:
        p = find_case_file(pred_dir, cid)
        if p is None:
            raise FlareInputError(pred_dir, f"no prediction for case {cid!r}")
        pred, _ = _canonical(p, label=True)
    if image_dir:
        p = find_case_file(image_dir, cid, image=True)
        if p is None:
            raise FlareInputError(image_dir, f"no image for case {cid!r}")
        image, _ = _canonical(p, label=False)
    return overlay_figure(image, gt, pred, spacing=spacing, title=title or cid, window=window)


@styled
def case_gallery(dataset_dir: str | Path, n: int = 3, *,
                 window: tuple[float, float] | None = CT_WINDOW, alpha: float = 0.45) -> Figure:
    """Axial and coronal slices of the first n labelled cases of an nnU-Net raw dataset.

    Reads imagesTr/<case>_0000.nii.gz and labelsTr/<case>.nii.gz; one row per case.
    """
    dataset_dir = Path(dataset_dir)
    images = dataset_dir / "imagesTr"
    labels = dataset_dir / "labelsTr"
    if not images.is_dir():
        raise FlareInputError(images, "imagesTr folder is missing")
    cases = []
    for p in sorted(images.iterdir()):
        if p.name.endswith(("_0000.nii.gz", "_0000.nii")):
            cid = case_id_from_path(p, channel_suffix=True)
            lab = find_case_file(labels, cid)
            if lab is not None:
                cases.append((cid, p, lab))
        if len(cases) >= max(1, n):
            break
    if not cases:
        raise FlareInputError(dataset_dir, "no labelled cases (imagesTr + labelsTr) to show")
    fig = Figure(figsize=(8.6, 3.6 * len(cases)), layout="constrained")
    axes = fig.subplots(len(cases), 2, squeeze=False)
    shown = []
    for r, (cid, ip, lp) in enumerate(cases):
        image, sp = _canonical(ip, label=False)
        lab, _ = _canonical(lp, label=True)
        k, j = _fg_index(lab, 2), _fg_index(lab, 1)
        _show_slice(axes[r, 0], image[:, :, k], lab[:, :, k], sp[1] / sp[0], window, alpha)
        _show_slice(axes[r, 1], image[:, j, :], lab[:, j, :], sp[2] / sp[0], window, alpha)
        axes[r, 0].set_ylabel(cid)
        axes[r, 0].set_title(f"axial (k={k})")
        axes[r, 1].set_title(f"coronal (j={j})")
        shown.append(lab)
    handles = _legend_handles(*shown)
    if handles:
        fig.legend(handles=handles, loc="outside right center", fontsize="small", frameon=False)
    return fig


@styled
def learning_curves_figure(curves: pd.DataFrame, by: str | Sequence[str] = "fold", *,
                           title: str | None = None) -> Figure:
    """Training (solid) and validation (dashed) loss, and nnU-Net's pseudo Dice, per epoch.

    `curves`: rows of `flare_utils.training.read_learning_curves` (epoch, train_loss, val_loss,
    pseudo_dice) stacked, with the column(s) `by` naming each run (e.g. "fold"); one colour per run.
    About 1100 px wide at 110 dpi; the runs' colours are explained once, beside the Dice panel.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    keys = [by] if isinstance(by, str) else list(by)
    missing = [c for c in (*keys, "epoch", "train_loss", "val_loss", "pseudo_dice") if c not in curves.columns]
    if missing or curves.empty:
        raise FlareInputError(None, f"learning_curves_figure: {'no rows' if curves.empty else f'missing {missing}'}")
    groups = list(curves.groupby(keys, sort=False))
    colors = _set_colors(len(groups))
    fig = Figure(figsize=(10.0, 3.6), layout="constrained")
    ax_loss, ax_dice = fig.subplots(1, 2)
    marker = "." if curves["epoch"].nunique() <= 60 else None
    for color, (name, df) in zip(colors, groups):
        label = " ".join(f"{k} {v}" for k, v in zip(keys, name if isinstance(name, tuple) else (name,)))
        ax_loss.plot(df["epoch"], df["train_loss"], "-", marker=marker, color=color, label=f"{label} train")
        ax_loss.plot(df["epoch"], df["val_loss"], "--", marker=marker, color=color, label=f"{label} val")
        ax_dice.plot(df["epoch"], df["pseudo_dice"], "-", marker=marker, color=color, label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_dice.set(xlabel="epoch", ylabel="pseudo Dice", title="validation pseudo Dice", ylim=(-0.02, 1.02))
    epochs = sorted(pd.to_numeric(curves["epoch"], errors="coerce").dropna().unique())
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
        if 0 < len(epochs) <= 12:                 # few epochs: a tick at each, none in between
            ax.set_xticks(epochs)
            if len(epochs) == 1:
                ax.set_xlim(epochs[0] - 0.5, epochs[0] + 0.5)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.legend(handles=[Line2D([], [], color="0.3", linestyle="-", label="training"),
                            Line2D([], [], color="0.3", linestyle="--", label="validation")])
    ax_dice.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def _round_order(values: Iterable) -> list:
    """Distinct round labels in numeric order when they are numbers ("round 2" < "round 10")."""
    def key(v):
        m = re.search(r"-?\d+(?:\.\d+)?", str(v))
        return (0, float(m.group()), str(v)) if m else (1, 0.0, str(v))
    return sorted(dict.fromkeys(values), key=key)


def round_statistics(per_case: pd.DataFrame, value: str = "mean_dsc", *, level: float = 0.95) -> pd.DataFrame:
    """Per round: cases, mean, std (ddof=1) and the two-sided `level` t confidence interval of the mean.

    Index: the round labels in round order; columns n, mean, std, ci_low, ci_high (NaN interval
    for a round with a single case). NaN values are skipped.
    """
    from scipy import stats
    missing = [c for c in ("round", value) if c not in per_case.columns]
    if missing:
        raise FlareInputError(None, f"per-case table lacks column(s) {missing} (columns: {list(per_case.columns)})")
    rows = {}
    for r in _round_order(per_case["round"]):
        v = pd.to_numeric(per_case.loc[per_case["round"] == r, value], errors="coerce").dropna().to_numpy(float)
        n = len(v)
        mean = float(v.mean()) if n else math.nan
        std = float(v.std(ddof=1)) if n > 1 else math.nan
        half = float(stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
        rows[r] = {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}
    out = pd.DataFrame.from_dict(rows, orient="index", columns=["n", "mean", "std", "ci_low", "ci_high"])
    out.index.name = "round"
    return out


@styled
def quality_per_round_figure(per_case: pd.DataFrame, *, value: str = "mean_dsc", level: float = 0.95,
                             title: str | None = "pseudo-label quality per round",
                             ylabel: str = "mean DSC vs ground truth") -> Figure:
    """Pseudo-label quality per round: every case as a faint dot, the mean with its `level`
    (95 %) t confidence interval as a point with error bars, the means joined by a line.

    `per_case`: one row per (case, round) with columns `round` and `value` (notebook 03's
    quality_per_case.csv: round, mean_dsc). The y axis spans 0-1 (DSC), widened if a value lies
    outside, so small differences between rounds are not blown up by a zoomed axis.
    """
    stats_ = round_statistics(per_case, value, level=level)
    if stats_.empty or not stats_["n"].any():
        raise FlareInputError(None, f"quality_per_round_figure: no {value} values")
    rounds = list(stats_.index)
    x = np.arange(len(rounds), dtype=float)
    fig = Figure(figsize=(max(4.5, 1.1 * len(rounds) + 2.5), 3.6), layout="constrained")
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)
    for xi, r in zip(x, rounds):
        v = pd.to_numeric(per_case.loc[per_case["round"] == r, value], errors="coerce").dropna().to_numpy(float)
        ax.scatter(xi + rng.uniform(-0.12, 0.12, len(v)), v, s=10, color="0.6", alpha=0.6, linewidths=0,
                   label="cases" if xi == 0 else None, zorder=2)
    ci = stats_[["ci_low", "ci_high"]].to_numpy(float)
    err = np.vstack([stats_["mean"] - ci[:, 0], ci[:, 1] - stats_["mean"]])
    err = np.nan_to_num(err, nan=0.0)
    ax.errorbar(x, stats_["mean"], yerr=err, fmt="o-", color="tab:blue", capsize=4, markersize=6,
                label=f"mean, {level:.0%} CI", zorder=3)
    ax.set_xticks(x)
    ax.set_xticklabels([str(r) if not str(r).lstrip("-").isdigit() else f"round {r}" for r in rounds])
    ax.set_xlim(-0.5, len(rounds) - 0.5)
    values = pd.to_numeric(per_case[value], errors="coerce").dropna()
    lo = min(0.0, float(values.min())) if len(values) else 0.0
    hi = max(1.0, float(values.max())) if len(values) else 1.0
    ax.set_ylim(lo - 0.02, hi + 0.02)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    n = stats_["n"].astype(int)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False,
              title=(f"n = {n.iloc[0]} cases per round" if n.nunique() == 1
                     else f"n = {n.min()}-{n.max()} cases per round"))
    if title:
        ax.set_title(title)
    return fig
