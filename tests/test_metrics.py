"""flare_utils.evaluation.metrics / evaluation against DeepMind's surface_distance and the official FLARE22 rules.

The reference side of every comparison is `official_reference` below: an independent loop that
follows FLARE22_DSC_NSD_Eval.py line by line on the `surface_distance` package.
"""
from __future__ import annotations

import json
import math
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

import surface_distance as sd
import surface_distance.metrics as sd_metrics
from surface_distance import lookup_tables

from flare_utils.evaluation import metrics as M
from flare_utils.errors import FlareInputError
from flare_utils.evaluation.evaluate import CSV_NAME, SUMMARY_NAME, evaluate_folders
from flare_utils.data.labels import LABELS, ORGANS, label_for
from flare_utils.evaluation.metrics import OrganScore, evaluate_case, evaluate_files


class _NumpyWithOldAliases:
    """surface_distance 0.1 uses np.Inf / np.NaN, removed in numpy 2: give them back to it only."""

    def __getattr__(self, name):
        if name == "Inf":
            return np.inf
        if name == "NaN":
            return np.nan
        return getattr(np, name)


sd_metrics.np = _NumpyWithOldAliases()

# surface_distance 0.1 calls the deprecated scipy.ndimage.filters / .morphology namespaces.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

NSD_ATOL = 1e-6
HD_RTOL = 1e-6


# ------------------------------------------------------------------------------------------
# Independent reference: the official FLARE22 script's per-organ loop on surface_distance
# ------------------------------------------------------------------------------------------

def official_reference(pred, gt, spacing, *, exact_cut=True, hd95=False):
    """{label: (dsc, nsd_2022, nsd_2024, hd95)} following FLARE22_DSC_NSD_Eval.py."""
    out = {}
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        for organ in ORGANS:
            i = organ.label
            hd = None
            if np.sum(gt == i) == 0 and np.sum(pred == i) == 0:
                dsc = nsd = nsd24 = 1
                hd = math.nan
            elif np.sum(gt == i) == 0 and np.sum(pred == i) > 0:
                dsc = nsd = nsd24 = 0
                hd = math.inf
            else:
                if i == 5 or i == 6 or i == 10:
                    z_index = np.where(gt == i)[2]
                    z_lower, z_upper = np.min(z_index), np.max(z_index)
                    if not exact_cut:
                        z_upper = z_upper + 1
                    g, p = gt[:, :, z_lower:z_upper] == i, pred[:, :, z_lower:z_upper] == i
                else:
                    g, p = gt == i, pred == i
                if g.size == 0:
                    # single-slice gt under the official cut: the official script raises
                    # (zero-size array in _compute_bounding_box); we document NaN for it.
                    out[i] = (math.nan, math.nan, math.nan, math.nan if hd95 else None)
                    continue
                surface_distances = sd.compute_surface_distances(g, p, spacing)
                dsc = sd.compute_dice_coefficient(g, p)
                nsd = sd.compute_surface_dice_at_tolerance(surface_distances, organ.nsd_tolerance_mm)
                nsd24 = 0 if dsc < 0.2 else nsd  # the 2024 revision
                if hd95:
                    if not g.any() and not p.any():
                        hd = math.nan  # our documented convention (DeepMind: inf)
                    else:
                        hd = sd.compute_robust_hausdorff(surface_distances, 95)
            out[i] = (float(dsc), float(nsd), float(nsd24), hd)
    return out


def assert_matches_reference(pred, gt, spacing, *, exact_cut=True, hd95=False, ref=None):
    ref = ref or official_reference(pred, gt, spacing, exact_cut=exact_cut, hd95=hd95)
    for revision in ("2022", "2024"):
        ours = evaluate_case(pred, gt, spacing, revision=revision, hd95=hd95,
                             exact_official_zcut=exact_cut)
        assert list(ours) == list(range(1, 14))
        for lab, (dsc, nsd22, nsd24, hd) in ref.items():
            s = ours[lab]
            assert s.revision == revision
            if revision == "2024" and np.any(gt == lab) and not np.any(pred == lab):
                # FLARE24 scores an empty prediction 0 before its z-cut (FLARE22 cuts first)
                dsc, nsd24, hd = 0.0, 0.0, (math.inf if hd95 else None)
            want_nsd = nsd22 if revision == "2022" else nsd24
            np.testing.assert_allclose(s.dsc, dsc, atol=1e-12, equal_nan=True,
                                       err_msg=f"DSC label {lab} rev {revision}")
            np.testing.assert_allclose(s.nsd, want_nsd, atol=NSD_ATOL, rtol=0, equal_nan=True,
                                       err_msg=f"NSD label {lab} rev {revision}")
            if hd95:
                if math.isnan(hd) or math.isinf(hd):
                    assert (math.isnan(s.hd95) and math.isnan(hd)) or s.hd95 == hd, (lab, s.hd95, hd)
                else:
                    np.testing.assert_allclose(s.hd95, hd, rtol=HD_RTOL, err_msg=f"HD95 label {lab}")
            else:
                assert s.hd95 is None
    return ref


def same_scores(a, b):
    """Equality of two {label: OrganScore} dicts where NaN equals NaN."""
    def key(s):
        return tuple("nan" if isinstance(v, float) and math.isnan(v) else v
                     for v in (s.dsc, s.nsd, s.hd95, s.revision))
    return list(a) == list(b) and all(key(a[k]) == key(b[k]) for k in a)


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------

def test_neighbour_codes_equal_deepmind_correlation():
    rng = np.random.default_rng(0)
    m = rng.random((7, 9, 6)) > 0.5
    padded = np.zeros(tuple(s + 1 for s in m.shape), np.uint8)
    padded[:-1, :-1, :-1] = m  # DeepMind's _crop_to_bounding_box layout
    ref = ndimage.correlate(padded, lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL, mode="constant", cval=0)
    ours = M.neighbour_codes(m)
    # ours carries one more leading zero corner per axis (padding on both sides): same codes.
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 0.9, 3.0),
                                     tuple(float(np.float32(x)) for x in (0.7, 0.8, 2.5))])
def test_surface_area_table_bit_identical(spacing):
    ref = lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
    np.testing.assert_array_equal(M.surface_area_table(spacing), ref)


def test_edt_relative_error_far_below_tie_window():
    import edt
    rng = np.random.default_rng(1)
    worst = 0.0
    for spacing in [(0.7, 0.9, 3.0), (0.3, 0.45, 0.6), (0.8000000119, 0.8000000119, 5.0)]:
        a = rng.random((40, 50, 30)) > 0.003
        ours = edt.edtsq(a, anisotropy=spacing, black_border=False).astype(np.float64)
        ref = ndimage.distance_transform_edt(a, sampling=spacing) ** 2
        pos = ref > 0
        worst = max(worst, float(np.max(np.abs(ours[pos] - ref[pos]) / ref[pos])))
        assert np.all(ours[~pos] == 0)
    assert worst < M._TIE_WINDOW / 50, worst


# ------------------------------------------------------------------------------------------
# Binary masks: random blobs, exact ties
# ------------------------------------------------------------------------------------------

def _blob(rng, shape, n, radius):
    seeds = rng.random(shape) < n / np.prod(shape)
    return ndimage.binary_dilation(seeds, iterations=radius)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 0.9, 3.0), (0.5, 0.5, 0.5),
                                     (0.2, 0.7, 1 / 3), (1.5, 0.6, 0.8)])
def test_random_blobs_match_surface_distance(spacing):
    rng = np.random.default_rng(hash(spacing) % 2**32)
    for t in range(6):
        shape = tuple(int(x) for x in rng.integers(12, 30, size=3))
        gt = _blob(rng, shape, 4, 2)
        pred = _blob(rng, shape, 3, 2) | (np.roll(gt, 1, axis=t % 3) if t % 2 else gt)
        if t == 3:
            pred = ndimage.binary_erosion(pred)
        if not gt.any() or not pred.any():
            continue
        ref_sd = sd.compute_surface_distances(gt, pred, spacing)
        for tol in (1.0, 2.0, 3.0, 5.0, 7.0):
            assert M.surface_dice(gt, pred, spacing, tol) == pytest.approx(
                sd.compute_surface_dice_at_tolerance(ref_sd, tol), abs=NSD_ATOL)
        assert M.robust_hausdorff(gt, pred, spacing) == pytest.approx(
            sd.compute_robust_hausdorff(ref_sd, 95), rel=HD_RTOL)
        for pct in (50, 100):
            assert M.robust_hausdorff(gt, pred, spacing, pct) == pytest.approx(
                sd.compute_robust_hausdorff(ref_sd, pct), rel=HD_RTOL)


# (spacing along the gap axis, tolerance, gap in voxels): the reference distance gap*spacing is
# exactly the tolerance in float64 while the float32 EDT gives tolerance**2 + a few ulps.
FLIP_CASES = [(0.2, 2.0, 10), (0.15, 3.0, 20), (1 / 3, 7.0, 21), (1 / 7, 2.0, 14)]
# ties that are exact in both precisions
EXACT_TIES = [(1.0, 2.0, 2), (0.5, 5.0, 10), (0.6, 3.0, 5)]


def _gap_boxes(gap, axis=2, n=6):
    shape = [8, 8, 8]
    shape[axis] = 2 * n + gap + 2
    gt = np.zeros(shape, bool)
    pred = np.zeros(shape, bool)
    lo = [slice(2, 6)] * 3
    hi = [slice(2, 6)] * 3
    lo[axis] = slice(1, 1 + n)
    hi[axis] = slice(1 + n + gap, 1 + 2 * n + gap)
    gt[tuple(lo)] = True
    pred[tuple(hi)] = True
    return gt, pred


@pytest.mark.parametrize("s,tol,gap", FLIP_CASES + EXACT_TIES)
def test_exact_ties_decided_like_float64_reference(s, tol, gap, monkeypatch):
    for axis in range(3):
        spacing = [0.9, 1.3, 0.8]
        spacing[axis] = s
        spacing = tuple(spacing)
        gt, pred = _gap_boxes(gap, axis)
        ref = sd.compute_surface_dice_at_tolerance(sd.compute_surface_distances(gt, pred, spacing), tol)
        assert M.surface_dice(gt, pred, spacing, tol) == pytest.approx(ref, abs=1e-12)
    if (s, tol, gap) in FLIP_CASES:
        assert ref > 0  # the tie surfels count in the reference ...
        monkeypatch.setattr(M, "_TIE_WINDOW", 0.0)
        M._tie_offsets.cache_clear()
        naive = M.surface_dice(gt, pred, spacing, tol)
        assert naive < ref - 1e-3  # ... and a plain float32 comparison would drop them
        M._tie_offsets.cache_clear()


def test_flip_case_through_evaluate_case():
    # gallbladder (tol 2 mm) and duodenum (tol 7 mm) at spacings where float32 would flip ties
    gt = np.zeros((10, 44, 50), np.uint8)
    pred = np.zeros_like(gt)
    gt[2:8, 2:8, 2:20] = 9
    pred[2:8, 2:8, 30:40] = 9       # 10 voxels (2.0 mm at 0.2 mm) after the gt ends ...
    pred[2:8, 2:8, 2:6] = 9         # ... plus some overlap
    gt[2:8, 5:15, 42:48] = 12
    pred[2:8, 36:40, 42:48] = 12    # 21 voxels (7.0 mm at 1/3 mm) after the gt ends
    pred[2:8, 5:9, 42:48] = 12
    spacing = (1.1, 1 / 3, 0.2)
    ref = assert_matches_reference(pred, gt, spacing)
    assert 0 < ref[9][1] < 1 and 0 < ref[12][1] < 1
    M._tie_offsets.cache_clear()


# ------------------------------------------------------------------------------------------
# Official per-organ rules on synthetic label maps
# ------------------------------------------------------------------------------------------

def _synthetic_case():
    gt = np.zeros((30, 28, 26), np.uint8)
    pred = np.zeros_like(gt)
    gt[0:8, 0:7, 0:6] = 1            # liver touching three array borders
    pred[0:9, 0:7, 0:5] = 1
    gt[20:30, 20:28, 18:26] = 2      # right kidney touching the far borders
    pred[21:30, 19:28, 18:26] = 2
    gt[15, 3, 4] = 3                 # one-voxel spleen, predicted one voxel off
    pred[15, 4, 4] = 3
    gt[10, 10, 10] = 4               # one-voxel pancreas, predicted exactly
    pred[10, 10, 10] = 4
    gt[12:15, 12:15, 5:15] = 5       # aorta: prediction runs beyond the gt z-range
    pred[12:15, 12:16, 2:20] = 5
    gt[17:19, 12:14, 8:9] = 6        # IVC in a single slice: official cut is empty -> NaN
    pred[17:19, 12:14, 8:10] = 6
    gt[4:6, 20:22, 3:12] = 10        # esophagus predicted only outside the gt z-range
    pred[4:6, 20:22, 14:20] = 10
    pred[25:27, 2:4, 2:4] = 7        # right adrenal: false positive (gt empty)
    gt[8:12, 22:26, 20:24] = 8       # left adrenal: missed (prediction empty)
    gt[2:6, 14:18, 14:20] = 11       # stomach: poor overlap (DSC < 0.2 -> 2024 NSD = 0)
    pred[5:9, 16:20, 18:24] = 11
    # gallbladder (9), duodenum (12), left kidney (13): absent in both
    return pred, gt


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 0.9, 3.0), (2.5, 0.6, 0.8)])
@pytest.mark.parametrize("exact_cut", [True, False])
def test_official_rules_synthetic(spacing, exact_cut):
    pred, gt = _synthetic_case()
    ref = assert_matches_reference(pred, gt, spacing, exact_cut=exact_cut, hd95=True)
    assert ref[9][:3] == (1.0, 1.0, 1.0)
    assert ref[7][:3] == (0.0, 0.0, 0.0)
    assert ref[8][:3] == (0.0, 0.0, 0.0)
    assert ref[4][:3] == (1.0, 1.0, 1.0)
    ours = evaluate_case(pred, gt, spacing, hd95=True, exact_official_zcut=exact_cut)
    assert ours[9].hd95 != ours[9].hd95      # both empty: NaN
    assert ours[7].hd95 == math.inf and ours[8].hd95 == math.inf
    assert ours[10].dsc == 0.0 and ours[10].nsd == 0.0
    if exact_cut:   # the official slice drops the last gt slice: a single-slice gt vanishes
        assert math.isnan(ours[6].dsc) and math.isnan(ours[6].nsd) and math.isnan(ours[6].hd95)
    else:
        assert ours[6].dsc == pytest.approx(2 * 4 / (4 + 4))
    dsc_st = ours[11].dsc
    assert dsc_st < 0.2
    assert evaluate_case(pred, gt, spacing, revision="2024")[11].nsd == 0.0
    assert evaluate_case(pred, gt, spacing, revision="2022")[11].nsd > 0.0


def test_zcut_option_changes_only_zcut_organs():
    pred, gt = _synthetic_case()
    a = evaluate_case(pred, gt, (1, 1, 1), exact_official_zcut=True)
    b = evaluate_case(pred, gt, (1, 1, 1), exact_official_zcut=False)
    assert same_scores({k: v for k, v in a.items() if k not in (5, 6, 10)},
                       {k: v for k, v in b.items() if k not in (5, 6, 10)})
    assert math.isnan(a[6].dsc) and b[6].dsc == 1.0  # 2x2x1 gt vs 2x2x2 pred cut to 1 slice


@pytest.mark.parametrize("lab", [5, 6, 10])
def test_2024_empty_prediction_scores_zero_before_zcut(lab):
    # Ground truth of a z-cut organ in a single slice, nothing predicted. FLARE24 checks for
    # an empty prediction before cutting: DSC = NSD = 0. FLARE22 cuts first and fails (NaN).
    gt = np.zeros((12, 12, 9), np.uint8)
    pred = np.zeros_like(gt)
    gt[3:7, 4:8, 5] = lab
    gt[1:4, 1:4, 1:4] = 1                      # another organ, predicted, is unaffected
    pred[1:4, 1:4, 1:5] = 1
    for hd95 in (False, True):
        s24 = evaluate_case(pred, gt, (0.8, 0.8, 2.5), revision="2024", hd95=hd95)
        assert (s24[lab].dsc, s24[lab].nsd) == (0.0, 0.0)
        assert s24[lab].hd95 == (math.inf if hd95 else None)
        s22 = evaluate_case(pred, gt, (0.8, 0.8, 2.5), revision="2022", hd95=hd95)
        assert math.isnan(s22[lab].dsc) and math.isnan(s22[lab].nsd)
        assert s22[1].dsc == s24[1].dsc > 0.5
    # without the official slice the organ survives the cut: 0 in both revisions
    for revision in ("2022", "2024"):
        s = evaluate_case(pred, gt, (0.8, 0.8, 2.5), revision=revision, exact_official_zcut=False)
        assert (s[lab].dsc, s[lab].nsd) == (0.0, 0.0)
    # a non-empty prediction of a single-slice gt still has no official value in either revision
    pred[3:7, 4:8, 5:7] = lab
    for revision in ("2022", "2024"):
        s = evaluate_case(pred, gt, (0.8, 0.8, 2.5), revision=revision)
        assert math.isnan(s[lab].dsc) and math.isnan(s[lab].nsd)


class _OfficialScriptFails(Exception):
    pass


def flare_order_oracle(pred, gt, spacing, year):
    """{label: (dsc, nsd) or None where the official script raises}: the per-organ order of
    FLARE22_DSC_NSD_Eval.py (year 2022) and FLARE24/T2andT3_FLARE24_DSC_NSD_Eval.py (year 2024)
    of github.com/JunMa11/FLARE, on DeepMind's surface_distance (our own transcription)."""
    out = {}
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        for organ in ORGANS:
            i, tol = organ.label, organ.nsd_tolerance_mm
            n_gt, n_pred = np.sum(gt == i), np.sum(pred == i)
            if n_gt == 0 and n_pred == 0:
                out[i] = (1.0, 1.0)
                continue
            if n_gt == 0:
                out[i] = (0.0, 0.0)
                continue
            if year == 2024 and n_pred == 0:
                out[i] = (0.0, 0.0)
                continue
            if i in (5, 6, 10):
                z = np.where(gt == i)[2]
                g, p = gt[:, :, z.min():z.max()] == i, pred[:, :, z.min():z.max()] == i
            else:
                g, p = gt == i, pred == i
            try:
                dsc = sd.compute_dice_coefficient(g, p)
                if year == 2024 and dsc < 0.2:      # NaN < 0.2 is False: goes on and fails
                    nsd = 0.0
                else:
                    dist = sd.compute_surface_distances(g, p, spacing)
                    nsd = sd.compute_surface_dice_at_tolerance(dist, tol)
            except ValueError:                       # zero-size array (single-slice gt, cut)
                out[i] = None
                continue
            out[i] = (float(dsc), float(nsd))
    return out


def _random_label_maps(rng, shape=(10, 9, 8)):
    gt = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    for lab in rng.permutation(np.arange(1, 14))[: int(rng.integers(4, 10))]:
        lo = rng.integers(0, np.array(shape) - 1)
        size = rng.integers(1, 5, size=3)
        if lab in (5, 6, 10) and rng.random() < 0.5:
            size[2] = 1                               # single-slice tubular organ
        hi = np.minimum(lo + size, shape)
        gt[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = lab
        mode = rng.choice(["empty", "shift", "same", "elsewhere"], p=[0.3, 0.4, 0.15, 0.15])
        if mode == "empty":
            continue
        if mode == "elsewhere":
            lo = rng.integers(0, np.array(shape) - 1)
            hi = np.minimum(lo + rng.integers(1, 4, size=3), shape)
        elif mode == "shift":
            d = rng.integers(-1, 2, size=3)
            lo, hi = np.clip(lo + d, 0, shape), np.clip(hi + d + rng.integers(0, 2, size=3), 0, shape)
        pred[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = lab
    if rng.random() < 0.5:                            # a false positive of an absent organ
        absent = [x for x in range(1, 14) if not np.any(gt == x)]
        if absent:
            pred[0:2, 0:2, 0:2] = absent[int(rng.integers(len(absent)))]
    return pred, gt


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.3, 2.5)])
def test_random_maps_match_official_order_oracle(spacing):
    rng = np.random.default_rng(2024)
    seen = {"empty_pred_one_slice": 0, "official_fails": 0, "dsc_below_cut": 0}
    for _ in range(25):
        pred, gt = _random_label_maps(rng)
        for year in (2022, 2024):
            ref = flare_order_oracle(pred, gt, spacing, year)
            ours = evaluate_case(pred, gt, spacing, revision=str(year))
            for lab, want in ref.items():
                s = ours[lab]
                if want is None:                      # official script raises: we give NaN
                    assert math.isnan(s.dsc) and math.isnan(s.nsd), (year, lab, s)
                    seen["official_fails"] += 1
                    continue
                np.testing.assert_allclose(s.dsc, want[0], atol=1e-12, rtol=0,
                                           err_msg=f"DSC {year} label {lab}")
                np.testing.assert_allclose(s.nsd, want[1], atol=NSD_ATOL, rtol=0,
                                           err_msg=f"NSD {year} label {lab}")
                if year == 2024 and want[0] < 0.2:
                    seen["dsc_below_cut"] += 1
            for lab in (5, 6, 10):
                z = np.where(gt == lab)[2]
                if year == 2024 and z.size and z.min() == z.max() and not np.any(pred == lab):
                    seen["empty_pred_one_slice"] += 1
                    assert ref[lab] == (0.0, 0.0) and (ours[lab].dsc, ours[lab].nsd) == (0.0, 0.0)
    assert all(n > 0 for n in seen.values()), seen   # the corner cases were exercised


def test_labels_subset_and_input_checks():
    pred, gt = _synthetic_case()
    res = evaluate_case(pred, gt, (1, 1, 1), labels=[5, 2])
    assert list(res) == [5, 2] and isinstance(res[5], OrganScore)
    full = evaluate_case(pred.astype(np.int64), gt.astype(np.float64), (1, 1, 1))
    assert full[5] == res[5]
    with pytest.raises(FlareInputError, match="revision"):
        evaluate_case(pred, gt, (1, 1, 1), revision="2023")
    with pytest.raises(FlareInputError, match="label"):
        evaluate_case(pred, gt, (1, 1, 1), labels=[14])
    with pytest.raises(FlareInputError, match="label"):
        evaluate_case(pred, gt, (1, 1, 1), labels=["liver"])
    with pytest.raises(FlareInputError, match="shape"):
        evaluate_case(pred[:-1], gt, (1, 1, 1))
    with pytest.raises(FlareInputError, match="spacing"):
        evaluate_case(pred, gt, (1, 1))
    with pytest.raises(FlareInputError, match="non-integer"):
        evaluate_case(pred + 0.5, gt, (1, 1, 1))


def test_labels_outside_table_are_ignored():
    pred, gt = _synthetic_case()
    noisy = pred.copy()
    noisy[0, 27, 0] = 200  # not a FLARE22 label: the official loop never looks at it
    assert same_scores(evaluate_case(noisy, gt, (1, 1, 1)), evaluate_case(pred, gt, (1, 1, 1)))


# ------------------------------------------------------------------------------------------
# Real organ masks
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_masks(real_ct):
    masks = {}
    for f in sorted((real_ct / "masks").glob("*.nii.gz")):
        lab = label_for(f.name)
        if lab is not None:
            masks[lab] = np.asarray(nib.load(str(f)).dataobj) > 0
    assert set(masks) == set(range(1, 14))
    return masks


def _compose(masks, shape):
    out = np.zeros(shape, np.uint8)
    for lab in sorted(masks):
        out[masks[lab]] = lab
    return out


def _perturb(masks, rng, mode):
    out = {}
    for lab, m in masks.items():
        op = mode if mode != "mixed" else rng.choice(["shift", "erode", "dilate", "same", "noise"])
        if op == "shift":
            m = np.roll(m, tuple(int(x) for x in rng.integers(-2, 3, size=3)), axis=(0, 1, 2))
        elif op == "erode":
            m = ndimage.binary_erosion(m)
        elif op == "dilate":
            m = ndimage.binary_dilation(m)
        elif op == "noise":
            m = m ^ (ndimage.binary_dilation(m) & (rng.random(m.shape) < 0.3))
        out[lab] = m
    return out


@pytest.fixture(scope="module")
def real_cases(real_masks):
    shape = next(iter(real_masks.values())).shape
    gt_masks = dict(real_masks)
    # The real esophagus is empty in this field of view: add a tube so the z-cut is exercised.
    eso = np.zeros(shape, bool)
    eso[60:64, 60:64, 70:100] = True
    gt_masks[10] = eso
    gt = _compose(gt_masks, shape)
    rng = np.random.default_rng(7)
    cases = []
    for mode in ("shift", "erode", "dilate", "mixed", "mixed"):
        pm = _perturb(gt_masks, rng, mode)
        if mode == "mixed":
            pm[int(rng.integers(1, 14))] = np.zeros(shape, bool)  # a missed organ
            far = np.zeros(shape, bool)  # a false-positive island far from its organ
            far[100:104, 5:9, 5:8] = True
            pm[3] = pm[3] | far
        cases.append((mode, _compose(pm, shape), gt))
    # the real gt itself: an empty organ and a perfect prediction
    cases.append(("real-empty-esophagus", _compose(real_masks, shape), _compose(real_masks, shape)))
    return cases


@pytest.mark.parametrize("spacing", [(3.0, 3.0, 3.0), (0.7, 0.9, 3.0)])
def test_real_organs_match_official_reference(real_cases, spacing):
    for i, (mode, pred, gt) in enumerate(real_cases):
        hd95 = i in (0, 3)
        assert_matches_reference(pred, gt, spacing, hd95=hd95)


def test_real_organs_cut_to_array_border(real_cases):
    mode, pred, gt = real_cases[3]
    # crop the volume so that liver, aorta and others touch the array borders
    pred_c, gt_c = pred[20:90, 15:80, 30:90], gt[20:90, 15:80, 30:90]
    assert_matches_reference(pred_c, gt_c, (0.8, 0.8, 2.5), hd95=True)
    assert_matches_reference(pred_c, gt_c, (0.8, 0.8, 2.5), exact_cut=False)


# ------------------------------------------------------------------------------------------
# Files and folders
# ------------------------------------------------------------------------------------------

def _save(arr, path, spacing=(0.8, 0.9, 2.5), origin=(0.0, 0.0, 0.0)):
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = origin
    nib.save(nib.Nifti1Image(arr, aff), str(path))
    return path


def _tiny_cases(n=3):
    rng = np.random.default_rng(3)
    out = []
    for k in range(n):
        gt = np.zeros((24, 22, 16), np.uint8)
        gt[2:10, 2:12, 2:10] = 1
        gt[12:20, 3:9, 4:12] = 2
        gt[3:8, 14:20, 3:13] = 5
        gt[14:18, 13:20, 1 + k:8 + k] = 11
        pred = np.roll(gt, int(rng.integers(-1, 2)), axis=int(rng.integers(0, 3)))
        pred[20:23, 18:21, 12:15] = 13  # false positive left kidney
        out.append((f"FLARETs_{k:04d}", pred, gt))
    return out


def test_evaluate_files_and_geometry_checks(tmp_path):
    cid, pred, gt = _tiny_cases(1)[0]
    g = _save(gt, tmp_path / "gt.nii.gz")
    p = _save(pred, tmp_path / "pred.nii.gz")
    spacing = tuple(float(z) for z in nib.load(str(g)).header.get_zooms())
    assert same_scores(evaluate_files(p, g, hd95=True), evaluate_case(pred, gt, spacing, hd95=True))
    for bad, kw in [("spacing", {"spacing": (0.8, 0.9, 3.0)}), ("origin", {"origin": (5.0, 0, 0)})]:
        b = _save(pred, tmp_path / f"bad_{bad}.nii.gz", **kw)
        with pytest.raises(FlareInputError, match=bad) as ei:
            evaluate_files(b, g)
        assert ei.value.path == b
    b = _save(pred[:-1], tmp_path / "bad_shape.nii.gz")
    with pytest.raises(FlareInputError, match="shape") as ei:
        evaluate_files(b, g)
    assert ei.value.path == b


def _write_folders(tmp_path, cases):
    pd_, gd = tmp_path / "pred", tmp_path / "gt"
    pd_.mkdir()
    gd.mkdir()
    for cid, pred, gt in cases:
        _save(gt, gd / f"{cid}.nii.gz")
        _save(pred, pd_ / f"{cid}.nii.gz")
    return pd_, gd


def test_evaluate_folders_outputs(tmp_path):
    cases = _tiny_cases(3)
    pdir, gdir = _write_folders(tmp_path, cases)
    out = tmp_path / "out"
    res = evaluate_folders(pdir, gdir, out, processes=2, hd95=True)
    keys = [o.flare_key for o in ORGANS]
    expected_cols = (["Name"] + [f"{k}_DSC" for k in keys] + [f"{k}_NSD" for k in keys]
                     + [f"{k}_HD95" for k in keys] + ["Revision"])
    csv = pd.read_csv(out / CSV_NAME)
    assert list(csv.columns) == expected_cols == list(res.per_case.columns)
    assert list(csv["Name"]) == [f"{c}.nii.gz" for c, _, _ in cases]
    assert set(csv["Revision"].astype(str)) == {"2022"}
    spacing = tuple(float(z) for z in nib.load(str(gdir / "FLARETs_0000.nii.gz")).header.get_zooms())
    per_case_scores = [evaluate_case(p, g, spacing, hd95=True) for _, p, g in cases]
    for row, scores in zip(csv.itertuples(index=False), per_case_scores):
        r = row._asdict()
        for lab, s in scores.items():
            key = LABELS[lab].flare_key
            assert r[f"{key}_DSC"] == pytest.approx(s.dsc, abs=1e-12)
            assert r[f"{key}_NSD"] == pytest.approx(s.nsd, abs=1e-12)
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["revision"] == "2022" and summary["n_cases"] == 3
    liver = [s[1].dsc for s in per_case_scores]
    assert summary["per_organ"]["liver"]["dsc_mean"] == pytest.approx(np.mean(liver))
    assert summary["per_organ"]["liver"]["dsc_std"] == pytest.approx(np.std(liver))
    assert summary["per_flare_key"]["RK"]["nsd_mean"] == pytest.approx(
        np.mean([s[2].nsd for s in per_case_scores]))
    assert summary["per_flare_key"]["LK"]["dsc_mean"] == 0.0  # false positive everywhere
    organ_means = [np.mean([s[lab].dsc for s in per_case_scores]) for lab in range(1, 14)]
    assert summary["mean_dsc"] == pytest.approx(np.mean(organ_means))
    assert summary["per_organ"]["gallbladder"]["hd95_n_nan"] == 3
    assert summary["per_organ"]["left_kidney"]["hd95_n_inf"] == 3
    assert not list(out.glob(".*tmp"))
    # 2024 revision, one process, rounding like the official CSV
    res24 = evaluate_folders(pdir, gdir, out, revision="2024", processes=1, decimals=4)
    assert res24.revision == "2024" and set(res24.per_case["Revision"]) == {"2024"}
    assert json.loads((out / SUMMARY_NAME).read_text())["revision"] == "2024"
    assert res24.per_case["Liver_DSC"].tolist() == [round(s[1].dsc, 4) for s in per_case_scores]


def test_evaluate_folders_missing_and_extra_cases(tmp_path):
    cases = _tiny_cases(3)
    pdir, gdir = _write_folders(tmp_path, cases)
    (pdir / "FLARETs_0001.nii.gz").unlink()
    with pytest.raises(FlareInputError, match="FLARETs_0001"):
        evaluate_folders(pdir, gdir, processes=1)
    res = evaluate_folders(pdir, gdir, processes=1, allow_missing=True)
    row = res.per_case.set_index("Name").loc["FLARETs_0001.nii.gz"]
    assert row["Liver_DSC"] == 0.0 and row["Gallbladder_DSC"] == 1.0
    only = evaluate_folders(pdir, gdir, processes=1, cases=["FLARETs_0002"])
    assert list(only.per_case["Name"]) == ["FLARETs_0002.nii.gz"]
    _save(cases[0][1], pdir / "FLARETs_0099.nii.gz")
    with pytest.raises(FlareInputError, match="FLARETs_0099"):
        evaluate_folders(pdir, gdir, processes=1, allow_missing=True)
    with pytest.raises(FlareInputError, match="FLARETs_0042"):
        evaluate_folders(pdir, gdir, processes=1, cases=["FLARETs_0042"])


def test_evaluate_folders_geometry_mismatch(tmp_path):
    cases = _tiny_cases(2)
    pdir, gdir = _write_folders(tmp_path, cases)
    bad = _save(cases[1][1], pdir / "FLARETs_0001.nii.gz", spacing=(0.8, 0.9, 3.0))
    with pytest.raises(FlareInputError, match="spacing") as ei:
        evaluate_folders(pdir, gdir, tmp_path / "out", processes=2)
    assert ei.value.path == bad
    assert not (tmp_path / "out" / CSV_NAME).exists()


def test_cli_evaluate_writes_flare_outputs(tmp_path):
    import subprocess
    import sys
    cases = _tiny_cases(2)
    pdir, gdir = _write_folders(tmp_path, cases)
    out = tmp_path / "cli_out"
    r = subprocess.run([sys.executable, "-m", "flare_utils", "evaluate", str(pdir), str(gdir),
                        "--out", str(out), "--revision", "2024", "--processes", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert printed["revision"] == "2024" == summary["revision"] and printed["n_cases"] == 2
    assert printed["mean_dsc"] == pytest.approx(summary["mean_dsc"])
    assert len(pd.read_csv(out / CSV_NAME)) == 2
    (pdir / f"{cases[0][0]}.nii.gz").unlink()
    r = subprocess.run([sys.executable, "-m", "flare_utils", "evaluate", str(pdir), str(gdir)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and cases[0][0] in r.stderr and "Traceback" not in r.stderr
