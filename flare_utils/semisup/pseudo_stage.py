"""The pseudo-label stage (notebook 03): K rounds of labels for the unlabelled set, and their tables.

Round 1 is the teacher ensemble's; rounds 2..K come from a big model retrained on the labelled plus
all pseudo-labelled cases (`flare_utils.semisup.rounds`). This stage adds what a reader needs to
judge the rounds — change between rounds, organ volumes, memory per case and, where ground truth of
the "unlabelled" cases exists (the synthetic cohort), pseudo-label quality per round — written to
`pseudo_labels/report/`, and registers the last retrained model as `teacher_pseudo`.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from flare_utils.data.labels import ORGANS
from flare_utils.errors import FlareInputError
from flare_utils.layout import RunLayout
from flare_utils.semisup import rounds as R

# the tables and pictures of pseudo_labels/report/ (the index report reads some of them)
TABLES = ("rounds", "agreement_summary", "agreement_dsc_per_organ", "volumes_per_round", "quality_per_round",
          "quality_dsc_per_organ")
FIGURES = ("memory_per_case", "agreement_changed", "volumes_per_round", "quality_per_round")


@dataclass
class PseudoLabelResult:
    """The rounds of a run and the report tables/figures written in `pseudo_labels/report/`."""
    run: RunLayout
    rounds: list[R.RoundInfo]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)     # name in TABLES -> table
    figures: dict[str, Path] = field(default_factory=dict)            # name in FIGURES -> PNG
    memory: list[str] = field(default_factory=list)                   # one line per round: RSS early vs last
    truth_dir: Path | None = None

    @property
    def report_dir(self) -> Path:
        return self.run.pseudo_report


def pseudo_label_stage(run_dir: str | Path, dataset_id: int, *, teacher_results: str | Path | None = None,
                       plans: str | None = None, teacher_trainer: str = "FlareTeacherTrainer",
                       unlabelled_dir: str | Path | None = None, rounds: int = 3,
                       folds: Sequence[int | str] | None = None, tta: bool = False, device: str = "auto",
                       seed: int = 0, retrain_epochs: int = 50, retrain_iterations: int = 100,
                       retrain_folds: Sequence[int | str] = ("all",), retrain_config: Mapping[str, Any] | None = None,
                       truth_dir: str | Path | None = None, max_cases: int | None = None, processes: int = 1,
                       torch_threads: int | None = None, cluster: Mapping[str, Any] | None = None,
                       verbose: bool = False, num_gpus: int = 1, **_: Any) -> PseudoLabelResult:
    """Run (or resume) the K rounds and write the stage's report tables and figures.

    The teacher is `teacher_results` or the results folder of (`plans`, `teacher_trainer`); the
    unlabelled images are `unlabelled_dir` or the raw dataset's `imagesUnlabelled`. nnU-Net's training
    console goes to `pseudo_labels/report/training_console.log` unless `verbose`. `cluster`: the
    params' `cluster:` section (`flare_utils.distributed.ClusterParams` fields; None or type local:
    in-process): the rounds' predictions and the agreement / quality tables run on that Dask
    cluster, opened for the stage and closed at its end (training stays in this process; `num_gpus` > 1:
    each retraining runs as nnU-Net's multi-GPU DDP, one process per GPU)."""
    from flare_utils.distributed.cluster import as_cluster_params, open_cluster
    from flare_utils.layout import nnunet_folders
    from flare_utils.study.models import register_model

    cluster_params = as_cluster_params(cluster or None)     # a bad section fails before anything runs
    run = RunLayout(run_dir).activate()
    if torch_threads:
        import torch
        torch.set_num_threads(int(torch_threads))
    if teacher_results:
        teacher = Path(teacher_results)
    elif plans:
        teacher = nnunet_folders().results_folder(dataset_id, plans, teacher_trainer)
    else:
        raise FlareInputError(None, "give teacher_results, or plans (and teacher_trainer) to find the teacher")
    images = Path(unlabelled_dir) if unlabelled_dir else run.raw_dataset(dataset_id) / "imagesUnlabelled"
    cases = list(R.unlabelled_images(images))
    if max_cases:
        cases = cases[: int(max_cases)]
    out = run.pseudo_report
    out.mkdir(parents=True, exist_ok=True)
    config = {"num_epochs": int(retrain_epochs), "num_iterations_per_epoch": int(retrain_iterations),
              **dict(retrain_config or {})}
    shown = sys.stdout                 # progress lines stay visible; nnU-Net's console goes to the log
    say = lambda line: print(line, file=shown, flush=True)          # noqa: E731
    with open_cluster(cluster_params, device=device, say=say) as client:
        with open(out / "training_console.log", "a") as log, \
                (contextlib.nullcontext() if verbose else contextlib.redirect_stdout(log)):
            infos = R.run_rounds(run.root, dataset_id, teacher, images, rounds=int(rounds), plans=plans or None,
                                 training_config=config, folds=folds, tta=bool(tta), device=device, seed=seed,
                                 retrain_folds=retrain_folds, cases=cases, progress=say, client=client,
                                 num_gpus=int(num_gpus))
        last = infos[-1]
        if last.round > 1:  # the big model retrained on labelled + pseudo-labelled cases: "teacher with pseudo labels"
            training = last.training or {}
            register_model(run.root, "teacher_pseudo", last.model, folds=last.folds, title="Teacher + pseudo labels",
                           role="teacher", training_data=f"labelled + {training.get('n_pseudo', '?')} "
                                                         f"pseudo-labelled cases (round {last.round - 1})",
                           plans=training.get("plans"), trainer=training.get("trainer"))
        truth = Path(truth_dir) if truth_dir else (run.synthetic_unlabelled_truth
                                                   if run.synthetic_unlabelled_truth.is_dir() else None)
        return _write_report(run, infos, truth, processes, client)


def _write_report(run: RunLayout, infos: list[R.RoundInfo], truth: Path | None, processes: int,
                  client: Any = None) -> PseudoLabelResult:
    from flare_utils.semisup import figures
    from flare_utils.study import report

    out, ks = run.pseudo_report, [i.round for i in infos]
    res = PseudoLabelResult(run, infos, truth_dir=truth)

    def table(name: str, df: pd.DataFrame, index: bool = True) -> None:
        report.save_table(df, out / f"{name}.csv", index=index)
        if name in TABLES:
            res.tables[name] = df

    def figure(name: str, fig) -> None:
        res.figures[name] = report.save_figure(fig, out / f"{name}.png")

    table("rounds", R.round_table(run.root, ks))
    rss = {}
    for i in infos:
        df = R.round_cases(run.root, i.round)
        df = df[df["rss_mib"].notna()]
        if len(df):                        # the cases predicted by the last (uninterrupted) process
            df = df[df["pid"] == df["pid"].iloc[-1]].sort_values("index")
        rss[i.round] = df
        m = i.memory
        if m:
            res.memory.append(f"round {i.round}: RSS after case {m['early_case_index']}: {m['rss_early_mib']:.1f} MiB, "
                              f"after case {m['cases_in_session']}: {m['rss_last_mib']:.1f} MiB (growth "
                              f"{m['rss_growth_mib']:+.1f} MiB, {m['rss_growth_pct']:+.2f} %)")
    figure("memory_per_case", figures.memory_per_case_figure(rss))

    organs = {f"dsc_{o.name}": o.title for o in ORGANS}
    agree = R.round_agreement(run.root, ks, processes=processes, client=client)
    if len(agree):
        table("agreement_per_case", agree, index=False)
        finite = agree["changed_vs_foreground"].replace(np.inf, np.nan)
        summary = pd.DataFrame({
            "changed voxels (% of volume)": 100 * agree.groupby("round")["changed_fraction"].mean(),
            "changed / foreground (mean, finite)": finite.groupby(agree["round"]).mean(),
            "cases vanished (inf)": np.isinf(agree["changed_vs_foreground"]).groupby(agree["round"]).sum(),
            "mean organ DSC vs previous": agree.groupby("round")[list(organs)].mean().mean(axis=1),
        })
        summary.index = [f"round {k} vs {k - 1}" for k in summary.index]
        table("agreement_summary", summary)
        table("agreement_dsc_per_organ", _organ_means(agree, organs, lambda k: f"round {k} vs {k - 1}"))
        figure("agreement_changed", figures.changed_voxels_figure(agree))

    vol = R.round_volumes(run.root, ks)
    table("volumes_per_case", vol, index=False)
    vt = vol.pivot_table(index="organ", columns="round", values="ml", aggfunc="mean").reindex([o.name for o in ORGANS])
    vt.index = [o.title for o in ORGANS]
    vt.columns = [f"round {k}" for k in vt.columns]
    table("volumes_per_round", vt)
    figure("volumes_per_round", figures.volumes_per_round_figure(vt))

    if truth is not None:
        quality = R.pseudo_label_quality(run.root, truth, ks, processes=processes, client=client)
        table("quality_per_case", quality, index=False)
        if len(quality):
            per_round = quality.groupby("round")["mean_dsc"].agg(["mean", "std", "count"])
            per_round.index = [f"round {k}" for k in per_round.index]
            table("quality_per_round", per_round)
            table("quality_dsc_per_organ", _organ_means(quality, organs, lambda k: f"round {k}"))
            figure("quality_per_round", report.quality_per_round_figure(quality))
    return res


def _organ_means(per_case: pd.DataFrame, organs: Mapping[str, str], column_name) -> pd.DataFrame:
    """Mean of each organ's column per round: organs (by title) as rows, rounds as columns."""
    table = per_case.groupby("round")[list(organs)].mean().T.rename(index=organs)
    table.columns = [column_name(k) for k in table.columns]
    return table


def load_pseudo_label_result(run_dir: str | Path) -> PseudoLabelResult:
    """The result of a finished pseudo-label stage, read from its files (nothing is rewritten)."""
    run = RunLayout(run_dir)
    ks = R.completed_rounds(run.root)
    if not ks:
        raise FlareInputError(run.pseudo_labels, "no completed pseudo-label round in this run")
    infos = [R.read_round(run.root, k) for k in ks]
    res = PseudoLabelResult(run, infos, truth_dir=run.synthetic_unlabelled_truth
                            if run.synthetic_unlabelled_truth.is_dir() else None)
    for name in TABLES:
        f = run.pseudo_report / f"{name}.csv"
        if f.is_file():
            res.tables[name] = pd.read_csv(f, index_col=0)
    for name in FIGURES:
        f = run.pseudo_report / f"{name}.png"
        if f.is_file():
            res.figures[name] = f
    return res
