"""Benchmark: flare_utils.evaluation.metrics.evaluate_case vs the official FLARE22 loop on surface_distance.

Builds a 512 x 512 x 200 label map with the 13 FLARE22 organs (the real TotalSegmentator masks of
../shared/data/real_ct upsampled with linear interpolation, or synthetic ellipsoids where that data
is absent), a perturbed prediction (shifts, erosion/dilation, boundary noise, false positives),
then times, single-process and on in-memory arrays:

* ours: evaluate_case(pred, gt, spacing) (revision 2022), and once more with hd95=True;
* reference: the official FLARE22_DSC_NSD_Eval.py per-organ loop on DeepMind's surface_distance.

Prints a markdown table and writes JSON (default benchmarks/results/metrics.json).

    .venv/bin/python benchmarks/bench_metrics.py [--out PATH] [--shape 512 512 200] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flare_utils.data.labels import ORGANS, label_for  # noqa: E402
from flare_utils.evaluation.metrics import evaluate_case  # noqa: E402

SHARED = Path(os.environ.get("FLARE_SHARED_DATA", ROOT.parent / "shared" / "data"))


# ------------------------------------------------------------------------------------------
# Test case
# ------------------------------------------------------------------------------------------

def _real_masks() -> tuple[dict[int, np.ndarray], tuple[float, float, float]] | None:
    folder = SHARED / "real_ct" / "masks"
    if not folder.is_dir():
        return None
    import nibabel as nib
    masks, zooms = {}, None
    for f in sorted(folder.glob("*.nii.gz")):
        lab = label_for(f.name)
        if lab is None:
            continue
        img = nib.load(str(f))
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        masks[lab] = np.asarray(img.dataobj) > 0
    return masks, zooms


def _upsample_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear-interpolation upsampling of one binary mask, computed on its bounding box only."""
    out = np.zeros(shape, bool)
    box = ndimage.find_objects(mask.astype(np.uint8))
    if not box or box[0] is None:
        return out
    f = [n / o for n, o in zip(shape, mask.shape)]
    lo = [max(s.start - 1, 0) for s in box[0]]
    hi = [min(s.stop + 1, n) for s, n in zip(box[0], mask.shape)]
    crop = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float32)
    nlo = [int(round(l * fi)) for l, fi in zip(lo, f)]
    nhi = [min(int(round(h * fi)), n) for h, fi, n in zip(hi, f, shape)]
    target = tuple(b - a for a, b in zip(nlo, nhi))
    up = ndimage.zoom(crop, [t / c for t, c in zip(target, crop.shape)], order=1, grid_mode=True,
                      mode="grid-constant") > 0.5
    up = up[:target[0], :target[1], :target[2]]
    out[nlo[0]:nlo[0] + up.shape[0], nlo[1]:nlo[1] + up.shape[1], nlo[2]:nlo[2] + up.shape[2]] = up
    return out


def _synthetic_masks(shape) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    masks = {}
    for o in ORGANS:
        c = [rng.uniform(0.25, 0.75) * n for n in shape]
        r = [rng.uniform(0.03, 0.15) * n for n in shape]
        masks[o.label] = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r)) <= 1.0
    return masks


def build_case(shape=(512, 512, 200), seed=0):
    real = _real_masks()
    if real is not None:
        masks_lr, zooms = real
        lr_shape = next(iter(masks_lr.values())).shape
        # the real esophagus is empty in this field of view: add a tube (exercises the z-cut)
        eso = np.zeros(lr_shape, bool)
        eso[60:64, 60:64, 70:100] = True
        masks_lr[10] = eso
        masks = {lab: _upsample_mask(m, shape) for lab, m in sorted(masks_lr.items())}
        spacing = tuple(z * o / n for z, o, n in zip(zooms, lr_shape, shape))
        source = "real_ct masks (TotalSegmentator) upsampled"
    else:
        masks = _synthetic_masks(shape)
        spacing = (0.8, 0.8, 2.5)
        source = "synthetic ellipsoids (../shared/data absent)"
    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    for lab, m in masks.items():
        gt[m] = lab
        box = ndimage.find_objects(m.astype(np.uint8))[0]
        if box is None:
            continue
        sl = tuple(slice(max(s.start - 6, 0), s.stop + 6) for s in box)
        p = m[sl]
        op = ("shift", "erode", "dilate", "noise")[lab % 4]
        if op == "shift":
            p = np.roll(p, tuple(int(x) for x in rng.integers(-3, 4, size=3)), axis=(0, 1, 2))
        elif op == "erode":
            p = ndimage.binary_erosion(p, iterations=2)
        elif op == "dilate":
            p = ndimage.binary_dilation(p, iterations=2)
        else:
            shell = ndimage.binary_dilation(p, iterations=2) & ~ndimage.binary_erosion(p, iterations=2)
            p = np.where(shell, rng.random(p.shape) < 0.5, p)
        view = pred[sl]
        view[p] = lab
    # a few false-positive blobs far from their organs
    for lab in (3, 9, 13):
        c = [int(rng.integers(10, n - 10)) for n in shape]
        pred[c[0] - 4:c[0] + 4, c[1] - 4:c[1] + 4, c[2] - 2:c[2] + 2] = lab
    return pred, gt, spacing, source


# ------------------------------------------------------------------------------------------
# Reference: the official loop on surface_distance
# ------------------------------------------------------------------------------------------

def reference_loop(pred, gt, spacing, hd95=True):
    import surface_distance as sd
    import surface_distance.metrics as sdm

    class _Np:  # surface_distance 0.1 uses np.Inf/np.NaN, removed in numpy 2
        def __getattr__(self, name):
            return {"Inf": np.inf, "NaN": np.nan}[name] if name in ("Inf", "NaN") else getattr(np, name)

    sdm.np = _Np()
    out = {}
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        for o in ORGANS:
            i = o.label
            if np.sum(gt == i) == 0 and np.sum(pred == i) == 0:
                out[i] = (1.0, 1.0, math.nan)
            elif np.sum(gt == i) == 0 and np.sum(pred == i) > 0:
                out[i] = (0.0, 0.0, math.inf)
            else:
                if i in (5, 6, 10):
                    z = np.where(gt == i)[2]
                    z_lower, z_upper = np.min(z), np.max(z)
                    g, p = gt[:, :, z_lower:z_upper] == i, pred[:, :, z_lower:z_upper] == i
                else:
                    g, p = gt == i, pred == i
                dists = sd.compute_surface_distances(g, p, spacing)
                dsc = sd.compute_dice_coefficient(g, p)
                nsd = sd.compute_surface_dice_at_tolerance(dists, o.nsd_tolerance_mm)
                hd = sd.compute_robust_hausdorff(dists, 95) if hd95 else math.nan
                out[i] = (float(dsc), float(nsd), float(hd))
    return out


def _timed(fn, repeat):
    times, res = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t)
    return res, times


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else "inf"
    return x


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "metrics.json"))
    ap.add_argument("--shape", type=int, nargs=3, default=(512, 512, 200))
    ap.add_argument("--repeat", type=int, default=3, help="runs of ours (the median is reported)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    pred, gt, spacing, source = build_case(tuple(args.shape))
    build_s = time.perf_counter() - t0
    print(f"case: {gt.shape}, spacing {tuple(round(s, 4) for s in spacing)} mm, {source} "
          f"(built in {build_s:.1f} s)", flush=True)

    ours, t_ours = _timed(lambda: evaluate_case(pred, gt, spacing), args.repeat)
    ours_hd, t_ours_hd = _timed(lambda: evaluate_case(pred, gt, spacing, hd95=True), 1)
    print(f"ours: {np.median(t_ours):.2f} s (hd95: {t_ours_hd[0]:.2f} s); running the reference...", flush=True)
    ref, t_ref = _timed(lambda: reference_loop(pred, gt, spacing), 1)

    def maxdiff(scores, idx, attr, rel=False):
        d = 0.0
        for lab, r in ref.items():
            a, b = getattr(scores[lab], attr), r[idx]
            if (math.isnan(a) and math.isnan(b)) or a == b:
                continue
            d = max(d, abs(a - b) / (abs(b) if rel else 1.0))
        return d

    result = {
        "benchmark": "flare_utils.evaluation.metrics.evaluate_case vs official FLARE22 loop on surface_distance",
        "shape": list(gt.shape), "spacing_mm": list(spacing), "case_source": source,
        "revision": "2022", "processes": 1,
        "ours_s": float(np.median(t_ours)), "ours_runs_s": t_ours,
        "ours_hd95_s": t_ours_hd[0],
        "reference_s": t_ref[0],
        "speedup": t_ref[0] / float(np.median(t_ours)),
        "max_abs_diff_dsc": maxdiff(ours, 0, "dsc"),
        "max_abs_diff_nsd": maxdiff(ours, 1, "nsd"),
        "max_rel_diff_hd95": maxdiff(ours_hd, 2, "hd95", rel=True),
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform()},
        "per_organ": {o.name: {"dsc": ours[o.label].dsc, "nsd": ours[o.label].nsd,
                               "hd95": ours_hd[o.label].hd95,
                               "ref_dsc": ref[o.label][0], "ref_nsd": ref[o.label][1],
                               "ref_hd95": ref[o.label][2]} for o in ORGANS},
    }
    print()
    print("| implementation | time (s) | speed-up | max abs diff DSC | max abs diff NSD |")
    print("|---|---|---|---|---|")
    print(f"| official loop on surface_distance | {result['reference_s']:.2f} | 1.0x | - | - |")
    print(f"| flare_utils.evaluation.metrics (DSC+NSD) | {result['ours_s']:.2f} | {result['speedup']:.1f}x | "
          f"{result['max_abs_diff_dsc']:.1e} | {result['max_abs_diff_nsd']:.1e} |")
    print(f"| flare_utils.evaluation.metrics (+HD95) | {result['ours_hd95_s']:.2f} | "
          f"{result['reference_s'] / result['ours_hd95_s']:.1f}x | | "
          f"(HD95 max rel diff {result['max_rel_diff_hd95']:.1e}) |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(_json_safe(result), indent=2) + "\n")
    os.replace(tmp, out)
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
