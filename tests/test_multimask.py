"""One mask per structure -> FLARE22 label map (flare_utils.data.multimask)."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from flare_utils.data import labels
from flare_utils.errors import FlareInputError
from flare_utils.data.multimask import convert_mask_folder, masks_to_label_map, parse_structure_name

SHAPE = (16, 16, 8)


def aff(origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 2.0)):
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def box(x0, x1, y0, y1, z0=0, z1=SHAPE[2]):
    m = np.zeros(SHAPE, np.float64)
    m[x0:x1, y0:y1, z0:z1] = 1
    return m


def save(folder: Path, name: str, data, dtype=None, **geom) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(data) if dtype is None else np.asarray(data).astype(dtype)
    p = folder / name
    nib.save(nib.Nifti1Image(arr, aff(**geom)), str(p))
    return p


@pytest.fixture
def masks(tmp_path) -> Path:
    d = tmp_path / "masks"
    save(d, "liver.nii.gz", box(0, 10, 0, 10))                        # 800 voxels
    save(d, "adrenal_gland_right.nii.gz", box(8, 12, 8, 12, 0, 2))    # 32, 8 of them inside the liver
    save(d, "kidney_right.nii.gz", box(12, 16, 0, 4), dtype=np.uint8)  # integer mask, no overlap
    save(d, "stomach.nii.gz", box(0, 6, 10, 16))                       # 288
    save(d, "spleen.nii.gz", box(2, 4, 12, 14))                        # 32, inside the stomach
    save(d, "colon.nii.gz", box(0, 16, 0, 16))                         # not FLARE: ignored
    save(d, "Vertebrae_L1.nii.gz", box(0, 1, 0, 1))
    (d / "README.txt").write_text("not a mask")
    return d


def test_parse_structure_names():
    assert parse_structure_name("liver.nii.gz") == ("liver", None)
    assert parse_structure_name("liver_rater1.nii.gz") == ("liver", 1)
    assert parse_structure_name("liver_rater_2.nii") == ("liver", 2)
    assert parse_structure_name("liver_r2.nii.gz") == ("liver", 2)
    assert parse_structure_name("GTV-1vis3.nii.gz") == ("gtv_1", 3)
    assert parse_structure_name("Kidney Right_reader4.nii.gz") == ("kidney_right", 4)
    # names that only look numbered are not raters
    assert parse_structure_name("vertebrae_L1.nii.gz") == ("vertebrae_l1", None)
    assert parse_structure_name("rib_left_11.nii.gz") == ("rib_left_11", None)
    assert parse_structure_name("kidney_r.nii.gz") == ("kidney_r", None)


def test_smallest_wins(masks):
    lab, geom, rep = masks_to_label_map(masks)
    assert lab.dtype == np.uint8 and lab.shape == SHAPE and geom.shape == SHAPE
    assert np.allclose(geom.affine, aff())
    assert rep.ignored == ["colon", "vertebrae_l1"]
    assert rep.ignored_files == ["Vertebrae_L1.nii.gz", "colon.nii.gz"]
    assert rep.files["right_kidney"] == ["kidney_right.nii.gz"]
    assert set(rep.missing) == {"pancreas", "aorta", "inferior_vena_cava", "left_adrenal_gland", "gallbladder",
                                "esophagus", "duodenum", "left_kidney"}
    assert rep.mask_voxels == {"liver": 800, "right_kidney": 128, "spleen": 32, "right_adrenal_gland": 32,
                               "stomach": 288}
    assert rep.overlaps == {("liver", "right_adrenal_gland"): 8, ("spleen", "stomach"): 32}
    # the small organs keep all their voxels
    assert rep.moved == {("liver", "right_adrenal_gland"): 8, ("stomach", "spleen"): 32}
    assert (lab == 7).sum() == 32 and (lab == 3).sum() == 32
    assert rep.label_voxels["liver"] == 792 and rep.label_voxels["stomach"] == 256
    for organ, n in rep.mask_voxels.items():
        assert rep.label_voxels[organ] == n - rep.lost(organ)
        assert (lab == labels.label_for(organ)).sum() == rep.label_voxels[organ]
    assert "stomach->spleen 32" in str(rep) and "ignored: colon, vertebrae_l1" in str(rep)
    assert rep.to_dict()["overlaps"][0] == {"a": "liver", "b": "right_adrenal_gland", "voxels": 8}


def test_label_order_and_error_rules(masks):
    lab, _, rep = masks_to_label_map(masks, overlap="label_order")
    # stomach (11) beats spleen (3); right adrenal (7) beats liver (1)
    assert (lab == 3).sum() == 0 and rep.moved[("spleen", "stomach")] == 32
    assert rep.moved[("liver", "right_adrenal_gland")] == 8
    with pytest.raises(FlareInputError, match="overlap") as ei:
        masks_to_label_map(masks, overlap="error")
    assert str(masks) in str(ei.value) and "spleen/stomach: 32" in str(ei.value)
    with pytest.raises(FlareInputError, match="overlap="):
        masks_to_label_map(masks, overlap="biggest")


def test_three_way_overlap_accounting(tmp_path):
    d = tmp_path / "m"
    save(d, "liver.nii.gz", box(0, 8, 0, 8))
    save(d, "aorta.nii.gz", box(4, 6, 0, 16))
    save(d, "inferior_vena_cava.nii.gz", box(5, 7, 0, 16))
    lab, _, rep = masks_to_label_map(d)
    for organ, n in rep.mask_voxels.items():
        assert (lab == labels.label_for(organ)).sum() == n - rep.lost(organ)
    assert sum(rep.label_voxels.values()) == (lab > 0).sum()


def test_geometry_mismatch_names_file(masks):
    save(masks, "pancreas.nii.gz", box(0, 2, 0, 2), origin=(0.0, 0.0, 5.0))
    with pytest.raises(FlareInputError, match="origin") as ei:
        masks_to_label_map(masks)
    assert "pancreas.nii.gz" in str(ei.value)
    (masks / "pancreas.nii.gz").unlink()
    save(masks, "aorta.nii.gz", np.zeros((16, 16, 9)))
    with pytest.raises(FlareInputError, match="shape") as ei:
        masks_to_label_map(masks)
    assert "aorta.nii.gz" in str(ei.value)


def test_non_binary_and_threshold(masks):
    soft = box(0, 4, 0, 4) * 0.7
    save(masks, "pancreas.nii.gz", soft)
    with pytest.raises(FlareInputError, match="not binary") as ei:
        masks_to_label_map(masks)
    assert "pancreas.nii.gz" in str(ei.value) and "0.7" in str(ei.value)
    lab, _, rep = masks_to_label_map(masks, threshold=0.5)
    assert rep.mask_voxels["pancreas"] == 16 * SHAPE[2]
    assert rep.threshold == 0.5
    save(masks, "pancreas.nii.gz", box(0, 4, 0, 4) * 255, dtype=np.uint8)
    with pytest.raises(FlareInputError, match="255"):
        masks_to_label_map(masks)
    assert masks_to_label_map(masks, threshold=128)[2].mask_voxels["pancreas"] == 16 * SHAPE[2]
    nan = box(0, 4, 0, 4)
    nan[0, 0, 0] = np.nan
    save(masks, "pancreas.nii.gz", nan)
    with pytest.raises(FlareInputError, match="NaN") as ei:
        masks_to_label_map(masks, threshold=0.5)
    assert "pancreas.nii.gz" in str(ei.value)


def test_raters(tmp_path):
    d = tmp_path / "r"
    a, b, c = box(0, 4, 0, 4), box(0, 6, 0, 4), box(0, 8, 0, 4)   # nested: a in b in c
    save(d, "liver_rater1.nii.gz", a)
    save(d, "liver_r2.nii.gz", b)
    save(d, "Liver_Rater3.nii.gz", c)
    for i in range(1, 6):
        save(d, f"GTV-1vis{i}.nii.gz", box(10, 12, 10, 12))
    lab, _, rep = masks_to_label_map(d)                   # majority: on in >= 2 of 3 -> b
    assert np.array_equal(lab == 1, b.astype(bool))
    assert rep.raters == {"liver": [1, 2, 3]} and rep.ignored == ["gtv_1"]
    assert len(rep.files["liver"]) == 3 and len(rep.ignored_files) == 5
    assert np.array_equal(masks_to_label_map(d, raters=3)[0] == 1, c.astype(bool))
    assert np.array_equal(masks_to_label_map(d, raters="union")[0] == 1, c.astype(bool))
    assert np.array_equal(masks_to_label_map(d, raters="intersection")[0] == 1, a.astype(bool))
    with pytest.raises(FlareInputError, match="no rater 9") as ei:
        masks_to_label_map(d, raters=9)
    assert "liver_rater1.nii.gz" in str(ei.value)
    with pytest.raises(FlareInputError, match="raters="):
        masks_to_label_map(d, raters="mean")
    # two raters, majority needs both
    (d / "Liver_Rater3.nii.gz").unlink()
    assert np.array_equal(masks_to_label_map(d)[0] == 1, a.astype(bool))


def test_ambiguous_structures(tmp_path):
    d = tmp_path / "a"
    save(d, "kidney_right.nii.gz", box(0, 2, 0, 2))
    save(d, "right_kidney.nii.gz", box(0, 2, 0, 2))
    with pytest.raises(FlareInputError, match="already given by kidney_right.nii.gz") as ei:
        masks_to_label_map(d)
    assert "right_kidney.nii.gz" in str(ei.value)
    (d / "right_kidney.nii.gz").unlink()
    save(d, "kidney_right_rater1.nii.gz", box(0, 2, 0, 2))
    with pytest.raises(FlareInputError, match="both without a rater suffix"):
        masks_to_label_map(d)


def test_bad_folders_and_files(tmp_path):
    with pytest.raises(FlareInputError, match="missing"):
        masks_to_label_map(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FlareInputError, match="no NIfTI"):
        masks_to_label_map(tmp_path / "empty")
    d = tmp_path / "nonflare"
    save(d, "colon.nii.gz", box(0, 2, 0, 2))
    with pytest.raises(FlareInputError, match="colon") as ei:
        masks_to_label_map(d)
    assert str(d) in str(ei.value)
    save(d, "liver.nii.gz", box(0, 2, 0, 2))
    raw = (d / "liver.nii.gz").read_bytes()
    (d / "liver.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FlareInputError, match="truncated") as ei:
        masks_to_label_map(d)
    assert "liver.nii.gz" in str(ei.value)


def test_convert_mask_folder_writes_atomically(masks, tmp_path):
    out = tmp_path / "out" / "label.nii.gz"
    rep = convert_mask_folder(masks, out, overlap="label_order")
    img = nib.load(str(out))
    ref = nib.load(str(masks / rep.reference))
    assert img.get_data_dtype() == np.uint8
    assert np.array_equal(img.affine, ref.affine) and img.header.get_zooms() == ref.header.get_zooms()
    assert np.array_equal(np.asarray(img.dataobj), masks_to_label_map(masks, overlap="label_order")[0])
    before = out.read_bytes()
    save(masks, "pancreas.nii.gz", box(0, 4, 0, 4) * 0.3)
    with pytest.raises(FlareInputError, match="already exists"):
        convert_mask_folder(masks, out)                      # checked before any mask is read
    with pytest.raises(FlareInputError, match="pancreas.nii.gz"):
        convert_mask_folder(masks, out, overwrite=True)
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["label.nii.gz"]


def test_real_totalsegmentator_masks(real_ct, tmp_path):
    mask_dir = real_ct / "masks"
    out = tmp_path / "real_label.nii.gz"
    rep = convert_mask_folder(mask_dir, out)
    lab = np.asarray(nib.load(str(out)).dataobj)
    ct = nib.load(str(real_ct / "ct.nii.gz"))
    assert lab.shape == ct.shape and np.allclose(nib.load(str(out)).affine, ct.affine)
    assert rep.missing == []
    for o in labels.ORGANS:
        mask_path = mask_dir / f"{rep.files[o.name][0]}"
        mask_sum = int(np.asarray(nib.load(str(mask_path)).dataobj).sum())
        assert rep.mask_voxels[o.name] == mask_sum
        assert (lab == o.label).sum() == mask_sum - rep.lost(o.name), o.name
        # any voxel that moved is accounted for by a reported overlap
        for (loser, winner), v in rep.moved.items():
            pair = tuple(sorted((loser, winner), key=lambda n: labels.label_for(n)))
            assert rep.overlaps[pair] >= v
    for name in ("colon", "small_bowel", "portal_vein_and_splenic_vein", "urinary_bladder",
                 "vertebrae_l1", "vertebrae_l2", "rib_left_11"):
        assert name in rep.ignored
    assert rep.empty == ["esophagus"] and rep.mask_voxels["liver"] > 10000
