"""The evaluation stage (notebook 07): FLARE22 DSC / NSD of each prediction set, tables and pictures.

`evaluate_stage` scores every prediction set against the ground truth (`flare_utils.evaluation.evaluate`,
the official FLARE22 rules) and writes, into `<run>/evaluation/`:

* `<set>/metrics_per_case.csv` and `<set>/summary.json` per prediction set (`<set>`: the set's name
  made folder-safe, `flare_utils.study.report.set_slugs`), and `overview.csv` (one row per set);
* `organ_table_<metric>.csv` (mean ± std per organ) and `organ_table_<metric>_numeric.csv`;
* `box_<metric>.png`, `overlay_best_<case>.png` / `overlay_worst_<case>.png` (the first set's best
  and worst case) and, with timing files, `efficiency_table.csv`.

The folder is built aside and swapped in whole when everything is written, so it only ever holds
one evaluation: sets no longer evaluated leave nothing behind, and a failed evaluation leaves the
previous one as it was. Files in it that this stage does not write are kept.
`load_evaluation_result` reads a finished evaluation back (nothing is computed or written).
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd

from flare_utils.data.io import atomic_directory
from flare_utils.errors import FlareInputError
from flare_utils.layout import RunLayout

OVERVIEW_CSV = "overview.csv"
EFFICIENCY_CSV = "efficiency_table.csv"
REVISION_NOTE = {
    "2022": "the FLARE22 challenge script: NSD is computed for every organ",
    "2024": "the 2024 revision of the script: NSD is set to 0 where DSC < 0.2",
}
# the files of <run>/evaluation this stage writes (besides the per-set folders)
_OWNED = re.compile(r"^(overview\.csv|efficiency_table\.csv|organ_table_\w+\.csv|box_\w+\.png|overlay_\w+\.png)$")


@dataclass
class EvaluationStageResult:
    """Scores, tables and pictures of one evaluation (every path under `out_dir`)."""
    run: RunLayout
    out_dir: Path                                  # <run>/evaluation
    revision: str                                  # FLARE evaluation code revision
    metrics: list[str]                             # "DSC", "NSD" (and "HD95")
    overview: pd.DataFrame                         # one row per set: cases, mean DSC / NSD, revision, folder
    per_case: dict[str, pd.DataFrame]              # set -> metrics_per_case.csv
    organ_tables: dict[str, pd.DataFrame]          # metric -> mean ± std per organ, one column per set
    extremes: pd.DataFrame | None = None           # the first set's best and worst case
    efficiency: pd.DataFrame | None = None         # one row per timing file
    figures: dict[str, Path] = field(default_factory=dict)   # "box DSC", "overlay best <case>", ...

    @property
    def revision_note(self) -> str:
        return REVISION_NOTE.get(str(self.revision), "unknown revision")

    @property
    def first_set(self) -> str:
        return str(self.overview.index[0])

    def set_folder(self, name: str) -> Path:
        return self.out_dir / str(self.overview.loc[name, "folder"])

    def box_plots(self) -> dict[str, Path]:
        return {k: p for k, p in self.figures.items() if k.startswith("box ")}

    def overlays(self) -> dict[str, Path]:
        return {k: p for k, p in self.figures.items() if k.startswith("overlay ")}


def _owned(entry: Path) -> bool:
    """Whether a file or folder of the evaluation folder is one this stage writes."""
    if entry.is_dir():
        return (entry / "metrics_per_case.csv").exists() or (entry / "summary.json").exists()
    return bool(_OWNED.match(entry.name))


def _keep_foreign_files(old: Path, new: Path) -> None:
    """Copy what someone else put into the evaluation folder into its replacement."""
    if not old.is_dir():
        return
    for entry in old.iterdir():
        if _owned(entry) or entry.name.startswith(".") or (new / entry.name).exists():
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name)
        else:
            shutil.copy2(entry, new / entry.name)


def evaluate_stage(run_dir: str | Path, ground_truth_dir: str | Path | None = None,
                   image_dir: str | Path | None = None, prediction_sets: Mapping[str, str | Path] | None = None,
                   timing_files: Mapping[str, str | Path] | None = None, revision: str = "2022",
                   hd95: bool = False, processes: int = 2, cluster: Mapping[str, Any] | None = None, *,
                   log: Callable[[str], None] = print) -> EvaluationStageResult:
    """Score `prediction_sets` ({name: prediction folder}) against `ground_truth_dir` and write the
    tables and pictures into `<run>/evaluation/` (replacing the previous evaluation as a whole).

    image_dir: images (`<case>_0000.nii.gz`) under the overlay pictures (optional);
    timing_files: {name: efficiency JSON} for the efficiency table (optional);
    revision: "2022" (the challenge's script) or "2024"; hd95: also the 95th percentile Hausdorff distance.
    cluster: the params' `cluster:` section (`flare_utils.distributed.ClusterParams` fields; None or
    type local: `processes` local processes): the cases are scored on that Dask cluster, one task per
    case, opened for the stage and closed at its end (tables and pictures are made in this process)."""
    from flare_utils.distributed.cluster import as_cluster_params, open_cluster
    from flare_utils.evaluation.evaluate import evaluate_folders
    from flare_utils.study import report
    if not prediction_sets:
        raise FlareInputError(None, "prediction_sets is empty: give at least one {name: prediction folder}")
    if not ground_truth_dir:
        raise FlareInputError(None, "ground_truth_dir is empty: give the folder of ground-truth label maps")
    cluster_params = as_cluster_params(cluster or None)     # a bad section fails before anything runs
    run = RunLayout(run_dir)
    out = run.evaluation
    slugs = report.set_slugs(prediction_sets)
    metrics = ["DSC", "NSD"] + (["HD95"] if hd95 else [])
    with atomic_directory(out, overwrite=True) as tmp, open_cluster(cluster_params, device="cpu", say=log) as client:
        tmp.chmod(0o755)                       # a folder like the others of the run (mkdtemp makes it private)
        per_case, summaries = {}, {}
        for name, folder in prediction_sets.items():
            res = evaluate_folders(folder, ground_truth_dir, tmp / slugs[name], revision=revision, hd95=hd95,
                                   processes=processes, client=client)
            per_case[name], summaries[name] = res.per_case, res.summary
            log(f"{name}: {res.summary['n_cases']} cases, mean DSC {res.summary['mean_dsc']:.4f}, "
                f"mean NSD {res.summary['mean_nsd']:.4f} -> {out / slugs[name]}")
        overview = pd.DataFrame([{"set": n, "cases": s["n_cases"], "mean DSC": s["mean_dsc"],
                                  "mean NSD": s["mean_nsd"], "revision": s["revision"], "folder": slugs[n]}
                                 for n, s in summaries.items()]).set_index("set")
        report.save_table(overview, tmp / OVERVIEW_CSV)
        organ_tables = {}
        for metric in metrics:
            organ_tables[metric] = report.organ_table(per_case, metric)
            report.save_table(organ_tables[metric], tmp / f"organ_table_{metric}.csv")
            report.save_table(report.organ_table(per_case, metric, numeric=True),
                              tmp / f"organ_table_{metric}_numeric.csv")
        figures = {}
        for metric in metrics:
            fig = report.box_plots(per_case, metric, title=f"{metric} per organ (revision {revision})")
            report.save_figure(fig, tmp / f"box_{metric}.png")
            figures[f"box {metric}"] = out / f"box_{metric}.png"
        first = next(iter(prediction_sets))
        extremes = report.best_and_worst(per_case[first], "DSC", n=1)
        for row in extremes.itertuples():
            fig = report.overlay_case(row.Name, ground_truth_dir, prediction_sets[first], image_dir or None,
                                      title=f"{first}: {row.which} case {row.case_id} (mean DSC {row.mean_DSC:.3f})")
            name = f"overlay_{row.which}_{row.case_id}.png"
            report.save_figure(fig, tmp / name)
            figures[f"overlay {row.which} {row.case_id}"] = out / name
        efficiency = None
        if timing_files:
            efficiency = report.efficiency_table(timing_files)
            report.save_table(efficiency, tmp / EFFICIENCY_CSV)
        _keep_foreign_files(out, tmp)
    return EvaluationStageResult(run, out, str(revision), metrics, overview, per_case, organ_tables, extremes,
                                 efficiency, figures)


def load_evaluation_result(run_dir: str | Path) -> EvaluationStageResult:
    """The result of a finished evaluation stage, read from `<run>/evaluation/` (nothing is written)."""
    from flare_utils.study import report
    run = RunLayout(run_dir)
    out = run.evaluation
    if not (out / OVERVIEW_CSV).is_file():
        raise FlareInputError(out / OVERVIEW_CSV, "the evaluation stage of this run has not finished")
    overview = pd.read_csv(out / OVERVIEW_CSV, index_col="set", dtype={"set": str, "revision": str, "folder": str})
    per_case = {name: report.read_per_case(out / str(folder)) for name, folder in overview["folder"].items()}
    metrics = [m for m in report.METRICS if (out / f"organ_table_{m}.csv").is_file()]
    organ_tables = {m: pd.read_csv(out / f"organ_table_{m}.csv", index_col=0) for m in metrics}
    revision = str(overview["revision"].iloc[0]) if len(overview) else ""
    figures = {f"box {m}": out / f"box_{m}.png" for m in metrics if (out / f"box_{m}.png").is_file()}
    extremes = report.best_and_worst(per_case[str(overview.index[0])], "DSC", n=1) if per_case else None
    for which in ("best", "worst"):
        for p in sorted(out.glob(f"overlay_{which}_*.png")):
            figures[f"overlay {which} {p.stem[len(f'overlay_{which}_'):]}"] = p
    efficiency = pd.read_csv(out / EFFICIENCY_CSV, index_col=0) if (out / EFFICIENCY_CSV).is_file() else None
    return EvaluationStageResult(run, out, revision, metrics, overview, per_case, organ_tables, extremes,
                                 efficiency, figures)
