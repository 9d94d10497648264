"""Fast, memory-lean preprocessing for inference, and the way back to the original grid.

nnU-Net's steps in nnU-Net's order (crop, normalise, resample), but cropped to the body first
(`body_bbox`: fewer windows), resampled linearly with torch slab by slab on the predictor's device
(`resample_to_grid`: the arithmetic of nnU-Net's torch resampler, one float32 slab of extra memory),
and only the label map - not one probability map per class - resampled back (`label_planes`,
`labels_to_original`: nearest neighbour, one original-size plane at a time).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_BODY_HU = -500.0
CROP_MODES = ("body", "nonzero", "none")


def _bbox_of_mask_projections(mask: np.ndarray) -> list[tuple[int, int]] | None:
    out = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        prof = mask.any(axis=other)
        idx = np.flatnonzero(prof)
        if idx.size == 0:
            return None
        out.append((int(idx[0]), int(idx[-1]) + 1))
    return out


def body_bbox(image: np.ndarray, mode: str = "body", threshold_hu: float = DEFAULT_BODY_HU,
              subsample: int = 4, margin: int = 2, scale: tuple[float, float] = (1.0, 0.0)) -> tuple[slice, ...]:
    """Slices of the crop box of `image` (any axis order). `scale` = (slope, intercept) turns stored
    values into HU when the file stores scaled integers.

    "body": the bounding box of voxels above `threshold_hu` (default -500 HU: air is about -1000,
    lung parenchyma about -850, fat about -100), found on a grid subsampled by `subsample` in every
    axis and widened by `subsample` + `margin` voxels, so it never cuts the body. CT tables (often
    above -500 HU) can widen the box a little; that costs a few windows, never accuracy. When no
    voxel passes the threshold the whole image is kept. "nonzero": nnU-Net's own crop (the bounding
    box of voxels != 0; for CT almost always the whole image). "none": no crop.
    """
    if mode not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, got {mode!r}")
    full = tuple(slice(0, s) for s in image.shape)
    if mode == "none":
        return full
    s = max(1, int(subsample))
    sub = image[tuple(slice(None, None, s) for _ in image.shape)]
    if mode == "nonzero":
        mask = sub != 0
        s_eff, pad = s, s - 1 if s > 1 else 0
    else:
        slope, inter = scale
        thr = (threshold_hu - inter) / slope if slope != 0 else threshold_hu
        mask = (sub > thr) if slope > 0 else (sub < thr)
        s_eff, pad = s, s + int(margin)
    bb = _bbox_of_mask_projections(mask)
    if bb is None:
        return full
    out = []
    for (lo, hi), n in zip(bb, image.shape):
        lo_v = max(0, lo * s_eff - pad)
        hi_v = min(n, (hi - 1) * s_eff + 1 + pad)
        out.append(slice(lo_v, hi_v))
    return tuple(out)


def compute_new_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """nnU-Net's `compute_new_shape`: round(shape * spacing / new_spacing)."""
    return tuple(int(v) for v in np.round(np.array(spacing, float) / np.array(new_spacing, float)
                                          * np.array(shape, float)).astype(int))


class CTNormalizer:
    """nnU-Net's CTNormalization as a pointwise torch function (works slab by slab): clip to the
    plans' [percentile_00_5, percentile_99_5], subtract the mean, divide by max(std, 1e-8)."""

    def __init__(self, intensity_properties: dict, scale: tuple[float, float] = (1.0, 0.0)):
        p = intensity_properties
        self.lo, self.hi = float(p["percentile_00_5"]), float(p["percentile_99_5"])
        self.mean, self.std = float(p["mean"]), max(float(p["std"]), 1e-8)
        self.slope, self.inter = float(scale[0]), float(scale[1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if (self.slope, self.inter) != (1.0, 0.0):
            x = x * self.slope + self.inter
        x.clamp_(self.lo, self.hi)
        x.sub_(self.mean).div_(self.std)
        return x


def _linear_mode(nd: int) -> str:
    return {1: "linear", 2: "bilinear", 3: "trilinear"}[nd]


def resample_to_grid(volume: np.ndarray | torch.Tensor, new_shape: Sequence[int], *, slab_axis: int = 0,
                     slab_axis_mode: str = "linear", normalize=None, device: torch.device | str = "cpu",
                     slab: int = 16) -> torch.Tensor:
    """Normalise and resample a 3D array to `new_shape` (same axis order); returns float32 on `device`.

    volume: any dtype, may be a non-contiguous view (e.g. a transposed crop of the file's array).
    slab_axis: the axis processed in slabs (the scan's long axis); the two others are resampled
    bilinearly per slice, then `slab_axis` is resampled with `slab_axis_mode` ("linear" or
    "nearest-exact"). normalize: pointwise callable on a float32 tensor (e.g. CTNormalizer), or None.

    Linear with `align_corners=False` and no antialiasing is the arithmetic of nnU-Net's
    `resample_torch_fornnunet` (and of trilinear `F.interpolate`); it is separable, so in-plane per
    slab then along the slab axis gives the same result, with peak memory the input plus one float32
    slab plus the output. "nearest-exact" along the slab axis is for when nnU-Net's anisotropy rule
    resamples z separately (`separate_z_axis`). nnU-Net's *default* preprocessing resamples with
    scipy cubic splines instead (its effect on DSC: docs/benchmarks.md).
    """
    device = torch.device(device)
    new_shape = tuple(int(v) for v in new_shape)
    if volume.ndim != 3 or len(new_shape) != 3:
        raise ValueError(f"3D volume and shape expected, got {volume.shape} -> {new_shape}")
    if slab_axis_mode not in ("linear", "nearest-exact"):
        raise ValueError(f"slab_axis_mode must be 'linear' or 'nearest-exact', got {slab_axis_mode!r}")
    plane = [a for a in range(3) if a != slab_axis]
    plane_new = [new_shape[a] for a in plane]
    n = volume.shape[slab_axis]
    parts = []
    for k0 in range(0, n, slab):
        k1 = min(n, k0 + slab)
        idx = [slice(None)] * 3
        idx[slab_axis] = slice(k0, k1)
        chunk = volume[tuple(idx)]
        if isinstance(chunk, np.ndarray):
            chunk = torch.from_numpy(np.ascontiguousarray(np.moveaxis(chunk, slab_axis, 0)))
        else:
            chunk = chunk.movedim(slab_axis, 0).contiguous()
        chunk = chunk.to(device, non_blocking=True)
        chunk = normalize(chunk) if normalize is not None else chunk.float()
        if list(chunk.shape[1:]) != plane_new:
            chunk = F.interpolate(chunk[:, None], size=plane_new, mode="bilinear", align_corners=False,
                                  antialias=False)[:, 0]
        parts.append(chunk)
    out = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
    del parts
    if out.shape[0] != new_shape[slab_axis]:
        size = (new_shape[slab_axis], *plane_new)
        if slab_axis_mode == "linear":
            out = F.interpolate(out[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
        else:
            out = F.interpolate(out[None, None], size=size, mode="nearest-exact")[0, 0]
    return out.movedim(0, slab_axis).contiguous()


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source indices of nearest-exact resampling from n_in to n_out samples."""
    i = np.arange(n_out, dtype=np.int64)
    return np.minimum(((2 * i + 1) * n_in) // (2 * n_out), n_in - 1)     # exact integer arithmetic


def labels_to_original(labels: torch.Tensor | np.ndarray, out: np.ndarray, *, slab_axis: int = 0) -> np.ndarray:
    """Nearest-neighbour resample `labels` (network grid) into `out` (any view of the original-size
    array with the same axis order as `labels`), plane by plane along `slab_axis`. Returns out.
    `nearest-exact` (source index floor((i + 0.5) * in / out)) matches the align_corners=False
    geometry of the forward resampling.

    The small network-grid map is brought to the CPU once; each source plane is enlarged in-plane
    once (consecutive output planes that share a source plane reuse it) and copied into `out`, so
    the work is one gather per source plane plus one copy per output plane, and the extra memory is
    one original-size plane."""
    if labels.ndim != 3 or out.ndim != 3:
        raise ValueError("3D label maps expected")
    src = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    idx = [nearest_indices(int(src.shape[a]), int(out.shape[a])) for a in range(3)]
    src = np.moveaxis(src, slab_axis, 0)
    dst = np.moveaxis(out, slab_axis, 0)
    rows, cols = (idx[a] for a in range(3) if a != slab_axis)
    plane, last = None, -1
    for o, k in enumerate(idx[slab_axis]):
        if k != last:
            plane = src[k].take(rows, axis=0).take(cols, axis=1)
            last = k
        dst[o] = plane
    return out


def label_planes(labels: torch.Tensor | np.ndarray, shape: Sequence[int], crop: Sequence[slice],
                 perm: Sequence[int], dtype=np.uint8) -> Iterator[np.ndarray]:
    """The original-grid label map, one plane of the last file axis k at a time, for a streaming writer
    (`flare_utils.data.io.save_nifti_planes_like`): nearest-neighbour resampling (`nearest-exact`, as
    `labels_to_original`) of the network-grid `labels` into `crop` of a zero array of `shape`.

    labels: network axis d = file axis perm[d]. Each yielded plane is (shape[1], shape[0]) (j, i) in C
    order, NIfTI's byte order; consecutive planes that read the same network slice are the same
    buffer, so the work is one in-plane gather per network slice and the memory one original plane
    (no original-size array at all)."""
    src = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if src.ndim != 3 or len(shape) != 3:
        raise ValueError("3D label maps expected")
    perm = tuple(int(a) for a in perm)
    src = src.transpose([perm.index(f) for f in (1, 0, 2)])           # network -> file axes (j, i, k)
    lo = [int(c.start or 0) for c in crop]
    hi = [int(shape[f] if c.stop is None else c.stop) for f, c in enumerate(crop)]
    idx = [nearest_indices(int(src.shape[a]), hi[f] - lo[f]) for a, f in enumerate((1, 0, 2))]
    rows, cols, ks = idx
    empty = np.zeros((int(shape[1]), int(shape[0])), dtype=dtype)
    plane, last = empty.copy(), -1
    for k in range(int(shape[2])):
        if not lo[2] <= k < hi[2]:
            yield empty
            continue
        s = int(ks[k - lo[2]])
        if s != last:
            plane[lo[1]:hi[1], lo[0]:hi[0]] = src[:, :, s][rows][:, cols]
            last = s
        yield plane


def separate_z_axis(current_spacing: Sequence[float], new_spacing: Sequence[float]) -> int | None:
    """The axis nnU-Net resamples separately (nearest) for anisotropic data, or None
    (`determine_do_sep_z_and_axis` with its default threshold)."""
    from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis
    do_sep, axis = determine_do_sep_z_and_axis(None, list(current_spacing), list(new_spacing))
    if not do_sep or axis is None:
        return None
    if isinstance(axis, (list, tuple, np.ndarray)):
        axis = list(axis)
        if len(axis) != 1:
            return None
        axis = axis[0]
    return int(axis)

