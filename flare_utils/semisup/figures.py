"""Figures of the pseudo-label and selection stages (matplotlib Figures, saved by the stages)."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from flare_utils.study.report import plot_style


def memory_per_case_figure(rss_by_round: Mapping[int, pd.DataFrame]) -> Figure:
    """Process RSS after every case of each round (`index`, `rss_mib` columns): flat means nothing
    per case is kept in memory."""
    with plot_style():
        fig = Figure(figsize=(8, 3.2), layout="constrained")
        ax = fig.subplots()
        for k, df in rss_by_round.items():
            if len(df):
                ax.plot(df["index"], df["rss_mib"], label=f"round {k}")
        ax.set_xlabel("case (prediction order)")
        ax.set_ylabel("RSS (MiB)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        ax.set_title("memory per case")
    return fig


def changed_voxels_figure(agreement: pd.DataFrame) -> Figure:
    """Box plot per round k >= 2 of the share of voxels whose label changed since round k-1."""
    with plot_style():
        fig = Figure(figsize=(6, 3.2), layout="constrained")
        ax = fig.subplots()
        ks = sorted(agreement["round"].unique())
        ax.boxplot([100 * agreement.loc[agreement["round"] == k, "changed_fraction"] for k in ks])
        ax.set_xticks(range(1, len(ks) + 1), [f"{k} vs {k - 1}" for k in ks])
        ax.set_ylabel("changed voxels (% of volume)")
        ax.set_title("change between consecutive rounds")
    return fig


def volumes_per_round_figure(volumes: pd.DataFrame) -> Figure:
    """Mean organ volume (ml) per round: organs as rows, rounds as columns."""
    with plot_style():
        fig = Figure(figsize=(9, 3.4), layout="constrained")
        ax = fig.subplots()
        x = np.arange(len(volumes))
        w = 0.8 / max(1, len(volumes.columns))
        for j, col in enumerate(volumes.columns):
            ax.bar(x + j * w, volumes[col].fillna(0), w, label=col)
        ax.set_xticks(x + w * (len(volumes.columns) - 1) / 2, volumes.index, rotation=35, ha="right")
        ax.set_ylabel("mean volume (ml)")
        ax.legend(fontsize="small")
    return fig


def u_histogram_figure(scores: pd.DataFrame, rule: Mapping, n_rounds: int) -> Figure:
    """Distribution of the stability score u with the selection rule's cut."""
    u = scores["u"]
    finite = u[np.isfinite(u)]
    with plot_style():
        fig = Figure(figsize=(6.5, 3.4), layout="constrained")
        ax = fig.subplots()
        if len(finite):
            ax.hist(finite, bins=min(40, max(5, len(finite) // 2)), color="tab:blue", alpha=0.8)
        if rule["rule"] == "threshold":
            ax.axvline(rule["threshold"], color="tab:red", ls="--", label=f"threshold {rule['threshold']:g}")
        else:
            sel_u = scores.loc[scores["selected"], "u"]
            if len(sel_u):
                ax.axvline(sel_u.max(), color="tab:red", ls="--", label=f"kept fraction {rule['fraction']:g}")
        n_inf = int((~np.isfinite(u)).sum())
        ax.set_xlabel("stability score u")
        ax.set_ylabel("cases")
        ax.set_title(f"u over {len(u)} cases (K = {n_rounds}); {n_inf} with u = inf (label vanished)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return fig


def u_vs_quality_figure(merged: pd.DataFrame, rule: Mapping, labels_round: int, rho: float | None) -> Figure:
    """Stability score against the pseudo label's DSC (ground truth), selected vs rejected cases."""
    with plot_style():
        fig = Figure(figsize=(5.5, 3.8), layout="constrained")
        ax = fig.subplots()
        fin = merged[np.isfinite(merged["u"])]
        for flag, colour, name in ((True, "tab:green", "selected"), (False, "tab:red", "rejected")):
            part = fin[fin["selected"] == flag]
            ax.scatter(part["u"], part["quality"], c=colour, label=name, s=18)
        if rule["rule"] == "threshold":
            ax.axvline(rule["threshold"], color="gray", ls="--")
        ax.set_xlabel("stability score u")
        ax.set_ylabel(f"mean DSC vs truth (round {labels_round})")
        ax.set_ylim(0, 1)
        ax.set_title(f"Spearman rho(u, 1 - DSC) = {rho:.3f}" if rho is not None else "u vs pseudo-label DSC")
        ax.legend()
    return fig
