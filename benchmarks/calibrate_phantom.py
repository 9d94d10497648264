"""Calibrate flare_utils.synthetic.phantom against the real CT in ../shared/data/real_ct.

    .venv/bin/python benchmarks/calibrate_phantom.py            # measure the real CT
    .venv/bin/python benchmarks/calibrate_phantom.py --compare  # ... and phantoms made like it

The real numbers are kept as constants in flare_utils/synthetic/phantom.py (see the calibration table
there). Method: each organ mask is eroded by one voxel (3 mm) against partial volume; inside,
"mean"/"std" are the HU mean and std, "smooth" the std of the 3x3x3 local mean, "noise" the std
of (voxel - 3x3x3 local mean) * sqrt(27/26). Fat = body voxels in [-190, -30] HU outside organs;
air = voxels at least 5 voxels away from the body (largest component of HU > -500). Body half
widths are measured per slice. --compare generates non-contrast phantoms on the same 3 mm
isotropic grid and measures them the same way, so the two columns can be compared directly.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flare_utils.data.labels import LABELS, label_for  # noqa: E402


def body_mask(ct: np.ndarray) -> np.ndarray:
    body = ct > -500
    lab, n = ndi.label(body)
    if n == 0:
        return body
    sizes = ndi.sum(body, lab, range(1, n + 1))
    body = lab == (1 + int(np.argmax(sizes)))
    for k in range(body.shape[2]):
        body[:, :, k] = ndi.binary_fill_holes(body[:, :, k])
    return body


def measure(ct: np.ndarray, labels: np.ndarray, voxel_ml: float) -> dict[str, tuple]:
    """{structure: (n, volume ml, mean, std, smooth, noise)} for organs, fat and air."""
    ct = ct.astype(np.float32)
    local = ndi.uniform_filter(ct, 3)
    out = {}

    def stats(name, m, erode=1):
        me = ndi.binary_erosion(m, iterations=erode) if erode else m
        if me.sum() < 10:
            me = m
        if me.sum() == 0:
            return
        v = ct[me]
        hf = (ct - local)[me] * np.sqrt(27 / 26)
        out[name] = (int(m.sum()), m.sum() * voxel_ml, v.mean(), v.std(), local[me].std(), hf.std())

    for lab in range(1, 14):
        stats(LABELS[lab].name, labels == lab)
    body = body_mask(ct)
    inner = ndi.binary_erosion(body, iterations=2)
    stats("fat", inner & (ct >= -190) & (ct <= -30) & (labels == 0), erode=0)
    far = ~ndi.binary_dilation(body, iterations=5)
    stats("air", far, erode=0)
    return out


def real(root: Path):
    img = nib.load(str(root / "ct.nii.gz"))
    ct = np.asarray(img.dataobj)
    labels = np.zeros(ct.shape, np.uint8)
    for p in sorted((root / "masks").glob("*.nii.gz")):
        lab = label_for(p.name)
        if lab:
            labels[np.asarray(nib.load(str(p)).dataobj) > 0.5] = lab
    vox_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000
    return measure(ct, labels, vox_ml), ct, labels


def phantoms(n: int):
    from flare_utils.synthetic.phantom import PRESETS, generate_case
    p = dataclasses.replace(PRESETS["demo"], name="calib3mm", inplane_spacing=(3.0, 3.0),
                            slice_spacing=(3.0, 3.0), slice_choices=(3.0,), matrix=(128, 128),
                            contrast_weights={"non_contrast": 1.0}, max_slices=400)
    res = []
    for seed in range(n):
        c = generate_case(seed, p, fov="abdomen_pelvis", missing=())
        res.append(measure(c.image, c.label, 27e-3))
    keys = res[0].keys()
    return {k: tuple(np.mean([r[k][i] for r in res if k in r]) for i in range(6)) for k in keys}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("real_ct", nargs="?", default=str(ROOT.parent / "shared" / "data" / "real_ct"))
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("-n", type=int, default=4)
    a = ap.parse_args()
    r, ct, labels = real(Path(a.real_ct))
    ph = phantoms(a.n) if a.compare else {}
    print(f"{'structure':22s} {'vol_ml':>8s} {'mean':>7s} {'std':>6s} {'smooth':>6s} {'noise':>6s}"
          + ("   | phantom vol   mean    std smooth  noise" if ph else ""))
    for k in list(r) + [k for k in ph if k not in r]:
        row = r.get(k)
        s = (f"{k:22s} {row[1]:8.1f} {row[2]:7.1f} {row[3]:6.1f} {row[4]:6.1f} {row[5]:6.1f}" if row
             else f"{k:22s} {'-':>8s}")
        if k in ph:
            q = ph[k]
            s += f"   | {q[1]:11.1f} {q[2]:6.1f} {q[3]:6.1f} {q[4]:6.1f} {q[5]:6.1f}"
        print(s)


if __name__ == "__main__":
    main()
