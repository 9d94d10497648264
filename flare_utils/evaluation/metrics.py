"""FLARE22 DSC and NSD per organ, exactly as the official evaluation computes them, but fast.

`evaluate_case(pred, gt, spacing)` scores the 13 organs of one case by the official script's rules,
including its z-cut of aorta, IVC and esophagus that drops the last labelled slice
(`exact_official_zcut=True`, the default) and the NSD revisions "2022" (default) and "2024".
NSD re-implements DeepMind's surface-distance algorithm on each organ's bounding box with a fast
EDT and re-decides distances near the tolerance in float64, so it equals the reference up to float
summation order. Where the official script would fail (a z-cut organ whose ground truth lies in a
single slice, with a non-empty prediction; under "2022" also with an empty one) DSC and NSD are NaN.
Revision "2024" follows the FLARE24 order: a present organ with an empty prediction scores
DSC = NSD = 0 before any z-cut. HD95 is optional (`hd95=True`): NaN when both masks are empty,
inf when exactly one is.

Details: docs/reference/metrics.md
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from flare_utils.errors import FlareInputError
from flare_utils.data.io import read_label_map
from flare_utils.data.labels import LABELS, ORGANS, Z_CUT_LABELS

REVISIONS: tuple[str, ...] = ("2022", "2024")
DEFAULT_REVISION = "2022"
# Revision 2024: NSD is set to 0 (and not computed) where DSC is below this.
NSD_DSC_CUTOFF_2024 = 0.2
HD_PERCENT = 95.0

# Relative half-width (on squared distances) of the window in which a float32 EDT value is not
# trusted to decide `distance <= tolerance`; measured edt error is ~2e-7, so 1e-4 is a wide margin.
_TIE_WINDOW = 1e-4

__all__ = [
    "OrganScore", "REVISIONS", "DEFAULT_REVISION", "evaluate_case", "evaluate_files",
    "surface_dice", "robust_hausdorff", "surface_area_table", "neighbour_codes", "scores_to_row",
]


@dataclass(frozen=True)
class OrganScore:
    """Scores of one organ in one case.

    dsc, nsd: FLARE22 DSC and NSD (NaN only for a single-slice aorta/IVC/esophagus ground truth
        under the official z-cut, where the official script itself fails; under revision "2024"
        an empty prediction scores 0 there, as the FLARE24 script does).
    hd95: 95th percentile Hausdorff distance in mm, None when not requested (NaN: both empty,
    inf: exactly one empty).
    revision: the FLARE evaluation revision the NSD follows ("2022" or "2024").
    """
    dsc: float
    nsd: float
    hd95: float | None = None
    revision: str = DEFAULT_REVISION


# ---------------------------------------------------------------------------------------------
# DeepMind's surface representation, re-implemented
# ---------------------------------------------------------------------------------------------

def _normals_table():
    try:
        from surface_distance.lookup_tables import _NEIGHBOUR_CODE_TO_NORMALS
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "flare_utils.evaluation.metrics needs the 'surface-distance' package (DeepMind's surfel normals "
            "table): pip install surface-distance==0.1") from e
    return _NEIGHBOUR_CODE_TO_NORMALS


def _spacing_tuple(spacing) -> tuple[float, float, float]:
    try:
        sp = tuple(float(s) for s in spacing)
    except TypeError as e:
        raise FlareInputError(None, f"spacing must be 3 numbers (mm), got {spacing!r}") from e
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise FlareInputError(None, f"spacing must be 3 positive finite numbers (mm), got {spacing!r}")
    return sp


@functools.lru_cache(maxsize=64)
def _surface_area_table_cached(spacing: tuple[float, float, float]) -> np.ndarray:
    normals_by_code = _normals_table()
    s0, s1, s2 = spacing
    table = np.zeros(256)
    for code in range(256):
        normals = np.array(normals_by_code[code])
        total = 0
        # Same arithmetic, in the same order, as DeepMind's
        # create_table_neighbour_code_to_surface_area, so the areas are bit-identical.
        for row in range(normals.shape[0]):
            n = np.zeros(3)
            n[0] = normals[row, 0] * s1 * s2
            n[1] = normals[row, 1] * s0 * s2
            n[2] = normals[row, 2] * s0 * s1
            total += np.linalg.norm(n)
        table[code] = total
    table.setflags(write=False)
    return table


def surface_area_table(spacing) -> np.ndarray:
    """Surfel area (mm^2) of each of the 256 2x2x2 neighbour codes for `spacing` (read-only)."""
    return _surface_area_table_cached(_spacing_tuple(spacing))


def neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """2x2x2 neighbour code of every voxel corner of a 3D mask (shape + 1 on every axis).

    Corner (i, j, k) sits between voxels i-1..i, j-1..j, k-1..k; the code has bit 7 for voxel
    (i-1, j-1, k-1) down to bit 0 for voxel (i, j, k), i.e. DeepMind's correlation with
    ``[[[128, 64], [32, 16]], [[8, 4], [2, 1]]]`` on the mask zero-padded by one voxel.
    """
    m = np.asarray(mask)
    if m.ndim != 3:
        raise FlareInputError(None, f"expected a 3D mask, got shape {m.shape}")
    p = np.zeros(tuple(s + 2 for s in m.shape), np.uint8)
    p[1:-1, 1:-1, 1:-1] = m != 0
    # Separable bit packing: pairs along k (bit 1: k-1, bit 0: k), then j (bits 3-2: j-1), then
    # i (bits 7-4: i-1), giving bit 7 = (i-1, j-1, k-1) ... bit 0 = (i, j, k).
    t = p[:, :, :-1] << 1
    t |= p[:, :, 1:]
    u = t[:, :-1, :] << 2
    u |= t[:, 1:, :]
    code = u[:-1] << 4
    code |= u[1:]
    return code


def _edtsq(not_border: np.ndarray, spacing) -> np.ndarray:
    import edt
    return edt.edtsq(not_border, anisotropy=spacing, black_border=False, parallel=1)


@functools.lru_cache(maxsize=256)
def _tie_offsets(spacing: tuple[float, float, float], tolerance: float) -> np.ndarray:
    """Lattice offsets whose reference distance is in [tol*sqrt(1-2W), tol] (float64, scipy order).

    Used to decide exactly, for a point whose float32 EDT value is within the tie window, whether
    a border point lies within the tolerance as the float64 reference sees it.
    """
    t2 = tolerance * tolerance
    lower = t2 * (1.0 - 2.0 * _TIE_WINDOW)
    r = [int(math.ceil(tolerance * math.sqrt(1.0 + 2.0 * _TIE_WINDOW) / s)) + 1 for s in spacing]
    k1, k2 = np.meshgrid(np.arange(-r[1], r[1] + 1), np.arange(-r[2], r[2] + 1), indexing="ij")
    k1, k2 = k1.ravel(), k2.ravel()
    d1 = k1.astype(np.float64) * spacing[1]
    d2 = k2.astype(np.float64) * spacing[2]
    out = []
    for k0 in range(-r[0], r[0] + 1):
        d0 = np.float64(k0) * spacing[0]
        # scipy: dt = offset.astype(float64) * sampling; dt *= dt; add.reduce(axis=0); sqrt
        sq = (d0 * d0 + d1 * d1) + d2 * d2
        keep = (sq >= lower) & (np.sqrt(sq) <= tolerance)
        if keep.any():
            out.append(np.stack([np.full(int(keep.sum()), k0), k1[keep], k2[keep]], axis=1))
    res = np.concatenate(out) if out else np.zeros((0, 3), np.int64)
    res.setflags(write=False)
    return res


def _box_of(mask: np.ndarray) -> tuple[tuple[int, int], ...] | None:
    """Voxel bounding box [lo, hi) per axis of a mask, or None when empty."""
    found = ndimage.find_objects(mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8),
                                 max_label=1)[0]
    return None if found is None else tuple((s.start, s.stop) for s in found)


class _SurfacePair:
    """Surfaces of a gt and a predicted mask (same crop) and their mutual distances.

    Mirrors DeepMind's compute_surface_distances without sorting. Corner (i, j, k) of the code
    grid (crop shape + 1) lies between crop voxels i-1 and i (etc.), so the border corners of a
    mask occupying voxels [lo, hi) lie in corners [lo, hi].
    """

    def __init__(self, gt: np.ndarray, pred: np.ndarray, spacing: tuple[float, float, float],
                 boxes=None):
        """boxes: optional voxel boxes ((lo, hi) per axis, or None) of gt and pred in the crop,
        supersets allowed (they only bound the NSD region); computed when not given."""
        self.spacing = spacing
        self.boxes = boxes
        self.table = _surface_area_table_cached(spacing)
        self.gt, self.pred = gt, pred
        self.codes_gt = neighbour_codes(gt)
        self.codes_pred = neighbour_codes(pred)
        self.shape = self.codes_gt.shape
        self.border_gt = (self.codes_gt != 0) & (self.codes_gt != 255)
        self.border_pred = (self.codes_pred != 0) & (self.codes_pred != 255)
        self._full = None

    # -- distances on the whole crop (what DeepMind computes; needed for HD) -------------------
    def full(self):
        """(per side) border flat indices, codes and squared distances to the other border."""
        if self._full is None:
            sides = []
            for border, codes, other in ((self.border_gt, self.codes_gt, self.border_pred),
                                         (self.border_pred, self.codes_pred, self.border_gt)):
                idx = np.flatnonzero(border)
                sides.append((idx, codes.ravel()[idx], _sq_at(other, idx, self.spacing)))
            self._full = sides
        return self._full

    # -- NSD -----------------------------------------------------------------------------------
    def _nsd_region(self, tolerance: float) -> tuple[slice, ...] | None:
        """Corner region outside which no surfel can be within `tolerance` of the other surface.

        A gt surfel within tolerance of the prediction lies within tolerance of the prediction's
        box, and its nearest predicted surfel within tolerance of the gt's box; so restricting the
        EDTs to (gt box + tol) & (pred box + tol) gives the exact distance wherever it is
        <= tolerance, and > tolerance (or inf) elsewhere, for both directions.
        """
        bg, bp = self.boxes if self.boxes is not None else (_box_of(self.gt), _box_of(self.pred))
        if bg is None or bp is None:
            return None
        region = []
        for ax in range(3):
            r = int(math.ceil(tolerance / self.spacing[ax])) + 1
            lo = max(bg[ax][0] - r, bp[ax][0] - r, 0)
            hi = min(bg[ax][1] + r, bp[ax][1] + r, self.shape[ax] - 1)
            if lo > hi:
                return None
            region.append(slice(lo, hi + 1))
        return tuple(region)

    def _within(self, sq: np.ndarray, idx: np.ndarray, border_other: np.ndarray,
                tolerance: float) -> np.ndarray:
        """Exact `reference distance <= tolerance` for surfels at flat `idx` of a grid.

        sq: their float32-EDT squared distances to `border_other` (same grid).
        """
        t2 = tolerance * tolerance
        ok = sq <= t2
        amb = np.flatnonzero(np.abs(sq - t2) <= _TIE_WINDOW * t2)
        if amb.size:
            offsets = _tie_offsets(self.spacing, float(tolerance))
            shape = border_other.shape
            pts = np.stack(np.unravel_index(idx[amb], shape), axis=1)
            hit = np.zeros(amb.size, bool)
            upper = np.array(shape)
            for off in offsets:
                q = pts + off
                inside = np.all((q >= 0) & (q < upper), axis=1) & ~hit
                if not inside.any():
                    continue
                sel = np.flatnonzero(inside)
                qq = q[sel]
                hit[sel] |= border_other[qq[:, 0], qq[:, 1], qq[:, 2]]
            ok[amb] = hit
        return ok

    def surface_dice(self, tolerance: float) -> float:
        area_gt = np.sum(self.table[self.codes_gt[self.border_gt]])
        area_pred = np.sum(self.table[self.codes_pred[self.border_pred]])
        denom = area_gt + area_pred
        if denom == 0:
            return float("nan")
        overlap = 0.0
        if self._full is not None:   # distances on the whole crop are there already: use them
            (ig, cg, sg), (ip, cp, sp) = self._full
            parts = [(sg, ig, cg, self.border_pred), (sp, ip, cp, self.border_gt)]
        else:
            region = self._nsd_region(tolerance)
            parts = []
            if region is not None:
                b_g, b_p = self.border_gt[region], self.border_pred[region]
                for border, codes, other in ((b_g, self.codes_gt[region], b_p),
                                             (b_p, self.codes_pred[region], b_g)):
                    idx = np.flatnonzero(border)
                    parts.append((_sq_at(other, idx, self.spacing), idx, codes.ravel()[idx], other))
        for sq, idx, codes, other in parts:
            ok = self._within(sq, idx, other, tolerance)
            overlap = overlap + np.sum(self.table[codes[ok]])
        return float(overlap / denom)

    # -- HD ------------------------------------------------------------------------------------
    def _percentile_distance(self, sq: np.ndarray, codes: np.ndarray, percent: float) -> float:
        if sq.size == 0:
            return math.inf
        dist = np.sqrt(sq)
        areas = self.table[codes]
        order = np.lexsort((areas, dist))  # DeepMind sorts (distance, area) tuples
        dist, areas = dist[order], areas[order]
        cum = np.cumsum(areas) / np.sum(areas)
        i = int(np.searchsorted(cum, percent / 100.0))
        return float(dist[min(i, dist.size - 1)])

    def robust_hausdorff(self, percent: float = HD_PERCENT) -> float:
        (ig, cg, sg), (ip, cp, sp) = self.full()
        if ig.size == 0 and ip.size == 0:
            return float("nan")
        return max(self._percentile_distance(sg, cg, percent),
                   self._percentile_distance(sp, cp, percent))


def _sq_at(border_other: np.ndarray, idx: np.ndarray, spacing) -> np.ndarray:
    """Squared distance (float32 EDT, as float64) from grid points `idx` to `border_other`."""
    if idx.size == 0:
        return np.zeros(0)
    if not border_other.any():
        return np.full(idx.size, np.inf)
    not_border = np.ascontiguousarray(~border_other).view(np.uint8)
    return _edtsq(not_border, spacing).ravel()[idx].astype(np.float64)


def _crop_union(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt = np.asarray(gt) != 0
    pred = np.asarray(pred) != 0
    if gt.shape != pred.shape or gt.ndim != 3:
        raise FlareInputError(None, f"masks must be 3D and of the same shape, got {gt.shape} and {pred.shape}")
    box = ndimage.find_objects((gt | pred).view(np.uint8), max_label=1)[0]
    if box is None:
        return np.zeros((0, 0, 0), bool), np.zeros((0, 0, 0), bool)
    return gt[box], pred[box]


def surface_dice(gt: np.ndarray, pred: np.ndarray, spacing, tolerance_mm: float) -> float:
    """DeepMind's surface Dice at `tolerance_mm` of two binary 3D masks (NaN when both empty)."""
    sp = _spacing_tuple(spacing)
    g, p = _crop_union(gt, pred)
    if g.size == 0:
        return float("nan")
    return _SurfacePair(g, p, sp).surface_dice(float(tolerance_mm))


def robust_hausdorff(gt: np.ndarray, pred: np.ndarray, spacing, percent: float = HD_PERCENT) -> float:
    """DeepMind's robust Hausdorff distance (mm) of two binary 3D masks.

    NaN when both masks are empty, inf when exactly one is.
    """
    sp = _spacing_tuple(spacing)
    g, p = _crop_union(gt, pred)
    if g.size == 0:
        return float("nan")
    return _SurfacePair(g, p, sp).robust_hausdorff(percent)


# ---------------------------------------------------------------------------------------------
# Per case, per organ
# ---------------------------------------------------------------------------------------------

def _as_label_array(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 3:
        raise FlareInputError(None, f"{what} must be a 3D label map, got shape {a.shape}")
    if a.dtype == bool:
        return a.view(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise FlareInputError(None, f"{what} holds non-integer values")
        a = a.astype(np.int32)
    return a


def _check_revision(revision) -> str:
    revision = str(revision)
    if revision not in REVISIONS:
        raise FlareInputError(None, f"unknown FLARE evaluation revision {revision!r} (choose from {REVISIONS})")
    return revision


def _check_labels(labels: Iterable[int] | None) -> list[int]:
    if labels is None:
        return [o.label for o in ORGANS]
    out = []
    for lab in labels:
        try:
            value = int(lab)
        except (TypeError, ValueError):
            value = None
        if value not in LABELS:
            raise FlareInputError(None, f"{lab!r} is not a FLARE22 organ label (valid: 1-{len(ORGANS)})")
        out.append(value)
    return out


def _union_box(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> list[list[int]]:
    boxes = [x for x in (a, b) if x is not None]
    return [[min(x[d].start for x in boxes), max(x[d].stop for x in boxes)] for d in range(3)]


def _box_in(obj: tuple[slice, ...] | None, box: list[list[int]]):
    """A find_objects box clipped to `box` and relative to its origin (None when disjoint)."""
    if obj is None:
        return None
    out = []
    for s, (lo, hi) in zip(obj, box):
        a, b = max(s.start, lo), min(s.stop, hi)
        if a >= b:
            return None
        out.append((a - lo, b - lo))
    return tuple(out)


def _score_organ(gt_m: np.ndarray, pred_m: np.ndarray, spacing, tolerance: float,
                 revision: str, hd95: bool, boxes=None) -> OrganScore:
    a = int(np.count_nonzero(gt_m))
    b = int(np.count_nonzero(pred_m))
    inter = int(np.count_nonzero(gt_m & pred_m)) if a and b else 0
    if a + b == 0:
        # Only reachable through the official z-cut of a single-slice ground truth (the
        # official script raises there): NaN, documented in the module docstring.
        return OrganScore(float("nan"), float("nan"), float("nan") if hd95 else None, revision)
    dsc = 2.0 * inter / (a + b)
    skip_nsd = revision == "2024" and dsc < NSD_DSC_CUTOFF_2024
    if skip_nsd and not hd95:
        return OrganScore(dsc, 0.0, None, revision)
    pair = _SurfacePair(gt_m, pred_m, spacing, boxes)
    hd = pair.robust_hausdorff(HD_PERCENT) if hd95 else None  # (computes whole-crop distances)
    nsd = 0.0 if skip_nsd else pair.surface_dice(tolerance)
    return OrganScore(dsc, nsd, hd, revision)


def evaluate_case(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], *,
                  revision: str = DEFAULT_REVISION, labels: Iterable[int] | None = None,
                  hd95: bool = False, exact_official_zcut: bool = True) -> dict[int, OrganScore]:
    """FLARE22 DSC/NSD (and optionally HD95) of every organ of one case.

    pred, gt: integer label maps of the same shape, in nibabel's (i, j, k) voxel order.
    spacing: voxel size in mm along the same axes (nibabel ``header.get_zooms()``).
    revision: "2022" (NSD always computed) or "2024" (NSD = 0 where DSC < 0.2; an empty
        prediction of an organ present in gt scores 0 before the z-cut).
    labels: organ labels to score (default all 13); labels outside 1..13 in the maps are ignored.
    hd95: also compute DeepMind's 95th percentile Hausdorff distance.
    exact_official_zcut: for aorta, IVC and esophagus, cut with the official slice
        ``[:, :, z_min:z_max]`` that drops the last gt slice (True, default), or keep it (False).
    Returns {label: OrganScore} in label order; see the module docstring for the rules.
    """
    revision = _check_revision(revision)
    sp = _spacing_tuple(spacing)
    wanted = _check_labels(labels)
    pred = _as_label_array(pred, "prediction")
    gt = _as_label_array(gt, "ground truth")
    if pred.shape != gt.shape:
        raise FlareInputError(None, f"prediction shape {pred.shape} does not match ground truth shape {gt.shape}")
    max_label = max(wanted) if wanted else 0
    gt_boxes = ndimage.find_objects(gt, max_label=max_label) if wanted else []
    pred_boxes = ndimage.find_objects(pred, max_label=max_label) if wanted else []
    nan_hd = float("nan") if hd95 else None
    inf_hd = float("inf") if hd95 else None

    out: dict[int, OrganScore] = {}
    for lab in wanted:
        gbox, pbox = gt_boxes[lab - 1], pred_boxes[lab - 1]
        if gbox is None:
            out[lab] = (OrganScore(1.0, 1.0, nan_hd, revision) if pbox is None
                        else OrganScore(0.0, 0.0, inf_hd, revision))
            continue
        if pbox is None and revision == "2024":
            # The FLARE24 scripts score an empty prediction of a present organ 0 BEFORE the
            # z-cut, so a single-slice aorta/IVC/esophagus gives 0 here, not NaN. (FLARE22 has
            # no such branch and cuts first; every other case gives 0 / 0 / inf below anyway.)
            out[lab] = OrganScore(0.0, 0.0, inf_hd, revision)
            continue
        box = _union_box(gbox, pbox)
        if lab in Z_CUT_LABELS:
            z_min, z_max = gbox[2].start, gbox[2].stop - 1
            z_end = z_max if exact_official_zcut else z_max + 1
            box[2] = [max(box[2][0], z_min), min(box[2][1], z_end)]
            box[2][1] = max(box[2][1], box[2][0])
        sl = tuple(slice(lo, hi) for lo, hi in box)
        gt_m = gt[sl] == lab
        pred_m = pred[sl] == lab if pbox is not None else np.zeros(gt_m.shape, bool)
        boxes = (_box_in(gbox, box), _box_in(pbox, box))
        out[lab] = _score_organ(gt_m, pred_m, sp, LABELS[lab].nsd_tolerance_mm, revision, hd95, boxes)
    return out


def evaluate_files(pred_path: str | Path, gt_path: str | Path, **kw) -> dict[int, OrganScore]:
    """evaluate_case on two NIfTI label maps, with the spacing of the ground truth's header.

    Raises FlareInputError naming the prediction file when its shape, spacing, origin or
    direction differ from the ground truth's.
    """
    gt, g_geom = read_label_map(gt_path)
    pred, p_geom = read_label_map(pred_path)
    problem = g_geom.mismatch(p_geom)
    if problem is not None:
        raise FlareInputError(pred_path, f"geometry differs from the ground truth {gt_path}: {problem}")
    return evaluate_case(pred, gt, g_geom.spacing, **kw)


def scores_to_row(scores: Mapping[int, OrganScore], hd95: bool = False) -> dict[str, float]:
    """FLARE CSV columns of one case: <key>_DSC for all organs, then <key>_NSD (then _HD95)."""
    row: dict[str, float] = {}
    for metric in ("dsc", "nsd") + (("hd95",) if hd95 else ()):
        for lab, s in scores.items():
            v = getattr(s, metric)
            row[f"{LABELS[lab].flare_key}_{metric.upper()}"] = float("nan") if v is None else float(v)
    return row
