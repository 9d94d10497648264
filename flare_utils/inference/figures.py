"""Pictures of which sliding windows ran (like Figure 2 of the FLARE22 winner's paper).

`plot_window_map(image, report, view_axis=...)` draws a slice of the network-grid image with the
outline of every window position projected onto it: evaluated windows solid, skipped ones dashed.
Windows that differ only along the axis perpendicular to the view project onto the same outline;
an outline counts as evaluated when any of those windows ran.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from flare_utils.study.report import styled as _styled


def _get(report: Any, key: str):
    return report[key] if isinstance(report, Mapping) else getattr(report, key)


def window_outlines(report: Any, view_axis: int) -> list[dict]:
    """Projected outlines: [{"z": start, "h": start, "evaluated": bool, "role": ...}] on the padded grid.

    view_axis: the network axis looked along (dropped); the long axis is drawn vertically.
    """
    la = int(_get(report, "long_axis"))
    if view_axis == la or view_axis not in (0, 1, 2):
        raise ValueError(f"view_axis must be an in-plane axis (not the long axis {la}), got {view_axis}")
    h_axis = next(a for a in range(3) if a not in (la, view_axis))
    out: dict[tuple[int, int], dict] = {}
    for w in _get(report, "windows"):
        s = w["start"] if isinstance(w, Mapping) else w.start
        ev = w["evaluated"] if isinstance(w, Mapping) else w.evaluated
        role = w["role"] if isinstance(w, Mapping) else w.role
        key = (int(s[la]), int(s[h_axis]))
        o = out.setdefault(key, {"z": key[0], "h": key[1], "evaluated": False, "role": role})
        o["evaluated"] = o["evaluated"] or bool(ev)
        if role == "centre":
            o["role"] = "centre"
    return list(out.values())


@_styled  # matplotlib defaults, not nnU-Net's global seaborn settings (flare_utils.study.report)
def plot_window_map(image: np.ndarray, report: Any, view_axis: int, *, labels: np.ndarray | None = None,
                    ax=None, title: str | None = None, slice_index: int | None = None):
    """Draw `image` (network grid, unpadded, 3D) sliced across `view_axis` with the window outlines.

    labels: optional network-grid label map to overlay. Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    la = int(_get(report, "long_axis"))
    patch = [int(p) for p in _get(report, "patch_size")]
    padded = [int(p) for p in _get(report, "padded_shape")]
    shape = list(image.shape)
    offset = [(p - s) // 2 for p, s in zip(padded, shape)]     # pad_nd_image puts the extra below // 2
    h_axis = next(a for a in range(3) if a not in (la, view_axis))
    k = shape[view_axis] // 2 if slice_index is None else int(slice_index)
    sl = np.take(image, k, axis=view_axis)
    # rows = long axis, columns = h axis
    remaining = [a for a in range(3) if a != view_axis]
    if remaining.index(la) != 0:
        sl = sl.T
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 6))
    ax.imshow(sl, cmap="gray", origin="lower", aspect="auto", interpolation="nearest")
    if labels is not None:
        lab = np.take(labels, k, axis=view_axis)
        lab = lab.T if remaining.index(la) != 0 else lab
        ax.imshow(np.ma.masked_equal(lab, 0), cmap="tab20", alpha=0.5, origin="lower", aspect="auto",
                  interpolation="nearest", vmin=0, vmax=20)
    outlines = window_outlines(report, view_axis)
    for o in sorted(outlines, key=lambda o: o["evaluated"]):
        z0 = o["z"] - offset[la]
        h0 = o["h"] - offset[h_axis]
        ev = o["evaluated"]
        ax.add_patch(Rectangle((h0 - 0.5, z0 - 0.5), patch[h_axis], patch[la], fill=False,
                               edgecolor=("lime" if o["role"] == "centre" else "deepskyblue") if ev else "red",
                               linestyle="-" if ev else "--", linewidth=1.2 if ev else 0.8, alpha=0.9))
    ax.set_xlim(-0.5 - offset[h_axis], padded[h_axis] - offset[h_axis] - 0.5)
    ax.set_ylim(-0.5 - offset[la], padded[la] - offset[la] - 0.5)
    n_ev = sum(o["evaluated"] for o in outlines)
    ax.set_title(title or f"{n_ev}/{len(outlines)} outlines evaluated", fontsize=9)
    ax.set_xlabel(f"network axis {h_axis}")
    ax.set_ylabel(f"network axis {la} (z)")
    return ax


def legend_handles() -> Sequence:
    from matplotlib.lines import Line2D
    return [Line2D([], [], color="lime", label="centre window (evaluated)"),
            Line2D([], [], color="deepskyblue", label="neighbour / tile (evaluated)"),
            Line2D([], [], color="red", linestyle="--", label="skipped")]
