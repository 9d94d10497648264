"""The selection stage (notebook 04): stability scores of the pseudo labels and the students' selection.

Scores every unlabelled case over the completed rounds (`flare_utils.semisup.selection`), keeps
u < threshold (or a fraction), writes `selection/selection.json` (and `selection_all.json`) for the
students, and the pictures a reader needs: the u distribution, the most and least stable cases and,
where ground truth of the "unlabelled" cases exists, whether u predicts the pseudo-label error.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from flare_utils.data.io import atomic_write_text
from flare_utils.errors import FlareInputError
from flare_utils.layout import RunLayout
from flare_utils.semisup import rounds as R
from flare_utils.semisup import selection as S


@dataclass
class SelectionStageResult:
    """Scores, the selection rule and summary, the quality check (ground truth) and the pictures."""
    run: RunLayout
    out_dir: Path
    scores: pd.DataFrame                       # every case by rank: u, selected, ...
    summary: dict[str, Any]                    # rule, counts, u range, file names
    figures: dict[str, Path] = field(default_factory=dict)
    quality: dict[str, Any] | None = None      # Spearman rho(u, 1 - DSC), mean DSC selected / rejected

    @property
    def selection_file(self) -> Path | None:
        f = self.summary.get("selection_file")
        return self.run.resolve(f) if f else None


def selection_stage(run_dir: str | Path, *, rounds: Sequence[int] | None = None, images_dir: str | Path | None = None,
                    threshold: float | None = S.DEFAULT_THRESHOLD, fraction: float | None = None,
                    labels_round: int = -1, exclude_empty: bool = False, truth_dir: str | Path | None = None,
                    out_dir: str | Path | None = None, n_show: int = 2, processes: int = 1,
                    **_: Any) -> SelectionStageResult:
    """Score, select and write the selection files and pictures into `out_dir` (default the run's
    `selection/`). Nothing selected is an error after the scores and pictures are written."""
    from flare_utils.semisup import figures
    from flare_utils.study import report

    run = RunLayout(run_dir)
    ks = list(rounds) if rounds else R.completed_rounds(run.root)
    if not ks:
        raise FlareInputError(run.pseudo_labels, "no completed pseudo-label round in this run: run the pseudo "
                                                 "stage first (or give rounds)")
    round_dirs = [run.pseudo_round(k) for k in ks]
    images = Path(images_dir) if images_dir else Path(R.round_request(run.root, ks[0])["unlabelled_dir"])
    out = Path(out_dir) if out_dir else run.selection
    truth = Path(truth_dir) if truth_dir else (run.synthetic_unlabelled_truth
                                               if run.synthetic_unlabelled_truth.is_dir() else None)
    sel = S.select_pseudo_labels(round_dirs, images, out, threshold=threshold, fraction=fraction,
                                 labels_round=labels_round, exclude_empty=exclude_empty, processes=processes,
                                 allow_empty_selection=True, within=run.root)
    res = SelectionStageResult(run, out, sel.scores, sel.summary())
    res.figures["u_histogram"] = report.save_figure(figures.u_histogram_figure(sel.scores, sel.rule, len(ks)),
                                                    out / "u_histogram.png")
    n = max(0, min(int(n_show), len(sel.scores)))
    picks = [("most stable", c) for c in sel.scores.index[:n]] + [("least stable", c) for c in sel.scores.index[::-1][:n]]
    seen: set[str] = set()
    for kind, case in picks:
        if case in seen:
            continue
        seen.add(case)
        u, chosen = sel.scores.at[case, "u"], sel.scores.at[case, "selected"]
        fig = S.case_overlay(case, sel.labels_folder, images, truth,
                             title=f"{kind}: {case}, u = {u:.4f} ({'selected' if chosen else 'rejected'})")
        res.figures[f"{kind}: {case}"] = report.save_figure(fig, out / f"overlay_{kind.replace(' ', '_')}_{case}.png")
    if truth is not None:
        k_labels = ks[labels_round]
        quality = R.pseudo_label_quality(run.root, truth, [k_labels], processes=processes).set_index("case")
        merged, stats = S.selection_quality(sel.scores, quality, "mean_dsc")
        report.save_table(merged, out / "selection_vs_truth.csv")
        atomic_write_text(out / "selection_vs_truth.json", json.dumps(stats, indent=1))
        res.quality = stats
        res.figures["u_vs_dsc"] = report.save_figure(
            figures.u_vs_quality_figure(merged, sel.rule, k_labels, stats.get("spearman_rho")), out / "u_vs_dsc.png")
    if sel.selection_file is None:      # the pictures above show the scores; the students need a selection
        raise FlareInputError(out, f"no case selected by {sel.rule}: adjust threshold / fraction "
                                   f"(scores: {sel.scores_csv})")
    return res


def load_selection_result(run_dir: str | Path, out_dir: str | Path | None = None) -> SelectionStageResult:
    """The result of a finished selection stage, read from its files (nothing is rewritten)."""
    run = RunLayout(run_dir)
    out = Path(out_dir) if out_dir else run.selection
    summary_file = out / S.SUMMARY_FILE
    if not summary_file.is_file():
        raise FlareInputError(summary_file, "the selection stage of this run has not finished")
    res = SelectionStageResult(run, out, pd.read_csv(out / S.SCORES_CSV, index_col=0),
                               json.loads(summary_file.read_text()))
    if (out / "u_histogram.png").is_file():
        res.figures["u_histogram"] = out / "u_histogram.png"
    for f in sorted(out.glob("overlay_*.png")):
        kind, _, case = f.stem[len("overlay_"):].partition("_stable_")
        res.figures[f"{kind} stable: {case}"] = f
    if (out / "selection_vs_truth.json").is_file():
        res.quality = json.loads((out / "selection_vs_truth.json").read_text())
    if (out / "u_vs_dsc.png").is_file():
        res.figures["u_vs_dsc"] = out / "u_vs_dsc.png"
    return res
