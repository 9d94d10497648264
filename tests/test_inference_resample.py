"""Fast preprocessing pieces: body crop, CT normalisation, torch resampling, labels back."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flare_utils.inference.resample import (CTNormalizer, body_bbox, compute_new_shape, label_planes, labels_to_original,
                                  nearest_indices, resample_to_grid, separate_z_axis)

PROPS = {"mean": 80.0, "std": 120.0, "percentile_00_5": -950.0, "percentile_99_5": 1400.0}


def _ct(shape=(40, 50, 60), seed=0):
    rng = np.random.default_rng(seed)
    img = np.full(shape, -1000, np.int16)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    body = ((y - 25) / 18.0) ** 2 + ((x - 33) / 22.0) ** 2 < 1
    body = np.broadcast_to(body, shape).copy()
    body[:10] = False
    img[body] = rng.normal(40, 300, body.sum()).astype(np.int16)
    return img, body


def test_ct_normalizer_equals_nnunet():
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization
    img, _ = _ct()
    ref = CTNormalization(use_mask_for_norm=False, intensityproperties=PROPS).run(img.astype(np.float32).copy())
    ours = CTNormalizer(PROPS)(torch.from_numpy(img.copy())).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    # stored values with a scale (HU = v * 0.5 - 1024)
    stored = ((img.astype(np.float32) + 1024) / 0.5).astype(np.int32)
    ours2 = CTNormalizer(PROPS, (0.5, -1024.0))(torch.from_numpy(stored)).numpy()
    np.testing.assert_allclose(ours2, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spacing,new_spacing", [((2.5, 0.8, 0.8), (3.0, 2.0, 2.0)),      # isotropic-ish
                                                 ((5.0, 0.7, 0.7), (4.0, 1.5, 1.5)),      # separate z (nnU-Net)
                                                 ((1.0, 1.0, 1.0), (0.7, 1.3, 0.9))])     # up and down
def test_resample_matches_nnunet_torch_resampler(spacing, new_spacing):
    from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet
    img, _ = _ct((24, 70, 64))
    norm = CTNormalizer(PROPS)
    new_shape = compute_new_shape(img.shape, spacing, new_spacing)
    sep = separate_z_axis(spacing, new_spacing)
    slab_axis = sep if sep is not None else 0
    ours = resample_to_grid(img, new_shape, slab_axis=slab_axis,
                            slab_axis_mode="nearest-exact" if sep is not None else "linear",
                            normalize=norm, slab=5).numpy()
    normed = norm(torch.from_numpy(img.copy())).numpy()[None]
    ref = resample_torch_fornnunet(normed, new_shape, spacing, new_spacing, is_seg=False)[0]
    assert ours.shape == tuple(new_shape) == ref.shape
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_resample_transposed_view_and_compute_new_shape():
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape as nn_shape
    img, _ = _ct((30, 40, 50))
    view = img.transpose(2, 1, 0)[3:40]                 # non-contiguous view, as in the predictor
    sh = compute_new_shape(view.shape, (0.9, 1.1, 2.0), (1.5, 1.5, 3.0))
    assert tuple(sh) == tuple(nn_shape(view.shape, (0.9, 1.1, 2.0), (1.5, 1.5, 3.0)))
    out = resample_to_grid(view, sh, slab_axis=2).numpy()
    ref = F.interpolate(torch.from_numpy(np.ascontiguousarray(view)).float()[None, None], size=sh,
                        mode="trilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-3)


def test_body_bbox_contains_body_and_is_tight():
    img, body = _ct((40, 50, 60))
    bb = body_bbox(img, "body")
    idx = np.argwhere(body)
    for ax, sl in enumerate(bb):
        assert sl.start <= idx[:, ax].min() and sl.stop >= idx[:, ax].max() + 1
        assert sl.start >= idx[:, ax].min() - 7 and sl.stop <= idx[:, ax].max() + 8
    assert bb[0].start > 0                           # the air slices above are cut
    # no body at all: whole image
    air = np.full((20, 20, 20), -1000, np.int16)
    assert body_bbox(air) == (slice(0, 20),) * 3
    assert body_bbox(img, "none") == tuple(slice(0, s) for s in img.shape)
    z = np.zeros((20, 20, 20), np.int16)
    z[5:9, 6:12, 2:3] = 7
    bb = body_bbox(z, "nonzero")
    assert all(s.start <= lo and s.stop >= hi for s, (lo, hi) in zip(bb, [(5, 9), (6, 12), (2, 3)]))
    with pytest.raises(ValueError):
        body_bbox(img, "skin")


@pytest.mark.parametrize("src,dst", [((10, 20, 30), (25, 41, 61)), ((30, 20, 10), (11, 9, 10))])
def test_labels_to_original_nearest_exact(src, dst):
    rng = np.random.default_rng(1)
    lab = rng.integers(0, 14, src, dtype=np.uint8)
    ref = lab[np.ix_(*[[((2 * i + 1) * a) // (2 * b) for i in range(b)] for a, b in zip(src, dst)])]
    tref = F.interpolate(torch.from_numpy(lab)[None, None], size=dst, mode="nearest-exact")[0, 0].numpy()
    assert (tref == ref).mean() > 0.97          # torch computes the scale in float (ties may differ)
    out = np.zeros(dst, np.uint8)
    labels_to_original(torch.from_numpy(lab), out, slab_axis=0)
    np.testing.assert_array_equal(out, ref)
    out2 = np.zeros(dst, np.uint8)
    labels_to_original(lab, out2, slab_axis=2)
    np.testing.assert_array_equal(out2, ref)
    # writing into a transposed crop of a bigger array (as the predictor does)
    big = np.zeros((dst[2] + 4, dst[1], dst[0] + 2), np.uint8)
    view = big[2:2 + dst[2], :, 1:1 + dst[0]].transpose(2, 1, 0)
    labels_to_original(lab, view, slab_axis=1)
    np.testing.assert_array_equal(big[2:2 + dst[2], :, 1:1 + dst[0]], ref.transpose(2, 1, 0))
    assert big[:2].sum() == 0
    assert nearest_indices(4, 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("perm", [(2, 1, 0), (0, 1, 2), (1, 2, 0)])
def test_label_planes_equal_labels_to_original(perm):
    """The streamed planes are the original-grid label map that labels_to_original writes, plane by plane."""
    rng = np.random.default_rng(2)
    shape = (37, 29, 23)                                   # file axes (i, j, k)
    crop = (slice(3, 31), slice(0, 29), slice(5, 20))
    crop_shape = [c.stop - c.start for c in crop]
    net = rng.integers(0, 14, [max(2, crop_shape[f] // 3) for f in perm], dtype=np.uint8)   # network axes
    ref = np.zeros(shape, np.uint8, order="F")
    labels_to_original(torch.from_numpy(net), ref[crop].transpose(perm), slab_axis=0)
    planes = [p.copy() for p in label_planes(torch.from_numpy(net), shape, crop, perm)]
    assert len(planes) == shape[2] and all(p.shape == (shape[1], shape[0]) and p.flags.c_contiguous for p in planes)
    np.testing.assert_array_equal(np.stack(planes, axis=2).transpose(1, 0, 2), ref)
    assert not planes[0].any() and not planes[-1].any()    # outside the crop's k range


def test_streamed_nifti_equals_whole_array_write(tmp_path):
    """save_nifti_planes_like writes the file save_nifti_like writes (header, geometry, data); a wrong number
    or shape of planes is an error and leaves no file."""
    import nibabel as nib
    from flare_utils.data.io import save_nifti_like, save_nifti_planes_like
    rng = np.random.default_rng(3)
    a = np.diag([0.8, 0.9, 1.25, 1.0])
    a[:3, 3] = (-10.0, 4.0, 2.5)
    ref_img = nib.Nifti1Image(rng.integers(-1000, 1000, (20, 17, 9)).astype(np.int16), a)
    ref_img.header.set_slope_inter(0.5, -1024.0)
    ref_img.set_qform(a, code=1)
    ref_img.set_sform(a, code=2)
    lab = rng.integers(0, 14, (20, 17, 9)).astype(np.uint8)
    for ext in (".nii.gz", ".nii"):
        whole, streamed = tmp_path / f"whole{ext}", tmp_path / f"streamed{ext}"
        save_nifti_like(lab, ref_img, whole)
        save_nifti_planes_like((np.ascontiguousarray(lab[:, :, k].T) for k in range(9)), lab.shape, np.uint8,
                               ref_img, streamed)
        w, s_ = nib.load(whole), nib.load(streamed)
        assert w.header.binaryblock == s_.header.binaryblock
        assert np.array_equal(np.asarray(s_.dataobj), lab) and np.asarray(s_.dataobj).dtype == np.uint8
        if ext == ".nii":
            assert whole.read_bytes() == streamed.read_bytes()
    bad = tmp_path / "bad.nii.gz"
    with pytest.raises(ValueError, match="8 planes written"):
        save_nifti_planes_like((np.zeros((17, 20), np.uint8) for _ in range(8)), (20, 17, 9), np.uint8, ref_img, bad)
    with pytest.raises(ValueError, match="shape"):
        save_nifti_planes_like(iter([np.zeros((20, 17), np.uint8)]), (20, 17, 9), np.uint8, ref_img, bad)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["streamed.nii", "streamed.nii.gz", "whole.nii",
                                                          "whole.nii.gz"]
