"""Synthetic FLARE22-like abdominal CT cases: the project's embedded default dataset.

`generate_case(seed, preset)` draws one CT volume (int16 Hounsfield units) and its 13-organ
FLARE22 label map; `write_cohort(root, ...)` writes a whole cohort in the FLARE22 folder layout.
Everything is deterministic by seed and vectorised, so the `demo` preset trains the full
pipeline on a CPU in minutes and the `tiny` preset makes unit tests fast. Arrays are in nibabel's
(i, j, k) order with a RAS+ affine unless a preset asks for other axis codes; labels never overlap.
Calibration numbers and their source are in the comment block below.

Details: docs/reference/synthetic_cohort.md
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi

from flare_utils.errors import FlareInputError
from flare_utils.data.io import atomic_directory, save_nifti
from flare_utils.data.labels import LABELS, ORGANS
from flare_utils.data.labels import organ as _organ
from flare_utils.utilities.parallel import map_processes

__all__ = ["PhantomPreset", "PRESETS", "PhantomCase", "CohortInfo", "FOVS", "PAINT_ORDER",
           "generate_case", "write_cohort", "case_seed", "get_preset", "PHANTOM_VERSION"]

# Bump when a change alters the generated voxels for the same seed and preset: write_cohort
# refuses to reuse a cohort written by another version (pass overwrite=True, on the command line --overwrite, to regenerate).
PHANTOM_VERSION = 1

# ----------------------------------------------------------------------------------------------
# Label ids (from flare_utils.data.labels) used by name below.
LIVER, RKID, SPLEEN, PANCREAS, AORTA, IVC, RADR, LADR, GALL, ESO, STOMACH, DUOD, LKID = range(1, 14)
assert [o.name for o in ORGANS][:3] == ["liver", "right_kidney", "spleen"]

# Painting order; the first organ painted keeps a contested voxel. Thin and small structures
# come first so that bigger organs can never swallow them; the liver, painted last, gets its
# natural imprints (gallbladder fossa, IVC groove, renal impression, stomach) from the others.
PAINT_ORDER: tuple[int, ...] = (AORTA, IVC, ESO, RADR, LADR, RKID, LKID, GALL, DUOD, PANCREAS,
                                STOMACH, SPLEEN, LIVER)

# Tissue codes of the internal tissue map (organ labels 1..13 are their own tissue codes).
(AIR, FAT, MUSCLE, CORTICAL, CANCELLOUS, VFAT, BOWEL, GAS, LUNG, BLOOD, BRAIN, FLUID, MEDULLA,
 DISC, MARROW, CARTILAGE, BONE, SOFT, LUMEN, VESSEL) = range(20, 40)
_NCODES = 42
# Tissues inside the body cavity into which organs may be painted.
_CAVITY = np.zeros(_NCODES, bool)
_CAVITY[[VFAT, BOWEL, GAS, LUNG, BLOOD, SOFT, LUMEN]] = True

# ----------------------------------------------------------------------------------------------
# Calibration against real CT.
# Source: ../shared/data/real_ct (TotalSegmentator test CT, non-contrast, 3.0 mm isotropic,
# RAS, int32 HU) and its masks/*.nii.gz. Measured 2026-11-24 with benchmarks/calibrate_phantom.py:
# each mask eroded by one voxel (3 mm) against partial volume; "mean"/"std" are the HU mean and
# standard deviation inside; "smooth" is the std of the 3x3x3 local mean (the low-frequency
# texture); "noise" is the std of (voxel - 3x3x3 local mean) * sqrt(27/26). Fat = body voxels in
# [-190, -30] HU outside organs; muscle = paraspinal muscle behind L1/L2 in [-29, 150] HU; bone
# from the vertebrae_L1/L2 masks split at 300 HU; air = voxels >= 5 voxels away from the body.
#   structure             mean    std  smooth  noise     volume (ml; * = cut by the field of view)
#   liver                 46.4   12.8    8.7   12.7     1123*
#   kidney_right          13.9   26.9   11.1   24.7      189
#   spleen                34.8   12.4    8.8   13.6      261*
#   pancreas              -0.6   26.3   13.7   22.0       22
#   aorta                 43.8   14.9    8.8   16.4       48*
#   inferior_vena_cava    42.5   12.5    5.4   12.9       58*
#   adrenal_gland_right   23.0   18.3    6.2   20.6        4.7
#   adrenal_gland_left    21.3   20.6    8.5   19.6        6.0
#   gallbladder            3.2   11.0    6.6   11.1       35
#   esophagus            (empty in this field of view: muscle-like value assumed)
#   stomach              -38.1  237.0  174.5  108.6      134*  (7 % gas; non-gas part 23.4 +- 44.5)
#   duodenum             -51.4  208.0  146.0   88.3       66   (5 % gas; non-gas part  4.2 +- 43.0)
#   kidney_left           20.5   16.3   12.6   17.9      139
#   small_bowel           24.6   23.3   16.3   18.4      585
#   urinary_bladder       12.4   16.4   12.3   13.1      479
#   fat                  -91.9   25.9   40.1   33.9
#   muscle (paraspinal)   29.6   15.3
#   vertebra >300 HU     455.0  168.6   88.9  138.7   (cortical)
#   vertebra <=300 HU    112.8   40.8   27.7   39.5   (cancellous)
#   rib_left_11          225.5   98.1   78.9   81.4
#   bowel gas in body   -847.6  175.9
#   air outside body    -986.2   29.0          35.4
# Image noise: ~13 HU (liver, spleen, IVC) at 3 mm, neighbour correlation of the residual 0.75-0.80.
# Body: left-right half width 165-183 mm, antero-posterior half depth 115-138 mm; subcutaneous fat
# and muscle wall about 12-15 mm each. Organ centroids (relative to the body centre, x right,
# y anterior) set the standard positions below, e.g. liver (+68, +38), spleen (-110, -24),
# kidneys (+72, -15) / (-75, -21), aorta (-14, +15), IVC (+15, +24), pancreas (-21, +40).
# Values the real CT cannot give (lung, brain, CSF, disc, marrow, cartilage, contrast
# enhancement) are typical literature values and marked "lit".
CALIBRATION_SOURCE = "shared/data/real_ct (TotalSegmentator test CT, non-contrast), measured 2026-11-24"

# (mean HU, texture amplitude HU) per tissue code, non-contrast.
_HU_NC: dict[int, tuple[float, float]] = {
    LIVER: (46.4, 4.0), RKID: (17.0, 8.0), SPLEEN: (34.8, 4.0), PANCREAS: (-0.6, 10.0),
    AORTA: (43.8, 4.0), IVC: (42.5, 3.0), RADR: (23.0, 5.0), LADR: (21.3, 5.0),
    GALL: (3.2, 4.0), ESO: (35.0, 6.0),  # esophagus: lit (muscular wall)
    STOMACH: (23.4, 30.0), DUOD: (4.2, 30.0), LKID: (20.5, 8.0),
    AIR: (-1000.0, 0.0), FAT: (-95.0, 15.0), VFAT: (-95.0, 15.0), MUSCLE: (29.6, 6.0),
    CORTICAL: (455.0, 80.0), CANCELLOUS: (112.8, 25.0), BONE: (225.5, 60.0),
    BOWEL: (24.6, 14.0), GAS: (-900.0, 60.0), FLUID: (12.4, 6.0),
    LUNG: (-850.0, 40.0), BLOOD: (42.0, 5.0), BRAIN: (35.0, 4.0),  # lit
    MEDULLA: (17.0, 6.0), DISC: (80.0, 10.0), MARROW: (-40.0, 20.0), CARTILAGE: (120.0, 20.0),  # lit
    SOFT: (35.0, 8.0), LUMEN: (10.0, 8.0),  # bowel content: lit (water-like)
    VESSEL: (41.4, 4.0),  # hepatic/portal vessels: portal_vein_and_splenic_vein of the real CT
}
# Texture amplitudes above are the real "smooth" values reduced until phantoms made on the real
# CT's 3 mm grid (benchmarks/calibrate_phantom.py --compare) show similar smooth/std values.
# Noise std (HU, after the partial-volume blur) at a 3 mm isotropic voxel, chosen so that the
# phantom's liver std (~14 HU with the mean per-case noise factor) matches the real 12.8 HU;
# other voxel sizes get sqrt(27 mm^3 / voxel volume) times more, clipped to [0.5, 2.5].
NOISE_SD_3MM = 11.5
# Contrast phases (chosen per case with preset.contrast_weights): HU added per tissue, scaled
# per case by U(0.7, 1.3); the real CT is non-contrast, so these are literature values.
# Every tissue mean also gets a per-case N(0, 4 HU) offset (scanner calibration).
CONTRAST_PHASES: dict[str, dict[int, float]] = {
    "non_contrast": {},
    "arterial": {AORTA: 260.0, IVC: 40.0, BLOOD: 230.0, VESSEL: 60.0, LIVER: 15.0, SPLEEN: 70.0,
                 PANCREAS: 70.0, RKID: 160.0, LKID: 160.0, MEDULLA: 50.0, RADR: 30.0, LADR: 30.0, ESO: 15.0,
                 STOMACH: 10.0, DUOD: 15.0, BOWEL: 20.0, MUSCLE: 10.0},
    "portal_venous": {AORTA: 140.0, IVC: 110.0, BLOOD: 130.0, VESSEL: 150.0, LIVER: 60.0,
                      SPLEEN: 80.0, PANCREAS: 60.0, RKID: 150.0, LKID: 150.0, MEDULLA: 130.0, RADR: 40.0,
                      LADR: 40.0, ESO: 25.0, STOMACH: 20.0, DUOD: 25.0, BOWEL: 30.0, MUSCLE: 20.0},
}
# Target organ volumes (ml) of the standard anatomy: the real CT where the organ lies wholly in
# its field of view, literature values (lit) where it is cut there.
ORGAN_VOLUME_ML: dict[str, float] = {
    "liver": 1500.0,  # lit (real CT: 1123, cut at the dome)
    "right_kidney": 175.0, "left_kidney": 155.0, "spleen": 250.0,  # spleen lit (real: 261, cut)
    "pancreas": 40.0,  # real CT 22 (atrophic); lit 50-80; compromise
    "gallbladder": 35.0, "right_adrenal_gland": 5.0, "left_adrenal_gland": 5.5,
    "duodenum": 66.0, "stomach": 300.0,  # stomach lit (real 134, cut)
}
# Measured on 10 demo cases (chest_abdomen_pelvis, nothing missing), mean ml, 2026-11-24: liver
# 1534, right/left kidney 179/162, spleen 228, pancreas 49, gallbladder 34, adrenals 3.9/4.6,
# duodenum 72, stomach 315, esophagus 61, aorta (incl. thoracic) 262, IVC 124.

# ----------------------------------------------------------------------------------------------
FOVS: tuple[str, ...] = ("abdomen", "abdomen_pelvis", "chest_abdomen", "chest_abdomen_pelvis",
                         "whole_body")


def _fov_range(fov: str, rng: np.random.Generator) -> tuple[float, float, bool]:
    """(low, high) z of the scan in the standard frame and whether to keep the top when cropping."""
    u = rng.uniform
    if fov == "abdomen":          # liver dome (about +110) to iliac crest (about -150)
        return -150 + u(-40, 40), 110 + u(-35, 45), False
    if fov == "abdomen_pelvis":
        return -370 + u(-30, 30), 110 + u(-25, 45), False
    if fov == "chest_abdomen":    # lung apex (about +400) to iliac crest
        return -150 + u(-40, 40), 400 + u(-30, 40), True
    if fov == "chest_abdomen_pelvis":
        return -370 + u(-30, 30), 400 + u(-30, 40), True
    if fov == "whole_body":       # air above the vertex (+700) down to the thighs / knees
        return u(-1050, -650), 700 + u(10, 150), True
    raise FlareInputError(None, f"unknown field of view {fov!r} (known: {', '.join(FOVS)})")


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhantomPreset:
    """Size and variability of generated cases. Presets are plain data: pass your own.

    Ranges are (low, high). In-plane spacing is chosen so that the body fits the field of view
    (like a technician choosing the display FOV), clipped to `inplane_spacing`.
    """
    name: str
    matrix: tuple[int, int]                        # in-plane voxels (x, y)
    inplane_spacing: tuple[float, float]           # mm
    slice_spacing: tuple[float, float]             # mm
    slice_choices: tuple[float, ...] = ()          # typical values to draw from (within range); () = uniform
    max_slices: int = 400                          # longer scans get thicker slices, then are cropped
    n_slices: int | None = None                    # fixed slice count (the FOV length follows)
    fov_weights: Mapping[str, float] = field(default_factory=lambda: {
        "abdomen": 0.45, "abdomen_pelvis": 0.2, "chest_abdomen": 0.05,
        "chest_abdomen_pelvis": 0.15, "whole_body": 0.15})
    missing_prob: Mapping[str, float] = field(default_factory=lambda: {
        "gallbladder": 0.1, "right_kidney": 0.02, "left_kidney": 0.02})
    contrast_weights: Mapping[str, float] = field(default_factory=lambda: {
        "non_contrast": 0.35, "arterial": 0.15, "portal_venous": 0.5})
    noise: float = 1.0                             # noise multiplier (1 = calibrated)
    noise_range: tuple[float, float] = (0.75, 1.4)  # per-case noise factor
    detail_mm: float = 2.0                         # organ shapes are evaluated no finer than this
    min_thickness_vox: float = 1.3                 # thin organs (adrenals, esophagus) at least this thick
    deformation_mm: tuple[float, float] = (2.0, 5.0)  # std of the smooth displacement field
    blur: bool = True                              # partial-volume blur of the image
    axcodes: str = "RAS"                           # orientation of the written arrays

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("fov_weights", "missing_prob", "contrast_weights"):
            d[k] = dict(d[k])
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, d: Mapping) -> "PhantomPreset":
        kw = dict(d)
        for k in ("matrix", "inplane_spacing", "slice_spacing", "slice_choices", "noise_range",
                  "deformation_mm"):
            if k in kw and kw[k] is not None:
                kw[k] = tuple(kw[k])
        return cls(**kw)


PRESETS: dict[str, PhantomPreset] = {
    # Clinical-like: 512x512, 0.6-1.0 mm in-plane, 1-5 mm slices.
    "realistic": PhantomPreset(
        name="realistic", matrix=(512, 512), inplane_spacing=(0.6, 1.0), slice_spacing=(1.0, 5.0),
        slice_choices=(1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0), max_slices=400, detail_mm=2.0),
    # The embedded default dataset: ~3 mm voxels, 3-5 mm slices, a few MB per case.
    "demo": PhantomPreset(
        name="demo", matrix=(128, 128), inplane_spacing=(2.8, 3.6), slice_spacing=(3.0, 5.0),
        slice_choices=(3.0, 4.0, 5.0), max_slices=320, detail_mm=3.0),
    # Unit tests: ~7 mm voxels, well under a second per case.
    "tiny": PhantomPreset(
        name="tiny", matrix=(56, 56), inplane_spacing=(6.0, 8.0), slice_spacing=(6.0, 8.0),
        max_slices=160, detail_mm=6.0, deformation_mm=(2.0, 4.0)),
}


def get_preset(preset: str | PhantomPreset) -> PhantomPreset:
    if isinstance(preset, PhantomPreset):
        return preset
    if isinstance(preset, Mapping):
        return PhantomPreset.from_dict(preset)
    try:
        return PRESETS[preset]
    except KeyError:
        raise FlareInputError(None, f"unknown phantom preset {preset!r} "
                                    f"(known: {', '.join(PRESETS)}; or pass a PhantomPreset)") from None


@dataclass
class PhantomCase:
    image: np.ndarray            # int16 HU, axes (i, j, k)
    label: np.ndarray            # uint8 0..13, same grid
    affine: np.ndarray           # 4x4, see module docstring (RAS by default)
    spacing: tuple[float, float, float]  # zooms in array axis order (mm)
    fov: str
    present_labels: tuple[int, ...]
    seed: int = 0
    preset: str = ""
    missing: tuple[str, ...] = ()        # organs left out on purpose (names from flare_utils.data.labels)
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape)

    def save(self, image_path: str | Path, label_path: str | Path | None = None) -> None:
        """Write the image (and label) as NIfTI, atomically."""
        save_nifti(self.image, self.affine, image_path)
        if label_path is not None:
            save_nifti(self.label, self.affine, label_path)


# ----------------------------------------------------------------------------------------------
# Small numerical helpers.

def _interp_matrix(coords: np.ndarray, g0: float, step: float, n: int) -> np.ndarray:
    """Rows of linear-interpolation weights sampling a regular 1D grid (g0 + step * arange(n))."""
    coords = np.asarray(coords, np.float64)
    m = np.zeros((len(coords), n), np.float32)
    if n == 1:
        m[:, 0] = 1
        return m
    t = np.clip((coords - g0) / step, 0, n - 1)
    i0 = np.minimum(np.floor(t).astype(np.int64), n - 2)
    w = (t - i0).astype(np.float32)
    r = np.arange(len(coords))
    m[r, i0] = 1 - w
    m[r, i0 + 1] = w
    return m


def _apply_sep(f: np.ndarray, mz: np.ndarray | None, my: np.ndarray | None,
               mx: np.ndarray | None) -> np.ndarray:
    """Separable linear map of a (z, y, x) array: out[k,j,i] = sum mz[k,c] my[j,b] mx[i,a] f[c,b,a]."""
    if mz is not None:
        f = np.tensordot(mz, f, axes=(1, 0))
    if my is not None:
        f = np.tensordot(my, f, axes=(1, 1)).transpose(1, 0, 2)
    if mx is not None:
        f = np.tensordot(f, mx, axes=(2, 1))
    return np.ascontiguousarray(f, dtype=np.float32)


class _Field:
    """A smooth random scalar field on a coarse regular grid in patient mm, (z, y, x) order."""

    def __init__(self, rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, step: float,
                 sigma_cells: float = 1.0):
        self.lo = np.asarray(lo, np.float64)
        self.step = float(step)
        n = np.maximum(2, np.ceil((np.asarray(hi) - self.lo) / step).astype(int) + 1)
        self.n = n  # (x, y, z)
        g = rng.standard_normal((n[2], n[1], n[0]), dtype=np.float32)
        if sigma_cells > 0:
            g = ndi.gaussian_filter(g, sigma_cells, mode="wrap")
        g /= max(float(g.std()), 1e-6)
        self.grid = g

    def mats(self, x, y, z):
        return (_interp_matrix(z, self.lo[2], self.step, self.n[2]),
                _interp_matrix(y, self.lo[1], self.step, self.n[1]),
                _interp_matrix(x, self.lo[0], self.step, self.n[0]))

    def sample_grid(self, x, y, z) -> np.ndarray:
        """Values on the meshgrid of 1D coordinate arrays, shape (len z, len y, len x)."""
        mz, my, mx = self.mats(x, y, z)
        return _apply_sep(self.grid, mz, my, mx)


def _rot(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """Rotation matrix (degrees about x, then y, then z)."""
    a, b, c = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smin(a: np.ndarray, b: np.ndarray, k: float = 0.25) -> np.ndarray:
    """Smooth minimum (blends unions of normalised implicit shapes)."""
    h = np.clip(k - np.abs(a - b), 0, None) / k
    return np.minimum(a, b) - h * h * (k * 0.25)


# ----------------------------------------------------------------------------------------------
# Implicit shapes in the standard frame: f(x, y, z) < 1 inside, ~1 + distance / size outside.

Shape = tuple[Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], np.ndarray, np.ndarray]


def _ellipsoid(c, r, rot=(0.0, 0.0, 0.0)) -> Shape:
    c = np.asarray(c, np.float64)
    r = np.asarray(r, np.float64)
    rm = _rot(*rot)
    ir = (1.0 / r).astype(np.float32)
    rt = rm.T.astype(np.float32)  # world offset -> local

    def f(x, y, z):
        dx, dy, dz = x - np.float32(c[0]), y - np.float32(c[1]), z - np.float32(c[2])
        s = None
        for a in range(3):
            u = (rt[a, 0] * dx + rt[a, 1] * dy + rt[a, 2] * dz) * ir[a]
            s = u * u if s is None else s + u * u
        return np.sqrt(s)

    half = np.sqrt(((rm * r[None, :]) ** 2).sum(1))
    return f, c - half, c + half


def _catmull(points: np.ndarray, radii: np.ndarray, sub: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Catmull-Rom subdivision of a polyline (and linear interpolation of its radii)."""
    p = np.asarray(points, np.float64)
    r = np.asarray(radii, np.float64)
    if len(p) < 3:
        return p, r
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out, rad = [], []
    for i in range(len(p) - 1):
        p0, p1, p2, p3 = ext[i], ext[i + 1], ext[i + 2], ext[i + 3]
        for t in np.arange(sub) / sub:
            t2, t3 = t * t, t * t * t
            out.append(0.5 * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2
                              + (-p0 + 3 * p1 - 3 * p2 + p3) * t3))
            rad.append(r[i] + (r[i + 1] - r[i]) * t)
    out.append(p[-1])
    rad.append(r[-1])
    return np.array(out), np.array(rad)


def _sweep(points, radii, min_r: float = 0.0) -> Shape:
    """Tube of varying radius along a smooth curve through `points`."""
    p, r = _catmull(np.asarray(points, float), np.maximum(np.asarray(radii, float), min_r))
    a, b = p[:-1], p[1:]
    ra, rb = r[:-1], r[1:]

    def f(x, y, z):
        out = np.full(x.shape, np.float32(1e3), dtype=np.float32)
        if x.ndim == 3:
            # per first-axis slab z range: a segment only touches slabs within its reach
            zmin, zmax = z.min(axis=(1, 2)), z.max(axis=(1, 2))
        for s in range(len(a)):
            ab = b[s] - a[s]
            l2 = float(ab @ ab) or 1e-9
            sl = slice(None)
            if x.ndim == 3:
                reach = max(ra[s], rb[s]) * 1.05
                hit = np.nonzero((zmax >= min(a[s][2], b[s][2]) - reach)
                                 & (zmin <= max(a[s][2], b[s][2]) + reach))[0]
                if len(hit) == 0:
                    continue
                sl = slice(hit[0], hit[-1] + 1)
            xs, ys, zs_ = x[sl], y[sl], z[sl]
            dx, dy, dz = xs - np.float32(a[s][0]), ys - np.float32(a[s][1]), zs_ - np.float32(a[s][2])
            t = dx * np.float32(ab[0] / l2)
            t += dy * np.float32(ab[1] / l2)
            t += dz * np.float32(ab[2] / l2)
            np.clip(t, 0, 1, out=t)
            dx -= t * np.float32(ab[0])
            dy -= t * np.float32(ab[1])
            dz -= t * np.float32(ab[2])
            d = np.sqrt(dx * dx + dy * dy + dz * dz)
            d /= np.float32(ra[s]) + t * np.float32(rb[s] - ra[s])
            np.minimum(out[sl], d, out=out[sl])
        return out

    lo = (p - r[:, None]).min(0)
    hi = (p + r[:, None]).max(0)
    return f, lo, hi



def _union(*shapes: Shape, k: float = 0.25) -> Shape:
    def f(x, y, z):
        out = shapes[0][0](x, y, z)
        for s in shapes[1:]:
            out = _smin(out, s[0](x, y, z), k)
        return out
    return f, np.min([s[1] for s in shapes], 0), np.max([s[2] for s in shapes], 0)


def _subtract(a: Shape, b: Shape) -> Shape:
    def f(x, y, z):
        return np.maximum(a[0](x, y, z), 2.0 - b[0](x, y, z))
    return f, a[1], a[2]


# ----------------------------------------------------------------------------------------------
# Standard anatomy (mm). Profiles are tables over z in the standard frame.

# Body cavity cross-section (inside the muscle wall): z, half width, anterior / posterior half depth.
_TRUNK = np.array([
    [-420.0, 0, 0, 0], [-405, 80, 45, 50], [-380, 112, 60, 62], [-340, 128, 72, 76],
    [-250, 140, 86, 86], [-150, 140, 92, 90], [0, 142, 95, 94], [150, 140, 95, 98],
    [300, 135, 86, 95], [385, 122, 72, 82], [415, 48, 40, 50], [520, 40, 35, 45], [540, 0, 0, 0],
])
# Wall multipliers over z: muscle thickness, subcutaneous fat thickness.
_WALL = np.array([[-420.0, 0.8, 1.2], [-150, 1.0, 1.0], [150, 1.2, 0.8], [330, 1.6, 0.7],
                  [400, 1.2, 0.4], [450, 0.8, 0.3], [540, 0.6, 0.2]])
# Vertebral body centre (y) and half sizes (x, y) over z.
_SPINE = np.array([
    [-260.0, -50, 40, 18], [-150, -12, 26, 18], [-60, -14, 25, 17.5], [0, -20, 24, 17],
    [100, -32, 20, 15], [200, -45, 17, 14], [300, -50, 16, 13], [380, -42, 13, 11],
    [430, -30, 11, 9], [520, -22, 10, 8],
])
_SPINE_Z = (-260.0, 510.0)
# Psoas radius over z.
_PSOAS = np.array([[60.0, 0], [40, 7], [-40, 15], [-120, 21], [-200, 24], [-280, 20], [-330, 0]])
# Legs: z, skin radius.
_LEGS = np.array([[-310.0, 0], [-330, 92], [-450, 85], [-650, 70], [-820, 55], [-900, 58],
                  [-1050, 52], [-1300, 40], [-1500, 34], [-1560, 0]])
_LEG_X = 88.0


def _disc_levels() -> np.ndarray:
    """z of the intervertebral disc centres (standard frame)."""
    d = [0.0]
    for _ in range(4):                      # lumbar, downwards to L5/S1
        d.append(d[-1] - 36)
    d = d[::-1]
    z = 34.0                                # T12/L1
    d.append(z)
    for _ in range(12):                     # thoracic
        z += 26
        d.append(z)
    for _ in range(7):                      # cervical
        z += 18
        d.append(z)
    return np.array(sorted(d))


_DISCS = _disc_levels()
_RIB_Z = _DISCS[(_DISCS > 34) & (_DISCS < 360)][::-1]  # posterior rib origins, rib 12 .. 1 reversed
_RIB_Z = np.sort(_RIB_Z)[:12] - 8.0


def _diaphragm(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height of the diaphragm (standard frame) over (x, y): domes right higher, deep posterior recesses."""
    zt = 100.0 + 10.0 * np.tanh(x / 30.0)
    lat = np.maximum(np.abs(x) - 60.0, 0.0)
    post = np.maximum(-y - 20.0, 0.0)
    ant = np.maximum(y - 40.0, 0.0)
    return zt - 0.004 * lat ** 2 - 0.02 * post ** 2 - 0.01 * ant ** 2


# ----------------------------------------------------------------------------------------------
@dataclass
class _Organ:
    label: int
    shape: Shape
    centre: np.ndarray            # standard-frame anchor
    pos_sd: float                 # mm
    size_sd: float                # log-normal sigma
    cap: bool = False             # cut above the diaphragm
    rot_sd: float = 5.0           # degrees
    tissue: Callable | None = None  # (f_fine, extra_fine, X, Y, Z patient coords, case) -> codes or None
    extra: Callable | None = None   # (x, y, z coarse axes, case) -> coarse field passed to `tissue`


def _standard_organs(min_r: float, rng: np.random.Generator) -> list[_Organ]:
    """The 13 organs in the standard frame (x right, y anterior, z superior, mm).

    Positions follow the real CT's organ centroids relative to the body centre (see the
    calibration table) and standard anatomy: z = 0 is the L1/L2 disc.
    """
    t = max(3.5, min_r)
    organs: list[_Organ] = []

    liver = _union(
        _ellipsoid((66, 14, 30), (66, 80, 85), (25, 0, -10)),         # right lobe (dome posterior)
        _ellipsoid((-22, 62, 62), (55, 28, 30), (0, -10, 25)),        # left lobe, anterior to the stomach
        _ellipsoid((20, 38, 55), (48, 48, 40)),                       # medial segments
        k=0.3)
    liver = _subtract(liver, _ellipsoid((78, -40, -30), (42, 36, 62), (-15, 0, 0)))  # renal fossa

    def liver_vessels(x, y, z, case):
        # a network of tubes: where two smooth random fields are both near zero
        v1, v2, w = case["vessels"]
        a = np.abs(v1.sample_grid(x, y, z))
        b = np.abs(v2.sample_grid(x, y, z))
        return np.maximum(a, b) / np.float32(w)

    def liver_tissue(f, e, X, Y, Z, case):
        return np.where((e < 1) & (f < 0.85), np.uint8(VESSEL), np.uint8(0))

    organs.append(_Organ(LIVER, liver, np.array([50.0, 25, 45]), 8, 0.1, cap=True,
                         tissue=liver_tissue, extra=liver_vessels))

    spleen = _subtract(_ellipsoid((-102, -30, 38), (27, 58, 52), (10, 0, -30)),
                       _ellipsoid((-62, -8, 35), (32, 40, 52)))
    organs.append(_Organ(SPLEEN, spleen, np.array([-102.0, -30, 38]), 7, 0.15, cap=True))

    def kidney(side: int):
        c = np.array([72.0 * side, -18 if side > 0 else -20, -20 if side > 0 else -6])
        rad = (28, 31, 58) if side > 0 else (27.5, 30.5, 57)
        body = _ellipsoid(c, rad, (-15, 12 * side, -20 * side))
        hilum = _ellipsoid(c + np.array([-25.0 * side, 12, 0]), (13, 12, 18))
        return _subtract(body, hilum), c

    def kidney_tissue(f, e, X, Y, Z, case):
        return np.where(f < 0.62, np.uint8(MEDULLA), np.uint8(0))

    rk, c = kidney(+1)
    organs.append(_Organ(RKID, rk, c, 6, 0.07, tissue=kidney_tissue))
    lk, c = kidney(-1)
    organs.append(_Organ(LKID, lk, c, 6, 0.07, tissue=kidney_tissue))

    radr = _union(_ellipsoid((30, 2, 38), (t, 13, 17), (0, 0, 30)),
                  _ellipsoid((35, -8, 31), (t, 10, 14), (0, 0, -20)), k=0.15)
    organs.append(_Organ(RADR, radr, np.array([32.0, -2, 35]), 4, 0.12))
    ladr = _union(_ellipsoid((-42, 6, 33), (t, 13, 18), (0, 0, -25)),
                  _ellipsoid((-48, -4, 26), (t, 10, 14), (0, 0, 20)), k=0.15)
    organs.append(_Organ(LADR, ladr, np.array([-45.0, 2, 30]), 4, 0.12))

    gall = _ellipsoid((62, 58, -8), (15, 18, 30), (-35, 0, 15))
    organs.append(_Organ(GALL, gall, np.array([62.0, 58, -8]), 6, 0.2))

    panc = _sweep([(32, 40, -28), (24, 47, -12), (6, 55, -3), (-24, 50, 5), (-50, 36, 12),
                   (-76, 16, 18)], [15, 13, 10.5, 10.5, 9.5, 8.5], min_r)
    organs.append(_Organ(PANCREAS, panc, np.array([-10.0, 45, 2]), 6, 0.12))

    duod = _sweep([(20, 60, 2), (40, 52, 0), (53, 40, -14), (56, 34, -36), (52, 35, -56),
                   (30, 42, -66), (0, 46, -66), (-22, 46, -56), (-30, 50, -38)],
                  [11, 11.5, 11, 11, 11, 10.5, 10, 10, 9.5], min_r)
    organs.append(_Organ(DUOD, duod, np.array([25.0, 45, -35]), 6, 0.1))

    stomach = _sweep([(-34, 26, 88), (-46, 20, 68), (-52, 44, 40), (-45, 64, 12), (-22, 72, -4),
                      (2, 68, -2), (18, 62, 2)], [14, 29, 30, 26, 22, 17, 12], min_r)
    gas_depth = 0.0 if rng.random() < 0.4 else rng.uniform(5, 35)

    def stomach_tissue(f, e, X, Y, Z, case, _d=gas_depth):
        if _d <= 0:
            return None
        level = case["stomach_top_y"] - _d
        return np.where(Y > level, np.uint8(GAS), np.uint8(0))

    organs.append(_Organ(STOMACH, stomach, np.array([-35.0, 50, 35]), 8, 0.12, cap=True,
                         tissue=stomach_tissue))

    eso = _sweep([(0, -4, 485), (2, -16, 400), (4, -20, 300), (2, -13, 200), (-8, 2, 140),
                  (-22, 16, 106), (-34, 26, 88)], [7.5, 8, 8, 8, 8.5, 9, 10], min_r)
    organs.append(_Organ(ESO, eso, np.array([-10.0, 5, 120]), 3, 0.08, rot_sd=1.0))

    aorta = _sweep([(-8, 16, -125), (-12, 13, -40), (-12, 11, 40), (-17, -2, 120), (-22, -24, 200),
                    (-22, -32, 280), (-14, -18, 328), (2, 12, 342), (12, 36, 318), (12, 42, 262),
                    (6, 36, 222)], [8, 9, 10, 11, 12, 13, 14, 14, 15, 16, 16], min_r)
    organs.append(_Organ(AORTA, aorta, np.array([-12.0, 12, 0]), 4, 0.08, rot_sd=1.0))

    ivc = _sweep([(18, 16, -115), (20, 15, -40), (21, 18, 20), (25, 10, 62), (20, 5, 110),
                  (14, 18, 160)], [10, 11, 12, 12.5, 13, 13], min_r)
    organs.append(_Organ(IVC, ivc, np.array([20.0, 14, 0]), 4, 0.08, rot_sd=1.0))
    return organs


# ----------------------------------------------------------------------------------------------
def _lognormal(rng, sigma):
    return float(np.exp(rng.normal(0, sigma)))


def _choose(rng: np.random.Generator, weights: Mapping[str, float], what: str) -> str:
    names = [k for k, w in weights.items() if w > 0]
    if not names:
        raise FlareInputError(None, f"no {what} has a positive weight: {dict(weights)}")
    w = np.array([weights[k] for k in names], float)
    return names[int(rng.choice(len(names), p=w / w.sum()))]


def _resolve_missing(missing: Iterable[str | int]) -> tuple[str, ...]:
    out = []
    for m in missing:
        try:
            out.append(_organ(m).name)
        except KeyError as e:
            raise FlareInputError(None, f"missing: {e.args[0]}") from None
    return tuple(sorted(set(out), key=lambda n: _organ(n).label))


# ----------------------------------------------------------------------------------------------
def generate_case(seed: int, preset: str | PhantomPreset = "demo", *, fov: str | None = None,
                  missing: Sequence[str | int] | None = None) -> PhantomCase:
    """One synthetic CT case, deterministic in (seed, preset, fov, missing).

    fov: one of FOVS, or None to draw it from preset.fov_weights.
    missing: organs to leave out (names or label ids); None draws them from preset.missing_prob,
    () leaves none out. Organs partly outside the field of view are cut; `present_labels` says
    which labels the label map really holds.
    """
    # One BLAS thread: the small matrix products here gain nothing from threads, which only
    # thrash on a loaded machine, and a fixed summation order keeps results bit-identical.
    with _one_blas_thread():
        return _generate(seed, preset, fov, missing)


@contextlib.contextmanager
def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional (installed with scikit-learn)
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


def _generate(seed, preset, fov, missing) -> PhantomCase:
    p = get_preset(preset)
    if fov is not None and fov not in FOVS:
        raise FlareInputError(None, f"unknown field of view {fov!r} (known: {', '.join(FOVS)})")
    if int(seed) < 0:
        raise FlareInputError(None, f"seed must be >= 0, got {seed}")
    ss = np.random.SeedSequence([int(seed), PHANTOM_VERSION])
    r_par, r_org, r_field, r_noise = (np.random.default_rng(s) for s in ss.spawn(4))

    # --- case parameters -------------------------------------------------------------------
    drawn_fov = _choose(r_par, p.fov_weights, "field of view")  # drawn always: stable streams
    fov = fov or drawn_fov
    if missing is None:
        miss = tuple(n for n, pr in p.missing_prob.items() if r_par.random() < pr)
        missing_t = _resolve_missing(miss)
    else:
        _ = [r_par.random() for _ in p.missing_prob]  # keep the stream aligned
        missing_t = _resolve_missing(missing)
    s = np.array([np.clip(r_par.normal(1, 0.07), 0.85, 1.18), np.clip(r_par.normal(1, 0.08), 0.82, 1.2),
                  np.clip(r_par.normal(1, 0.05), 0.88, 1.12)])
    t_fat = float(np.clip(18.0 * _lognormal(r_par, 0.45), 5, 60))
    t_muscle = float(r_par.uniform(9, 15))
    phase = _choose(r_par, p.contrast_weights, "contrast phase")
    case: dict = dict(phase=phase)

    z_lo_std, z_hi_std, keep_top = _fov_range(fov, r_par)
    z_lo, z_hi = z_lo_std * s[2], z_hi_std * s[2]
    # slice spacing
    lo_dz, hi_dz = p.slice_spacing
    choices = [c for c in p.slice_choices if lo_dz - 1e-9 <= c <= hi_dz + 1e-9]
    dz = float(r_par.choice(choices)) if choices else float(r_par.uniform(lo_dz, hi_dz))
    length = z_hi - z_lo
    if p.n_slices:
        nz = int(p.n_slices)
    else:
        nz = int(round(length / dz)) + 1
        if nz > p.max_slices:
            need = length / (p.max_slices - 1)
            bigger = [c for c in choices if c >= need]
            dz = float(min(bigger)) if bigger else float(min(max(dz, need), hi_dz))
            nz = min(int(round(length / dz)) + 1, p.max_slices)
    nz = max(nz, 2)
    if keep_top and not p.n_slices:
        # a long scan that had to be cropped keeps its top (air above the head), unless that
        # would lose the abdomen (z = -180 mm in the standard frame): then it slides down
        z0 = min(z_hi - (nz - 1) * dz, max(z_lo, -180 * s[2]))
    else:
        z0 = 0.5 * (z_lo + z_hi) - 0.5 * (nz - 1) * dz
    zc = z0 + dz * np.arange(nz)
    # in-plane spacing: fit the widest body part in the scanned range
    zs = zc / s[2]
    half_w = np.interp(zs, _TRUNK[:, 0], _TRUNK[:, 1]) * s[0]
    wall = (np.interp(zs, _WALL[:, 0], _WALL[:, 1]) * t_muscle
            + np.interp(zs, _WALL[:, 0], _WALL[:, 2]) * t_fat)
    half_w = np.where(half_w > 0, half_w + wall, 0)
    legs = np.interp(zs, _LEGS[::-1, 0], _LEGS[::-1, 1])
    half_w = np.maximum(half_w, np.where(legs > 0, (_LEG_X + legs) * s[0] + 0.6 * t_fat, 0))
    head = np.where((zs > 480) & (zs < 710), 80 * s[0] + 5, 0)
    widest = float(max(half_w.max(), head.max(), 60.0))
    nx, ny = p.matrix
    lo_xy, hi_xy = p.inplane_spacing
    dxy = float(np.clip(2 * widest * r_par.uniform(1.06, 1.25) / nx, lo_xy, hi_xy))
    dxy = round(dxy, 4)
    cx = float(r_par.uniform(-12, 12))
    cy = float(r_par.uniform(-15, 10))
    xc = cx + dxy * (np.arange(nx) - (nx - 1) / 2)
    yc = cy + dxy * (np.arange(ny) - (ny - 1) / 2)

    # --- random fields -----------------------------------------------------------------------
    lo_box = np.array([xc[0], yc[0], zc[0]]) - 60
    hi_box = np.array([xc[-1], yc[-1], zc[-1]]) + 60
    deform_sd = float(r_field.uniform(*p.deformation_mm))
    dfields = [_Field(r_field, lo_box, hi_box, 30.0, 1.0) for _ in range(3)]
    texture = _Field(r_field, lo_box, hi_box, max(10.0, 2.0 * dxy), 1.0)
    bowel = _Field(r_field, lo_box, hi_box, 12.0, 1.2)
    gas_field = _Field(r_field, lo_box, hi_box, 20.0, 1.0)
    liver_box = (np.array([-120.0, -120, -150]) * s, np.array([200.0, 160, 180]) * s)
    vessel_fields = (_Field(r_field, *liver_box, 10.0, 1.0), _Field(r_field, *liver_box, 10.0, 1.0),
                     float(r_field.uniform(0.22, 0.32)))
    outline = _Field(r_field, lo_box, hi_box, 40.0, 1.0)

    # --- background anatomy ------------------------------------------------------------------
    shape_zyx = (nz, ny, nx)
    tissue = np.full(shape_zyx, AIR, np.uint8)
    label = np.zeros(shape_zyx, np.uint8)
    geo = dict(x=xc.astype(np.float32), y=yc.astype(np.float32), z=zc.astype(np.float32),
               s=s, t_fat=t_fat, t_muscle=t_muscle, square=float(r_par.uniform(0.05, 0.4)),
               side=float(r_par.uniform(0.95, 1.05)), ant=float(r_par.uniform(0.9, 1.1)),
               outline=outline, bowel=bowel, bowel_width=float(r_par.uniform(0.5, 0.8)),
               gas=gas_field, gas_thr=float(r_par.uniform(0.8, 1.8)),
               bladder=float(r_par.uniform(0.6, 1.3)))
    chunk = max(1, int(2_000_000 // (nx * ny)))
    for k0 in range(0, nz, chunk):
        _background(tissue[k0:k0 + chunk], geo, k0, k0 + chunk)

    # --- organs ---------------------------------------------------------------------------------
    case["vessels"] = vessel_fields
    counts = np.zeros(14, np.int64)
    vox = np.array([dxy, dxy, dz])
    min_r = 0.5 * p.min_thickness_vox * float(vox.max())
    organs = _standard_organs(min_r, r_org)
    org_scale = float(np.clip(r_org.normal(1, 0.05), 0.88, 1.12))
    for o in sorted(organs, key=lambda o: PAINT_ORDER.index(o.label)):
        # draw every organ's variation whether or not it is painted (stable streams)
        jitter = r_org.normal(0, o.pos_sd, 3)
        g = org_scale * _lognormal(r_org, o.size_sd) * np.exp(r_org.normal(0, 0.04, 3))
        rot = _rot(*r_org.normal(0, o.rot_sd, 3))
        if LABELS[o.label].name in missing_t:
            continue
        counts[o.label] = _paint_organ(o, tissue, label, geo, dfields, deform_sd, s, g, jitter, rot,
                                       case, p)

    # --- image -------------------------------------------------------------------------------
    noise_factor = p.noise * float(r_noise.uniform(*p.noise_range))
    voxvol = float(np.prod(vox))
    noise_sd = NOISE_SD_3MM * noise_factor * float(np.clip(math.sqrt(27.0 / voxvol), 0.5, 2.5))
    mean_lut, tex_lut = _hu_tables(phase, r_noise)
    image = _render(tissue, mean_lut, tex_lut, texture, geo, noise_sd, p.blur, r_noise)

    # --- outputs (x, y, z) arrays and orientation ----------------------------------------------
    shift = np.array([r_par.uniform(-30, 30), r_par.uniform(-200, -100), r_par.uniform(-900, 300)])
    affine = np.diag([dxy, dxy, dz, 1.0])
    affine[:3, 3] = np.array([xc[0], yc[0], zc[0]]) + shift
    img_xyz, lab_xyz = image.T, label.T
    spacing = (dxy, dxy, dz)
    if p.axcodes.upper() != "RAS":
        img_xyz, lab_xyz, affine, spacing = _reorient(img_xyz, lab_xyz, affine, p.axcodes.upper())
    present = tuple(int(i) for i in np.nonzero(counts[1:14])[0] + 1)
    meta = dict(phase=phase, noise_sd=round(noise_sd, 2), body_scale=[round(float(v), 3) for v in s],
                fat_mm=round(t_fat, 1), slice_spacing=dz, inplane_spacing=dxy,
                patient_to_world=[round(float(v), 3) for v in shift],
                voxels={LABELS[i].name: int(counts[i]) for i in range(1, 14)})
    return PhantomCase(image=img_xyz, label=lab_xyz, affine=affine,
                       spacing=tuple(float(v) for v in spacing), fov=fov, present_labels=present,
                       seed=int(seed), preset=p.name, missing=missing_t, meta=meta)


def _reorient(img, lab, affine, codes):
    import nibabel.orientations as nio
    if len(codes) != 3:
        raise FlareInputError(None, f"axcodes must have 3 letters, got {codes!r}")
    try:
        target = nio.axcodes2ornt(tuple(codes))
    except Exception as e:  # noqa: BLE001 - nibabel raises several types
        raise FlareInputError(None, f"bad axcodes {codes!r}: {e}") from None
    tr = nio.ornt_transform(nio.axcodes2ornt(("R", "A", "S")), target)
    new_aff = affine @ nio.inv_ornt_aff(tr, img.shape)
    img2 = nio.apply_orientation(img, tr)
    lab2 = nio.apply_orientation(lab, tr)
    zooms = tuple(float(v) for v in np.sqrt((new_aff[:3, :3] ** 2).sum(0)))
    return img2, lab2, new_aff, zooms


# ----------------------------------------------------------------------------------------------
def _span(c: np.ndarray, lo: float, hi: float) -> slice:
    """Index slice of the sorted coordinates c that lie within [lo, hi]."""
    i0 = int(np.searchsorted(c, lo, side="left"))
    i1 = int(np.searchsorted(c, hi, side="right"))
    return slice(i0, max(i0, i1))


def _col(v) -> np.ndarray:
    """Per-slice values as a (n, 1, 1) column (float32, or bool)."""
    v = np.asarray(v)
    v = v if v.dtype == bool else v.astype(np.float32)
    return v.reshape(-1, 1, 1)


def _background(t: np.ndarray, g: dict, k0: int, k1: int) -> None:
    """Body, wall layers, spine, ribs, lungs, heart, bowel, pelvis, legs and head of one z slab.

    Work is restricted to the slices and the in-plane box each structure can occupy.
    """
    s = g["s"]
    z_all = g["z"][k0:k1]
    zs_all = (z_all / s[2]).astype(np.float64)
    a_all = np.interp(zs_all, _TRUNK[:, 0], _TRUNK[:, 1])
    tk = np.nonzero(a_all > 0)[0]
    if len(tk):
        q = slice(int(tk[0]), int(tk[-1]) + 1)
        z, zs, a = z_all[q], zs_all[q], a_all[q]
        ba = np.interp(zs, _TRUNK[:, 0], _TRUNK[:, 2])
        bp = np.interp(zs, _TRUNK[:, 0], _TRUNK[:, 3])
        wm = np.interp(zs, _WALL[:, 0], _WALL[:, 1]) * g["t_muscle"]
        wf = np.interp(zs, _WALL[:, 0], _WALL[:, 2]) * g["t_fat"]
        # slow variation of the outline along z
        wig = g["outline"].sample_grid(np.array([0.0]), np.array([0.0]), z)[:, 0, 0]
        ax = a * s[0] * (1 + 0.03 * wig)
        bya = ba * s[1] * g["ant"] * (1 + 0.03 * wig)
        byp = bp * s[1]
        side = g["side"]
        sk_x, sk_a, sk_p = ax + wm + wf, bya + wm + wf * 1.1, byp + wm * 0.6 + wf * 0.6
        hx = float(sk_x.max()) * max(side, 1 / side) + 1
        ys = _span(g["y"], -float(sk_p.max()) - 1, float(sk_a.max()) + 1)
        xs = _span(g["x"], -hx, hx)
        tb = t[q, ys, xs]
        X = g["x"][xs][None, None, :]
        Y = g["y"][ys][None, :, None]
        right = X > 0
        ant = Y > 0
        sq = np.float32(g["square"])
        X2, Y2 = X * X, Y * Y

        def r2(ex, eya, eyp):
            A = np.where(right, X2 * _col(1 / np.maximum(ex * side, 1e-3) ** 2),
                         X2 * _col(1 / np.maximum(ex / side, 1e-3) ** 2))      # (n, 1, nx)
            B = np.where(ant, Y2 * _col(1 / np.maximum(eya, 1e-3) ** 2),
                         Y2 * _col(1 / np.maximum(eyp, 1e-3) ** 2))            # (n, ny, 1)
            out = A + B
            # squarer corners; clipping keeps points outside the unit box outside
            out -= (sq * np.minimum(A, 1)) * np.minimum(B, 1)
            return out

        rs = r2(sk_x, sk_a, sk_p)
        np.copyto(tb, FAT, where=rs < 1)
        rm = r2(ax + wm, bya + wm, byp + wm * 0.6)
        np.copyto(tb, MUSCLE, where=rm < 1)
        rc = r2(ax, bya, byp)
        cav = rc < 1
        neck = zs > 405
        np.copyto(tb, np.where(_col(neck), np.uint8(SOFT), np.uint8(VFAT)), where=cav)
        zcol = _col(z)
        zd = (_diaphragm(X[0] / s[0], Y[0] / s[1]) * s[2]).astype(np.float32)  # (ny, nx)

        # thorax: lungs above the diaphragm except the mediastinum; heart; trachea
        th = np.nonzero((zs > 20) & (zs < 405))[0]
        if len(th):
            r = slice(int(th[0]), int(th[-1]) + 1)
            med = ((X + 5 * s[0]) / (38 * s[0])) ** 2 + ((Y - 15 * s[1]) / (80 * s[1])) ** 2 < 1
            np.copyto(tb[r], LUNG, where=cav[r] & (zcol[r] > zd + 4) & ~med)
            hz = np.nonzero(np.abs(z[r] - 190 * s[2]) < 58 * s[2])[0]
            if len(hz):
                r2_ = slice(r.start + int(hz[0]), r.start + int(hz[-1]) + 1)
                h = ((X + 22 * s[0]) / (62 * s[0])) ** 2 + ((Y - 32 * s[1]) / (52 * s[1])) ** 2 \
                    + ((zcol[r2_] - 190 * s[2]) / (58 * s[2])) ** 2 < 1
                np.copyto(tb[r2_], BLOOD, where=h & cav[r2_])
        trz = np.nonzero((zs > 280) & (zs < 500))[0]
        if len(trz):
            r = slice(int(trz[0]), int(trz[-1]) + 1)
            ty = np.interp(zs[r], [280, 400, 500], [0, 4, 14]) * s[1]
            trach = (X * X + (Y - _col(ty)) ** 2) < 81
            tr_t = tb[r]
            np.copyto(tr_t, GAS, where=trach & (cav[r] | (tr_t == MUSCLE)))

        # abdomen and pelvis: bowel loops with fluid lumen and gas pockets; bladder
        abz = np.nonzero((zs < 60) & (zs > -340))[0]
        if len(abz):
            r = slice(int(abz[0]), int(abz[-1]) + 1)
            yvb = np.interp(zs[r], _SPINE[:, 0], _SPINE[:, 1]) * s[1]
            # peritoneal cavity: anterior to the retroperitoneum, reaching back in the flanks
            region = cav[r] & (Y > _col(yvb + 25) - np.float32(0.004) * X2) & (zcol[r] < zd - 30 * s[2])
            if region.any():
                # loops: bands around the zero set of a smooth field; lumen in their middle,
                # gas pockets where a second field is high
                xs_, ys_ = g["x"][xs], g["y"][ys]
                bf = np.abs(g["bowel"].sample_grid(xs_, ys_, z[r]))
                w = np.float32(g["bowel_width"])
                loops = region & (bf < w)
                sub = tb[r]
                np.copyto(sub, BOWEL, where=loops)
                np.copyto(sub, LUMEN, where=loops & (bf < w * 0.3))
                gas = g["gas"].sample_grid(xs_, ys_, z[r]) > np.float32(g["gas_thr"])
                np.copyto(sub, GAS, where=loops & (bf < w * 0.6) & gas)
            bs = g["bladder"]
            bz = np.nonzero(np.abs(z[r] - (-260 * s[2] + 20 * bs)) < 38 * s[2] * bs)[0]
            if len(bz):
                rb = slice(r.start + int(bz[0]), r.start + int(bz[-1]) + 1)
                bl = (X / (42 * s[0] * bs)) ** 2 + ((Y - 35 * s[1]) / (36 * s[1] * bs)) ** 2 \
                    + ((zcol[rb] - (-260 * s[2] + 20 * bs)) / (38 * s[2] * bs)) ** 2 < 1
                np.copyto(tb[rb], FLUID, where=bl & cav[rb])

        # ribs in the inner chest wall, costal cartilage towards the front
        rz = np.nonzero((zs > -30) & (zs < 390))[0]
        if len(rz):
            r = slice(int(rz[0]), int(rz[-1]) + 1)
            ring = ((rc[r] >= 0.97) & (rc[r] < _col((1 + 10.0 / np.maximum(ax[r], 1)) ** 2))
                    & (np.abs(X) > 25 * s[0]))
            kk, jj, ii = np.nonzero(ring)
            if len(kk):
                yy = Y[0, jj, 0] / s[1]
                ypost, yant = -bp[r][kk], ba[r][kk]
                sp = np.clip((yy - ypost) / (yant - ypost), 0, 1)
                uz = zs[r][kk] + 130.0 * sp ** 1.2
                idx = np.clip(np.searchsorted(_RIB_Z, uz), 1, len(_RIB_Z) - 1)
                near = np.where(np.abs(uz - _RIB_Z[idx - 1]) < np.abs(uz - _RIB_Z[idx]), idx - 1, idx)
                dist = np.abs(uz - _RIB_Z[near])
                bone_end = np.where(near < 2, 0.6, np.where(near < 5, 0.75, 0.88))  # 0 = 12th rib
                inrib = dist < 6.5
                isb = inrib & (sp <= bone_end)
                isc = inrib & (sp > bone_end) & (near >= 2)
                sub = tb[r]
                sub[kk[isb], jj[isb], ii[isb]] = BONE
                sub[kk[isc], jj[isc], ii[isc]] = CARTILAGE
        # sternum
        stz = np.nonzero((zs > 170) & (zs < 370))[0]
        if len(stz):
            r = slice(int(stz[0]), int(stz[-1]) + 1)
            ster = (X / (18 * s[0])) ** 2 + ((Y - _col(bya[r] + wm[r] * 0.5)) / 7.0) ** 2 < 1
            np.copyto(tb[r], BONE, where=ster)

    X = g["x"][None, None, :]
    Y = g["y"][None, :, None]
    _spine(t, g, z_all, zs_all, X, Y, _col)
    _pelvis_legs_head(t, g, z_all, zs_all, _col)


def _spine(t, g, z, zs, X, Y, col):
    s = g["s"]
    inz = (zs > _SPINE_Z[0]) & (zs < _SPINE_Z[1])
    if not inz.any():
        return
    yv = np.interp(zs, _SPINE[:, 0], _SPINE[:, 1]) * s[1]
    rx = np.interp(zs, _SPINE[:, 0], _SPINE[:, 2]) * s[0]
    ry = np.interp(zs, _SPINE[:, 0], _SPINE[:, 3]) * s[1]
    m = col(inz)
    # sub-box in x and y around the spine
    xi = np.nonzero(np.abs(g["x"]) < 95 * s[0])[0]
    yj = np.nonzero((g["y"] > (yv.min() - 110 * s[1])) & (g["y"] < yv.max() + 30 * s[1]))[0]
    if len(xi) == 0 or len(yj) == 0:
        return
    sl = (slice(None), slice(yj[0], yj[-1] + 1), slice(xi[0], xi[-1] + 1))
    tb = t[sl]
    Xb, Yb = X[:, :, sl[2]], Y[:, sl[1], :]
    canal_y = col(yv - ry - 8 * s[1])
    # paraspinal muscles and psoas
    lumbar = np.interp(zs, [-260, -150, 0, 200, 400, 520], [0.6, 1.1, 1.1, 0.8, 0.7, 0.6])
    pr = col(26 * lumbar * s[0])
    para = (((np.abs(Xb) - col(14 * s[0] + pr[:, 0, 0])) / (pr * 1.2)) ** 2
            + ((Yb - (canal_y - col(22 * s[1]))) / (pr * 0.85)) ** 2 < 1) & m
    np.copyto(tb, MUSCLE, where=para & (tb != AIR) & (tb != FAT))
    ps = np.interp(zs, _PSOAS[::-1, 0], _PSOAS[::-1, 1]) * s[0]
    if (ps > 0).any():
        psc = col(ps)
        pso = (((np.abs(Xb) - (col(rx) + psc * 0.9)) / np.maximum(psc, 1e-3)) ** 2
               + ((Yb - col(yv + 4)) / np.maximum(psc, 1e-3)) ** 2 < 1) & col(ps > 0)
        np.copyto(tb, MUSCLE, where=pso & (tb != AIR) & (tb != FAT))
    # vertebral body: cancellous core, cortical shell and end plates, discs between
    dd = np.abs(zs[:, None] - _DISCS[None, :] * 1.0).min(1) * s[2]
    half_disc = np.where(zs > 380, 2.5, np.where(zs > 34, 3.0, 4.5))
    disc = col(dd < half_disc)
    endpl = col((dd >= half_disc) & (dd < half_disc + 1.5))
    sacrum = col(zs < -145)
    vr = (Xb / col(rx)) ** 2 + ((Yb - col(yv)) / col(ry)) ** 2
    vb = (vr < 1) & m
    np.copyto(tb, CANCELLOUS, where=vb)
    np.copyto(tb, CORTICAL, where=vb & ((vr > 0.72) | endpl))
    np.copyto(tb, DISC, where=vb & disc & ~sacrum)
    # posterior elements: neural arch around the canal, spinous and transverse processes
    cr = (Xb / 8.0) ** 2 + ((Yb - canal_y) / 8.0) ** 2
    arch = (cr < 3.2) & (cr >= 1) & (Yb < col(yv - ry * 0.8)) & m
    spin = ((Xb / 4.5) ** 2 + ((Yb - (canal_y - col(24 * s[1]))) / col(14 * s[1])) ** 2 < 1) & m
    tp_len = np.interp(zs, [-150, -100, 30, 60, 350, 420], [0, 18, 18, 14, 14, 0]) * s[0]
    tp = ((Xb / col(rx + tp_len + 1e-3)) ** 2 + ((Yb - canal_y - 2) / 5.0) ** 2 < 1) & m
    np.copyto(tb, BONE, where=(arch | spin | tp) & ~disc)
    np.copyto(tb, FLUID, where=(cr < 1) & m & ~sacrum)


def _rows(mask: np.ndarray) -> slice | None:
    """Slice from the first to the last True of a 1D mask (None when empty)."""
    idx = np.nonzero(mask)[0]
    return slice(int(idx[0]), int(idx[-1]) + 1) if len(idx) else None


def _pelvis_legs_head(t, g, z, zs, col):
    s = g["s"]
    x, y = g["x"], g["y"]
    # iliac wings (posterolateral arcs inside the pelvic wall)
    r = _rows((zs < -135) & (zs > -250))
    if r is not None:
        a = np.interp(zs[r], _TRUNK[:, 0], _TRUNK[:, 1]) * s[0]
        xs, ys = _span(x, -float(a.max()), float(a.max())), _span(y, -75 * s[1], 15 * s[1])
        X, Y = x[xs][None, None, :], y[ys][None, :, None]
        tb = t[r, ys, xs]
        w = (X / col(np.maximum(a * 0.88, 1))) ** 2 + ((Y + 5 * s[1]) / (80 * s[1])) ** 2
        np.copyto(tb, BONE, where=(w > 0.72) & (w < 0.9) & (tb != AIR) & (tb != FAT))
    # femoral heads
    r = _rows(np.abs(z + 300 * s[2]) < 24 * s[0])
    if r is not None:
        xs, ys = _span(x, -115 * s[0], 115 * s[0]), _span(y, -26 * s[1], 30 * s[1])
        X, Y = x[xs][None, None, :], y[ys][None, :, None]
        fh = ((np.abs(X) - 88 * s[0]) ** 2 + (Y - 2 * s[1]) ** 2
              + (col(z[r]) + 300 * s[2]) ** 2) < (24 * s[0]) ** 2
        np.copyto(t[r, ys, xs], CANCELLOUS, where=fh)
    # pubic rami
    r = _rows((zs < -305) & (zs > -345))
    if r is not None:
        xs, ys = _span(x, -65 * s[0], 65 * s[0]), _span(y, 45 * s[1], 70 * s[1])
        X, Y = x[xs][None, None, :], y[ys][None, :, None]
        pub = ((np.abs(X) - 30 * s[0]) / (32 * s[0])) ** 2 + ((Y - 58 * s[1]) / (9 * s[1])) ** 2 < 1
        np.copyto(t[r, ys, xs], BONE, where=np.broadcast_to(pub, t[r, ys, xs].shape))
    # legs: skin, fat, muscle, long bone with marrow
    lr = np.interp(zs, _LEGS[::-1, 0], _LEGS[::-1, 1])
    r = _rows(lr > 0)
    if r is not None:
        rr_v = lr[r] * s[0] + 0.5 * g["t_fat"]
        ext = float(rr_v.max()) + 2
        xs = _span(x, -(_LEG_X * s[0] + ext), _LEG_X * s[0] + ext)
        ys = _span(y, -5 - ext, -5 + ext)
        X, Y = x[xs][None, None, :], y[ys][None, :, None]
        tb = t[r, ys, xs]
        rr = col(rr_v)
        d2 = (np.abs(X) - _LEG_X * s[0]) ** 2 + (Y + 5) ** 2
        legs = (d2 < rr * rr) & col(lr[r] > 0)
        free = (tb == AIR) | (tb == FAT)
        np.copyto(tb, FAT, where=legs & (tb == AIR))
        rmus = rr - col(0.5 * g["t_fat"] + 3)
        np.copyto(tb, MUSCLE, where=(d2 < rmus * rmus) & legs & free)
        bone_r = col(np.where(zs[r] > -840, 14.0, 12.0))
        bd2 = (np.abs(X) - _LEG_X * s[0] - 3) ** 2 + (Y - 5) ** 2
        lb = col((lr[r] > 0) & (zs[r] < -300))
        np.copyto(tb, CORTICAL, where=(bd2 < bone_r ** 2) & lb)
        np.copyto(tb, MARROW, where=(bd2 < (bone_r - 5) ** 2) & lb)
    # head: scalp, skull, brain, face
    r = _rows((zs > 480) & (zs < 720))
    if r is not None:
        xs = _span(x, -75 * s[0], 75 * s[0])
        ys = _span(y, -86 * s[1], 102 * s[1])
        X, Y = x[xs][None, None, :], y[ys][None, :, None]
        tb = t[r, ys, xs]
        hr = (X / (74 * s[0])) ** 2 + ((Y - 8 * s[1]) / (92 * s[1])) ** 2 \
            + ((col(z[r]) - 600 * s[2]) / (108 * s[2])) ** 2
        np.copyto(tb, FAT, where=hr < 1)
        np.copyto(tb, CORTICAL, where=hr < 0.9)
        upper = col(zs[r] > 555)
        np.copyto(tb, BRAIN, where=(hr < 0.76) & upper)
        np.copyto(tb, SOFT, where=(hr < 0.8) & ~upper)


# ----------------------------------------------------------------------------------------------
def _paint_organ(o: _Organ, tissue, label, g, dfields, deform_sd, s, gscale, jitter, rot, case, p) -> int:
    """Evaluate one organ inside its bounding box, paint it where the cavity is still free.

    Returns the number of voxels painted (they are final: later organs only take free voxels).
    """
    f_std, lo_std, hi_std = o.shape
    S = np.diag(s)
    M = rot @ (S * gscale[None, :])                 # standard offset -> patient offset
    pc = S @ o.centre + jitter                      # patient position of the anchor
    corners = np.array([[lo_std[0], hi_std[0]], [lo_std[1], hi_std[1]], [lo_std[2], hi_std[2]]])
    cc = np.array(np.meshgrid(*corners, indexing="ij")).reshape(3, -1).T - o.centre
    pts = pc + cc @ M.T
    margin = 3.5 * deform_sd + 2
    lo, hi = pts.min(0) - margin, pts.max(0) + margin
    x, y, z = g["x"], g["y"], g["z"]
    ii = np.nonzero((x >= lo[0]) & (x <= hi[0]))[0]
    jj = np.nonzero((y >= lo[1]) & (y <= hi[1]))[0]
    kk = np.nonzero((z >= lo[2]) & (z <= hi[2]))[0]
    if not (len(ii) and len(jj) and len(kk)):
        return 0
    sl = (slice(kk[0], kk[-1] + 1), slice(jj[0], jj[-1] + 1), slice(ii[0], ii[-1] + 1))
    fx, fy, fz = x[sl[2]], y[sl[1]], z[sl[0]]
    # coarse evaluation grid
    h = p.detail_mm

    def coarse(c):
        if len(c) < 3 or (c[1] - c[0]) >= h * 0.99:
            return c, None
        n = max(2, int(math.ceil((c[-1] - c[0]) / h)) + 1)
        cc_ = np.linspace(c[0], c[-1], n).astype(np.float32)
        return cc_, _interp_matrix(c, float(cc_[0]), float(cc_[1] - cc_[0]), n)

    (cx, wx), (cy, wy), (cz, wz) = coarse(fx), coarse(fy), coarse(fz)
    Zc, Yc, Xc = np.meshgrid(cz, cy, cx, indexing="ij")
    # smooth deformation (patient mm)
    D = [f.sample_grid(cx, cy, cz) * np.float32(deform_sd) for f in dfields]
    Px, Py, Pz = Xc + D[0], Yc + D[1], Zc + D[2]
    # to the organ's standard frame
    Mi = np.linalg.inv(M).astype(np.float32)
    dx, dy, dz = Px - np.float32(pc[0]), Py - np.float32(pc[1]), Pz - np.float32(pc[2])
    qx = Mi[0, 0] * dx + Mi[0, 1] * dy + Mi[0, 2] * dz + np.float32(o.centre[0])
    qy = Mi[1, 0] * dx + Mi[1, 1] * dy + Mi[1, 2] * dz + np.float32(o.centre[1])
    qz = Mi[2, 0] * dx + Mi[2, 1] * dy + Mi[2, 2] * dz + np.float32(o.centre[2])
    f = f_std(qx, qy, qz)
    if o.cap:
        zdia = _diaphragm(Px / s[0], Py / s[1]) * s[2]
        f = np.maximum(f, 1 + (Pz - zdia.astype(np.float32)) / np.float32(8.0))
    f = _apply_sep(f.astype(np.float32), wz, wy, wx)
    extra = None
    if o.extra is not None:
        extra = _apply_sep(o.extra(cx, cy, cz, case), wz, wy, wx)
    tb = tissue[sl]
    lb = label[sl]
    allowed = _CAVITY[tb] & (lb == 0)
    m = (f < 1) & allowed
    n = int(np.count_nonzero(m))
    if n == 0:
        # Keep a thin organ whose anchor is well inside the scan visible at coarse resolutions:
        # paint its most interior free voxel. (Organs cut off by the field of view stay absent.)
        inside = z[0] + 10 <= pc[2] <= z[-1] - 10
        cand = np.where(allowed, f, np.inf)
        idx = int(np.argmin(cand))
        if not (inside and np.isfinite(cand.flat[idx]) and cand.flat[idx] < 1.6):
            return 0
        m = np.zeros_like(allowed)
        m.flat[idx] = True
        n = 1
    lb[m] = o.label
    codes = np.full(m.shape, o.label, np.uint8)
    if o.tissue is not None:
        if o.label == STOMACH:
            ys = np.broadcast_to(fy[None, :, None], m.shape)
            case["stomach_top_y"] = float(ys[m].max())
        sub = o.tissue(f, extra, fx[None, None, :], fy[None, :, None], fz[:, None, None], case)
        if sub is not None:
            np.copyto(codes, sub, where=sub > 0)
    tb[m] = codes[m]
    return n


# ----------------------------------------------------------------------------------------------
def _hu_tables(phase: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    mean = np.zeros(_NCODES, np.float32)
    tex = np.zeros(_NCODES, np.float32)
    for code, (m, tx) in _HU_NC.items():
        mean[code] = m
        tex[code] = tx
    scale = float(rng.uniform(0.7, 1.3))
    for code, d in CONTRAST_PHASES[phase].items():
        mean[code] += d * scale
    jitter = rng.normal(0, 4.0, _NCODES).astype(np.float32)
    jitter[[AIR, GAS, LUNG, CORTICAL]] = 0
    mean += jitter
    tex *= np.float32(rng.uniform(0.8, 1.25))
    return mean, tex


# Partial-volume blur kernels: in-plane [1, 2, 1] / 4, across slices [1, 6, 1] / 8.
_BLUR_GAIN = math.sqrt((6 / 16) ** 2 * (38 / 64))  # std of white noise after the blur


def _render(tissue, mean_lut, tex_lut, texture: _Field, g, noise_sd, blur, rng) -> np.ndarray:
    """HU image: tissue means + tissue-scaled smooth texture + noise, partial-volume blur, int16.

    With the blur on, the noise is drawn as the sum of two uniform bytes (triangular, 10x cheaper
    than normal deviates); the 27-tap blur makes it Gaussian to the eye and to first moments.
    """
    nz, ny, nx = tissue.shape
    out = np.empty(tissue.shape, np.float32)
    mz, my, mx = texture.mats(g["x"], g["y"], g["z"])
    sd = noise_sd / _BLUR_GAIN if blur else noise_sd
    chunk = max(1, int(2_000_000 // (nx * ny)))
    for k0 in range(0, nz, chunk):
        k1 = min(nz, k0 + chunk)
        tc = tissue[k0:k1]
        img = out[k0:k1]
        img[...] = mean_lut[tc]
        tx = _apply_sep(texture.grid, mz[k0:k1], my, mx)
        tx *= tex_lut[tc]
        img += tx
        if blur:
            b = np.frombuffer(rng.bytes(2 * img.size), np.uint8).reshape(2, *img.shape)
            noise = b[0].astype(np.float32)
            noise += b[1]
            noise -= np.float32(255.0)
            noise *= np.float32(sd / 104.51)  # std of the sum of two uniform bytes
        else:
            noise = rng.standard_normal(img.shape, dtype=np.float32)
            noise *= np.float32(sd)
        img += noise
        if blur and nx > 2 and ny > 2:
            tmp = img.copy()
            c = img[:, :, 1:-1]
            np.multiply(tmp[:, :, 1:-1], 2, out=c)
            c += tmp[:, :, :-2]
            c += tmp[:, :, 2:]
            c *= 0.25
            tmp[...] = img
            c = img[:, 1:-1, :]
            np.multiply(tmp[:, 1:-1, :], 2, out=c)
            c += tmp[:, :-2, :]
            c += tmp[:, 2:, :]
            c *= 0.25
    res = np.empty(tissue.shape, np.int16)
    for k0 in range(0, nz, chunk):
        k1 = min(nz, k0 + chunk)
        if blur and nz > 2:
            v = out[k0:k1] * np.float32(6 / 8)
            lo, hi = max(k0 - 1, 0), min(k1 + 1, nz)
            prev = out[lo:k1 - 1] if k0 > 0 else np.concatenate([out[:1], out[k0:k1 - 1]])
            nxt = out[k0 + 1:hi] if k1 < nz else np.concatenate([out[k0 + 1:k1], out[nz - 1:nz]])
            v += prev * np.float32(1 / 8)
            v += nxt * np.float32(1 / 8)
        else:
            v = out[k0:k1].copy()
        np.rint(v, out=v)
        np.clip(v, -1024, 3071, out=v)
        res[k0:k1] = v
    return res


# ----------------------------------------------------------------------------------------------
# Cohorts in the FLARE22 folder layout.

LABELLED_DIR = "Training/FLARE22_LabeledCase50"
UNLABELLED_DIR = "Training/FLARE22_UnlabeledCase"
VALIDATION_DIR = "Validation"
TRUTH_DIR = "SyntheticTruth/unlabelled_labels"
_SPLITS = {"labelled": 1, "unlabelled": 2, "validation": 3}


def case_seed(cohort_seed: int, split: str, index: int) -> int:
    """Seed of case `index` (1-based) of a split; independent of how many cases the cohort has."""
    st = np.random.SeedSequence([int(cohort_seed), _SPLITS[split], int(index)]).generate_state(1)
    return int(st[0] & 0x7FFFFFFF)


def _case_paths(split: str, i: int) -> tuple[str, str | None, str]:
    if split == "labelled":
        cid = f"FLARE22_Tr_{i:04d}"
        return f"{LABELLED_DIR}/images/{cid}_0000.nii.gz", f"{LABELLED_DIR}/labels/{cid}.nii.gz", cid
    if split == "validation":
        cid = f"FLARE22_Ts_{i:04d}"
        return f"{VALIDATION_DIR}/images/{cid}_0000.nii.gz", f"{VALIDATION_DIR}/labels/{cid}.nii.gz", cid
    cid = f"Case_{i:05d}"
    return f"{UNLABELLED_DIR}/{cid}_0000.nii.gz", f"{TRUTH_DIR}/{cid}.nii.gz", cid


@dataclass
class CohortInfo:
    """What write_cohort made (the content of cohort.json, with the root)."""
    root: Path
    seed: int
    preset: str
    n_labelled: int
    n_unlabelled: int
    n_validation: int
    cases: list[dict]
    request: dict = field(default_factory=dict)

    def split(self, name: str) -> list[dict]:
        return [c for c in self.cases if c["split"] == name]

    def paths(self, split: str, what: str = "image") -> list[Path]:
        return [self.root / c[what] for c in self.split(split) if c.get(what)]

    @property
    def labelled_images(self) -> list[Path]:
        return self.paths("labelled", "image")

    @property
    def labelled_labels(self) -> list[Path]:
        return self.paths("labelled", "label")

    @property
    def unlabelled_images(self) -> list[Path]:
        return self.paths("unlabelled", "image")

    @property
    def validation_images(self) -> list[Path]:
        return self.paths("validation", "image")

    @classmethod
    def load(cls, root: str | Path) -> "CohortInfo":
        root = Path(root)
        path = root / "cohort.json"
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise FlareInputError(path, f"cannot read cohort description ({e})") from e
        req = d["request"]
        return cls(root=root, seed=req["seed"], preset=req["preset"]["name"],
                   n_labelled=req["n_labelled"], n_unlabelled=req["n_unlabelled"],
                   n_validation=req["n_validation"], cases=d["cases"], request=req)


def _normalise_fov_mix(fov_mix) -> dict[str, dict[str, float]] | None:
    if fov_mix is None:
        return None
    if isinstance(fov_mix, str):
        fov_mix = {fov_mix: 1.0}
    fov_mix = dict(fov_mix)
    if set(fov_mix) <= set(_SPLITS) and all(isinstance(v, (Mapping, str)) for v in fov_mix.values()):
        out = {k: ({v: 1.0} if isinstance(v, str) else {a: float(b) for a, b in v.items()})
               for k, v in fov_mix.items()}
    else:
        out = {k: {a: float(b) for a, b in fov_mix.items()} for k in _SPLITS}
    for mix in out.values():
        bad = set(mix) - set(FOVS)
        if bad:
            raise FlareInputError(None, f"fov_mix: unknown field(s) of view {sorted(bad)} "
                                        f"(known: {', '.join(FOVS)})")
    return out


def _write_one(job: tuple) -> dict:
    tmp, split, i, seed, preset_d = job
    preset = PhantomPreset.from_dict(preset_d)
    img_rel, lab_rel, cid = _case_paths(split, i)
    c = generate_case(seed, preset)
    save_nifti(c.image, c.affine, Path(tmp) / img_rel)
    save_nifti(c.label, c.affine, Path(tmp) / lab_rel)
    return dict(case_id=cid, split=split, index=i, seed=seed, fov=c.fov,
                spacing=[round(v, 4) for v in c.spacing], shape=list(c.shape),
                missing=list(c.missing), present_labels=list(c.present_labels),
                phase=c.meta["phase"], image=img_rel,
                label=lab_rel if split != "unlabelled" else None,
                truth=lab_rel if split == "unlabelled" else None)


def write_cohort(root: str | Path, n_labelled: int, n_unlabelled: int, n_validation: int, *,
                 seed: int = 0, preset: str | PhantomPreset = "demo",
                 fov_mix: Mapping | str | None = None, processes: int = 1,
                 overwrite: bool = False) -> CohortInfo:
    """Write a synthetic cohort in the FLARE22 folder layout, atomically.

    root/Training/FLARE22_LabeledCase50/{images,labels}, root/Training/FLARE22_UnlabeledCase,
    root/Validation/{images,labels}, root/SyntheticTruth/unlabelled_labels (ground truth of the
    "unlabelled" cases) and root/cohort.json. Case seeds derive from (seed, split, index), so
    more unlabelled cases leave the existing ones unchanged.

    fov_mix: field-of-view weights for all splits ({"abdomen": 1, "whole_body": 0.2}), or per
    split ({"labelled": {...}, "unlabelled": {...}}), or one FOV name; None = the preset's.
    A complete root written by the same request is reused as is; a different one is an error
    unless overwrite=True. Nothing is left behind if writing fails.
    """
    root = Path(root)
    p = get_preset(preset)
    for n, v in (("n_labelled", n_labelled), ("n_unlabelled", n_unlabelled), ("n_validation", n_validation)):
        if int(v) < 0:
            raise FlareInputError(None, f"{n} must be >= 0, got {v}")
    mix = _normalise_fov_mix(fov_mix)
    request = dict(version=PHANTOM_VERSION, seed=int(seed), preset=p.to_dict(),
                   n_labelled=int(n_labelled), n_unlabelled=int(n_unlabelled),
                   n_validation=int(n_validation), fov_mix=mix)
    request = json.loads(json.dumps(request))
    if root.exists():
        meta = root / "cohort.json"
        if meta.exists() and not overwrite:
            info = CohortInfo.load(root)
            if info.request != request:
                diff = sorted(k for k in request if info.request.get(k) != request.get(k))
                raise FlareInputError(root, "holds a synthetic cohort made with a different request "
                                            f"(differs in: {', '.join(diff)}); pass overwrite=True "
                                            "to regenerate it or choose another folder")
            missing_files = [c[w] for c in info.cases for w in ("image", "label", "truth")
                             if c.get(w) and not (root / c[w]).exists()]
            if missing_files:
                raise FlareInputError(root, f"cohort is incomplete ({len(missing_files)} files missing, "
                                            f"e.g. {missing_files[0]}); pass overwrite=True (command line: --overwrite) to regenerate")
            return info
        if not meta.exists() and any(root.iterdir()) and not overwrite:
            raise FlareInputError(root, "exists and is not a synthetic cohort (no cohort.json); "
                                        "pass overwrite=True (command line: --overwrite) to replace it or choose another folder")
    jobs_spec = []
    for split, n in (("labelled", n_labelled), ("unlabelled", n_unlabelled), ("validation", n_validation)):
        sp = p if not mix or split not in mix else dataclasses.replace(p, fov_weights=mix[split])
        for i in range(1, int(n) + 1):
            jobs_spec.append((split, i, case_seed(seed, split, i), sp.to_dict()))
    with atomic_directory(root, overwrite=True) as tmp:
        for sub in (f"{LABELLED_DIR}/images", f"{LABELLED_DIR}/labels", UNLABELLED_DIR,
                    f"{VALIDATION_DIR}/images", f"{VALIDATION_DIR}/labels", TRUTH_DIR):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        jobs = [(str(tmp), *j) for j in jobs_spec]
        cases = map_processes(_write_one, jobs, processes)
        doc = dict(generator="flare_utils.synthetic.phantom", calibration=CALIBRATION_SOURCE,
                   orientation=p.axcodes, request=request, cases=cases)
        (tmp / "cohort.json").write_text(json.dumps(doc, indent=1))
    return CohortInfo.load(root)
