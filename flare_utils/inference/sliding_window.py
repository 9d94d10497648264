"""Window grids and the sliding-window loop: the FLARE22 winner's efficient 3x3 windows and
nnU-Net's full tiling, run by the same code.

nnU-Net tiles the whole (padded) image with half-overlapping patches. The FLARE22 winner's
"efficient" grid ("Revisiting nnU-Net for Iterative Pseudo Labeling and Efficient Sliding Window
Inference") keeps nnU-Net's steps along the long (head-foot, "z") axis but runs only a 3x3 grid of
windows in-plane, centred on the body, and skips a z step's 8 neighbours when its centre window
sees no organ: far fewer network calls for the same model. Both grids go through one loop
(`run_sliding_window`) with nnU-Net's Gaussian weighting, so "full" gives nnU-Net's own logits and
the two modes differ only in which windows run (`make_grid`). Everything here is in voxels of the
network grid (after cropping, resampling and padding to at least one patch per axis).

The paper's 3x3 grid covers a band of two patch widths around the centre (at its 0.5 step). Its
model's in-plane patch spans most of a body; a smaller patch does not, and on a body wider than the
band the outer voxels are seen only at the edge of one window, or by none. The efficient mode's
`inplane_grid="adaptive"` keeps the paper's windows where the body fits in the band and otherwise
spreads them to the body's edges (the grid's in-plane shape is the body-cropped extent), adding a
ring of windows per axis only when neighbouring windows would be more than `max_step` patches
apart (`adaptive_positions`); the centre window still runs first and decides whether the rest run.
`inplane_grid="paper"` is the paper's exact grid.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from flare_utils.inference.defaults import (ADAPTIVE_MAX_STEP, DEFAULT_CENTRE_THRESHOLD, DEFAULT_INPLANE_GRID,
                                            DEFAULT_INPLANE_STEP, INPLANE_GRIDS, MODES)


def nnunet_steps(size: int, patch: int, step: float = 0.5) -> list[int]:
    """nnU-Net's window starts along one axis (`compute_steps_for_sliding_window`); size >= patch."""
    if size < patch:
        raise ValueError(f"axis of size {size} is smaller than the patch {patch}: pad first")
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    n = int(math.ceil((size - patch) / (patch * step))) + 1
    if n == 1:
        return [0]
    actual = (size - patch) / (n - 1)
    return [int(np.round(actual * i)) for i in range(n)]


def centred_positions(size: int, patch: int, step: float = 0.5, n: int = 3) -> tuple[list[int], int]:
    """Starts of `n` windows (odd) centred on the axis, `step` patches apart, clamped and
    deduplicated; and the centre window's start. Needs size >= patch (pad first).

    The centre window starts at c = (S - P) // 2 (axis size S, patch P), its neighbours at
    c -/+ round(P * step); every start is clamped to [0, S - P] and duplicates are dropped. So an
    axis exactly one patch wide has 1 position, one narrower than two patches 2 or 3, a wide one 3.
    """
    if size < patch:
        raise ValueError(f"axis of size {size} is smaller than the patch {patch}: pad first")
    if n < 1 or n % 2 == 0:
        raise ValueError(f"n must be odd and >= 1, got {n}")
    h = max(1, int(round(patch * step)))
    c = (size - patch) // 2
    pos = sorted({min(max(c + k * h, 0), size - patch) for k in range(-(n // 2), n // 2 + 1)})
    return pos, c


def adaptive_positions(size: int, patch: int, step: float = 0.5,
                       max_step: float = ADAPTIVE_MAX_STEP) -> tuple[list[int], int]:
    """Window starts along one in-plane axis that cover the whole axis; and the centre window's start.

    Where the paper's 3 windows (`centred_positions`, `step` patches apart) reach both ends of the
    axis (size - patch <= 2 * round(patch * step)) they are returned unchanged. Otherwise
    n = 2m + 1 windows (m >= 1, the smallest that keeps neighbours at most max(max_step, step)
    patches apart) spread evenly from 0 to the centre c = (size - patch) // 2 and from c to
    size - patch: the first window starts at the axis's first voxel, the last ends at its last, the
    centre is the paper's. Needs size >= patch (pad first).
    """
    if size < patch:
        raise ValueError(f"axis of size {size} is smaller than the patch {patch}: pad first")
    if not 0 < max_step <= 1:
        raise ValueError(f"max_step must be in (0, 1], got {max_step}")
    span, h = size - patch, max(1, int(round(patch * step)))
    if span <= 2 * h:
        return centred_positions(size, patch, step, 3)
    c = span // 2
    limit = max(max_step, step) * patch
    m = 1
    while (span - c) / m > limit:
        m += 1
    pos = [int(math.floor(c * i / m + 0.5)) for i in range(m + 1)]
    pos += [c + int(math.floor((span - c) * i / m + 0.5)) for i in range(1, m + 1)]
    return sorted(set(pos)), c


@dataclass(frozen=True)
class WindowGrid:
    """Where windows may run. Starts are per array axis; `groups()` gives the run order."""
    mode: str
    shape: tuple[int, ...]
    patch: tuple[int, ...]
    long_axis: int
    long_starts: tuple[int, ...]
    plane_axes: tuple[int, int]
    plane_starts: tuple[tuple[int, ...], tuple[int, ...]]
    centre: tuple[int, int] | None = None     # in-plane start of the centre window (efficient)
    inplane_grid: str | None = None           # efficient: "paper" or "adaptive" (how plane_starts were made)

    @property
    def n_long(self) -> int:
        return len(self.long_starts)

    @property
    def n_plane(self) -> int:
        return len(self.plane_starts[0]) * len(self.plane_starts[1])

    @property
    def n_total(self) -> int:
        return self.n_long * self.n_plane

    def _start(self, z: int, a: int, b: int) -> tuple[int, ...]:
        s = [0, 0, 0]
        s[self.long_axis], s[self.plane_axes[0]], s[self.plane_axes[1]] = z, a, b
        return tuple(s)

    def groups(self) -> list[list[tuple[int, ...]]]:
        """One list of window starts per z step, in increasing z; efficient: centre first."""
        out = []
        for z in self.long_starts:
            if self.mode == "efficient":
                ws = [self._start(z, *self.centre)]
                ws += [self._start(z, a, b) for a in self.plane_starts[0] for b in self.plane_starts[1]
                       if (a, b) != self.centre]
            else:
                ws = sorted(self._start(z, a, b) for a in self.plane_starts[0] for b in self.plane_starts[1])
            out.append(ws)
        return out


def make_grid(mode: str, shape: Sequence[int], patch: Sequence[int], long_axis: int = 0, step: float = 0.5,
              inplane_step: float = DEFAULT_INPLANE_STEP, inplane_grid: str = DEFAULT_INPLANE_GRID,
              max_step: float = ADAPTIVE_MAX_STEP) -> WindowGrid:
    """The window grid of `mode` ("efficient" or "full") on a padded shape (>= patch per axis).

    "full" (nnU-Net's regular tiling): on every axis the starts of nnU-Net's
    `compute_steps_for_sliding_window` with `step` (0.5: windows overlap by half a patch), all
    combinations, iterated with the first array axis outermost like nnU-Net's
    `_internal_get_sliding_window_slicers`.
    "efficient": along `long_axis` the same nnU-Net starts; at each z step a 3x3 in-plane grid
    (`centred_positions`, neighbours `inplane_step` patches from the centre). At 0.5 the grid
    covers [c - P/2, c + 3P/2): two patch widths in-plane, centred on the (body-cropped) image;
    an organ entirely outside that band is missed by design. A smaller `inplane_step` (0.33)
    narrows the band to 1 + 2 * step patches but puts every voxel in it nearer a window centre, for
    the same 9 windows (how each fares on the benchmark cases: docs/benchmarks.md). That is
    `inplane_grid="paper"`; `"adaptive"` takes each in-plane axis's starts from
    `adaptive_positions`: the same where the band covers the axis, else spread over the whole axis
    (3 windows, or 5, 7... when neighbours would be more than `max_step` patches apart). Both keep
    the centre window first. "full" ignores inplane_step, inplane_grid and max_step.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    shape, patch = tuple(int(s) for s in shape), tuple(int(p) for p in patch)
    if len(shape) != 3 or len(patch) != 3:
        raise ValueError(f"3D shape and patch needed, got {shape} and {patch}")
    if any(s < p for s, p in zip(shape, patch)):
        raise ValueError(f"shape {shape} is smaller than the patch {patch}: pad first")
    if long_axis not in (0, 1, 2):
        raise ValueError(f"long_axis must be 0, 1 or 2, got {long_axis}")
    if inplane_grid not in INPLANE_GRIDS:
        raise ValueError(f"inplane_grid must be one of {INPLANE_GRIDS}, got {inplane_grid!r}")
    plane = tuple(a for a in range(3) if a != long_axis)
    zs = tuple(nnunet_steps(shape[long_axis], patch[long_axis], step))
    if mode == "full":
        ps = tuple(tuple(nnunet_steps(shape[a], patch[a], step)) for a in plane)
        return WindowGrid(mode, shape, patch, long_axis, zs, plane, ps, None)
    if inplane_grid == "adaptive":
        (pa, ca), (pb, cb) = (adaptive_positions(shape[a], patch[a], inplane_step, max_step) for a in plane)
    else:
        (pa, ca), (pb, cb) = (centred_positions(shape[a], patch[a], inplane_step) for a in plane)
    return WindowGrid(mode, shape, patch, long_axis, zs, plane, (tuple(pa), tuple(pb)), (ca, cb), inplane_grid)


def nnunet_window_count(shape: Sequence[int], patch: Sequence[int], step: float = 0.5) -> int:
    """Windows of nnU-Net's full sliding window on a padded shape (product over axes of nnU-Net's
    step counts)."""
    return int(np.prod([len(nnunet_steps(int(s), int(p), step)) for s, p in zip(shape, patch)]))


def paper_eq2_count(shape: Sequence[int], patch: Sequence[int], long_axis: int = 0, step: float = 0.5) -> int:
    """Equation (2) of the paper: 9 windows at each of the n_z z steps,
    n_z = ceil((D - P_z) / (step * P_z)) + 1."""
    return 9 * len(nnunet_steps(int(shape[long_axis]), int(patch[long_axis]), step))


# ----------------------------------------------------------------------------------------------
@dataclass
class WindowRecord:
    start: tuple[int, ...]          # array-order start on the padded network grid
    z_index: int                    # which z step
    role: str                       # "centre", "neighbour" (efficient) or "tile" (full)
    evaluated: bool
    foreground: int | None = None   # foreground voxels (argmax != 0) in the window's own output


@dataclass
class SlidingWindowResult:
    labels: torch.Tensor                     # uint8 (or int16) label map, padded shape
    records: list[WindowRecord]
    forward_s: float                          # time inside the forward function (synchronised)
    loop_s: float                             # the whole loop, forward included
    logits: torch.Tensor | None = None        # (K, *shape) float32 when keep_logits

    @property
    def n_evaluated(self) -> int:
        return sum(r.evaluated for r in self.records)

    @property
    def n_skipped(self) -> int:
        return sum(not r.evaluated for r in self.records)

    def records_as_dicts(self) -> list[dict]:
        return [asdict(r) for r in self.records]


def argmax0(a: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """argmax over the first (class) axis, first maximum wins like torch.argmax; a few contiguous
    passes per class into preallocated buffers, several times faster on CPU than torch.argmax(a, 0),
    which reduces across a strided axis. Classes come in increasing order, so where class c is a new
    strict maximum the index so far is < c and `idx = max(idx, c * is_new_max)` sets it."""
    shape = a.shape[1:]
    best = a[0].clone()
    idx = torch.zeros(shape, dtype=dtype, device=a.device)
    is_max = torch.empty(shape, dtype=torch.bool, device=a.device)
    cand = torch.empty(shape, dtype=dtype, device=a.device)
    for c in range(1, a.shape[0]):
        torch.gt(a[c], best, out=is_max)
        torch.maximum(best, a[c], out=best)
        if dtype == torch.uint8:
            torch.mul(is_max.view(torch.uint8), c, out=cand)
        else:
            cand.copy_(is_max).mul_(c)
        torch.maximum(idx, cand, out=idx)
    return idx


def foreground_count(a: torch.Tensor) -> int:
    """Voxels whose argmax over the class axis is not 0 (background)."""
    if a.shape[0] < 2:
        return 0
    best = a[1].clone()
    for c in range(2, a.shape[0]):
        torch.maximum(best, a[c], out=best)
    return int((best > a[0]).sum().item())


def _shift_down(t: torch.Tensor, axis: int, shift: int) -> None:
    """In place: move t's slices [shift:] along `axis` to the front and zero the freed end."""
    n = t.shape[axis]
    shift = min(shift, n)
    keep = n - shift
    if keep > 0:
        src = t.narrow(axis, shift, keep)
        t.narrow(axis, 0, keep).copy_(src if shift >= keep else src.clone())   # no overlap, or a copy
    t.narrow(axis, keep, shift).zero_()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def run_sliding_window(data: torch.Tensor, grid: WindowGrid, forward: Callable[[torch.Tensor], torch.Tensor],
                       num_classes: int, gaussian: torch.Tensor | None, centre_threshold: int = DEFAULT_CENTRE_THRESHOLD,
                       *, keep_logits: bool = False, stream: bool = True, batch_size: int = 1) -> SlidingWindowResult:
    """Run `forward` on the windows of `grid` over `data` (C, *grid.shape), on data's device.

    forward: (B, C, *patch) -> (B, num_classes, *patch): logits of one model, or softmax
    probabilities averaged over an ensemble (the forward function's business). gaussian: (*patch)
    weights or None (uniform). batch_size: windows per forward call for the neighbours (the centre
    always runs alone).

    Efficient mode: at each z step the centre window runs first; when its own prediction (argmax
    over classes) holds fewer than `centre_threshold` foreground voxels, the z step's other windows
    (8 on the paper's grid) are skipped (1, the default, is the paper's "no foreground in the centre
    window"; 0 never skips).
    Foreground only in a neighbour window of such a z step is missed by design.

    Each window's output times the Gaussian is added into a float32 accumulator together with the
    Gaussian weights. The windows proceed along the long axis in increasing order, so every slice
    before the next z start is final once a z step is done: `stream=True` keeps accumulators only
    one patch long, writes the argmax of finished slices into the label map and shifts, so memory
    does not grow with the scan length. Voxels no evaluated window covered are background (0).
    Dividing by the weights does not change the argmax; `keep_logits=True` instead keeps full-size
    accumulators and also returns the normalised logits (for comparisons with nnU-Net).
    """
    if tuple(data.shape[1:]) != tuple(grid.shape):
        raise ValueError(f"data shape {tuple(data.shape[1:])} does not match the grid's {grid.shape}")
    device = data.device
    la, P = grid.long_axis, grid.patch
    L = grid.shape[la]
    stream = stream and not keep_logits
    buf_len = P[la] if stream else L
    acc_shape = list(grid.shape)
    acc_shape[la] = buf_len
    acc = torch.zeros((num_classes, *acc_shape), dtype=torch.float32, device=device)
    wsum = torch.zeros(acc_shape, dtype=torch.float32, device=device)
    g = gaussian.to(device=device, dtype=torch.float32) if gaussian is not None else \
        torch.ones(P, dtype=torch.float32, device=device)
    label_dtype = torch.uint8 if num_classes <= 255 else torch.int16
    labels = torch.zeros(grid.shape, dtype=label_dtype, device=device)
    base = 0                     # long-axis coordinate of acc's first slice
    done = 0                     # labels[:done] (long axis) are final
    records: list[WindowRecord] = []
    fwd_s = 0.0
    t_loop = time.perf_counter()

    def finalize(until: int) -> None:
        nonlocal base, done
        n = until - done
        if n <= 0:
            return
        a = acc.narrow(la + 1, done - base, n)
        w = wsum.narrow(la, done - base, n)
        lab = argmax0(a, label_dtype)
        lab.masked_fill_(w == 0, 0)
        labels.narrow(la, done, n).copy_(lab)
        done = until
        if stream:
            shift = until - base
            _shift_down(acc, la + 1, shift)
            _shift_down(wsum, la, shift)
            base = until

    def window_slices(start, spatial_only: bool):
        sl = [slice(s, s + p) for s, p in zip(start, P)]
        sl[la] = slice(start[la] - base, start[la] - base + P[la])
        return tuple(sl) if spatial_only else (slice(None), *sl)

    def run(starts) -> torch.Tensor:
        nonlocal fwd_s
        x = torch.stack([data[(slice(None), *[slice(s, s + p) for s, p in zip(st, P)])] for st in starts])
        _sync(device)
        t0 = time.perf_counter()
        y = forward(x)
        _sync(device)
        fwd_s += time.perf_counter() - t0
        return y

    def accumulate(start, pred) -> None:
        acc[window_slices(start, False)].addcmul_(pred.float(), g)      # in place: acc += pred * g
        wsum[window_slices(start, True)].add_(g)

    for zi, ws in enumerate(grid.groups()):
        z = ws[0][la]
        if stream:
            finalize(z)          # everything before this z start is final
        if grid.mode == "efficient":
            pred = run([ws[0]])[0]
            fg = foreground_count(pred)
            accumulate(ws[0], pred)
            records.append(WindowRecord(ws[0], zi, "centre", True, fg))
            rest = ws[1:]
            if fg < centre_threshold:
                records.extend(WindowRecord(s, zi, "neighbour", False) for s in rest)
                rest = []
            role = "neighbour"
        else:
            rest, role = ws, "tile"
        for i in range(0, len(rest), max(1, batch_size)):
            chunk = rest[i:i + max(1, batch_size)]
            preds = run(chunk)
            for s, p in zip(chunk, preds):
                accumulate(s, p)
                records.append(WindowRecord(s, zi, role, True))
    finalize(L)
    logits = None
    if keep_logits:
        logits = acc / torch.clamp(wsum, min=1e-12)[None]
        logits[:, wsum == 0] = 0
    loop_s = time.perf_counter() - t_loop
    return SlidingWindowResult(labels, records, fwd_s, loop_s, logits)
