"""FLARE22 folders -> nnU-Net v2 raw dataset (flare_utils.data.convert), on tiny synthetic NIfTI files."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from flare_utils.data import labels
from flare_utils.data.convert import (Flare22Layout, convert_flare22, dataset_summary, write_summary)
from flare_utils.errors import FlareInputError

SHAPE = (16, 16, 8)
SPACING = (1.5, 1.5, 3.0)
ORIGIN = (10.0, -20.0, 5.0)


# ----------------------------------------------------------------------------- helpers

def affine(spacing=SPACING, origin=ORIGIN, flip_x=False):
    a = np.diag([*spacing, 1.0])
    if flip_x:
        a[0, 0] = -a[0, 0]
    a[:3, 3] = origin
    return a


def write_image(path: Path, shape=SHAPE, seed=0, **geom) -> Path:
    rng = np.random.default_rng(seed)
    data = rng.integers(-1000, 1000, size=shape).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine(**geom)), str(path))
    return path


def label_array(shape=SHAPE, seed=0) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    # one block per organ in a fixed pattern, shifted by seed so cases differ
    for i, o in enumerate(labels.ORGANS):
        x = (2 * i + seed) % (shape[0] - 2)
        lab[x:x + 2, 2:6 + (i % 4), 1:3] = o.label
    return lab


def write_label(path: Path, data=None, shape=SHAPE, seed=0, dtype=np.uint8, **geom) -> Path:
    data = label_array(shape, seed) if data is None else data
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data).astype(dtype), affine(**geom)), str(path))
    return path


def make_flare(root: Path, n_lab=3, n_unl=2, n_val=2, val_labels=True) -> Path:
    lab_dir = root / "Training" / "FLARE22_LabeledCase50"
    for i in range(n_lab):
        write_image(lab_dir / "images" / f"FLARE22_Tr_{i + 1:04d}_0000.nii.gz", seed=i)
        write_label(lab_dir / "labels" / f"FLARE22_Tr_{i + 1:04d}.nii.gz", seed=i)
    for i in range(n_unl):
        write_image(root / "Training" / "FLARE22_UnlabeledCase" / f"Case_{i + 1:05d}_0000.nii.gz", seed=100 + i)
    for i in range(n_val):
        write_image(root / "Validation" / "images" / f"FLARE22_Ts_{i + 1:04d}_0000.nii.gz", seed=200 + i)
        if val_labels:
            write_label(root / "Validation" / "labels" / f"FLARE22_Ts_{i + 1:04d}.nii.gz", seed=200 + i)
    return root


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(raw_root: Path) -> list[str]:
    return sorted(p.name for p in raw_root.iterdir()) if raw_root.exists() else []


@pytest.fixture
def flare(tmp_path) -> Path:
    return make_flare(tmp_path / "FLARE22")


LAB = "Training/FLARE22_LabeledCase50"


# ----------------------------------------------------------------------------- discovery

def test_discover_standard_layout(flare):
    lay = Flare22Layout.discover(flare)
    assert lay.labelled_images == flare / LAB / "images"
    assert lay.labelled_labels == flare / LAB / "labels"
    assert lay.unlabelled_images == flare / "Training" / "FLARE22_UnlabeledCase"
    assert lay.validation_images == flare / "Validation" / "images"
    assert lay.validation_labels == flare / "Validation" / "labels"


def test_discover_variants(tmp_path):
    root = tmp_path / "r"
    write_image(root / "training" / "FLARE22_LabeledCase" / "Images" / "a.nii.gz")  # no _0000, case differs
    write_label(root / "training" / "FLARE22_LabeledCase" / "Labels" / "a.nii.gz")
    write_image(root / "training" / "FLARE22_UnlabeledCase1-1000" / "u1_0000.nii.gz")
    write_image(root / "training" / "FLARE22_UnlabeledCase1001-2000" / "u2_0000.nii.gz")
    write_image(root / "Tuning" / "images" / "t_0000.nii.gz")
    lay = Flare22Layout.discover(root)
    assert lay.labelled_images.name == "Images"
    assert [p.name for p in lay.unlabelled_dirs] == ["FLARE22_UnlabeledCase1-1000", "FLARE22_UnlabeledCase1001-2000"]
    assert lay.validation_images == root / "Tuning" / "images" and lay.validation_labels is None
    res = convert_flare22(root, tmp_path / "raw", 7, "Var")
    assert res.case_ids("train") == ["a"] and res.case_ids("unlabelled") == ["u1", "u2"]
    assert res.case_ids("test") == ["t"]
    assert (res.dataset_dir / "imagesTr" / "a_0000.nii.gz").is_file()


def test_discover_nothing_found(tmp_path):
    (tmp_path / "empty" / "Training").mkdir(parents=True)
    with pytest.raises(FlareInputError, match="looked") as ei:
        Flare22Layout.discover(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(ei.value)
    assert "FLARE22_Label" in str(ei.value)
    with pytest.raises(FlareInputError, match="missing"):
        Flare22Layout.discover(tmp_path / "nope")


# ----------------------------------------------------------------------------- conversion

def test_convert_full_dataset(flare, tmp_path):
    before = snapshot(flare)
    res = convert_flare22(flare, tmp_path / "raw", 501)
    d = res.dataset_dir
    assert d == tmp_path / "raw" / "Dataset501_FLARE22" and not res.reused
    assert "3 training, 2 test, 2 unlabelled" in str(res)
    assert sorted(p.name for p in (d / "imagesTr").iterdir()) == [f"FLARE22_Tr_{i:04d}_0000.nii.gz" for i in (1, 2, 3)]
    assert sorted(p.name for p in (d / "labelsTr").iterdir()) == [f"FLARE22_Tr_{i:04d}.nii.gz" for i in (1, 2, 3)]
    assert sorted(p.name for p in (d / "imagesTs").iterdir()) == ["FLARE22_Ts_0001_0000.nii.gz", "FLARE22_Ts_0002_0000.nii.gz"]
    assert sorted(p.name for p in (d / "labelsTs").iterdir()) == ["FLARE22_Ts_0001.nii.gz", "FLARE22_Ts_0002.nii.gz"]
    assert sorted(p.name for p in (d / "imagesUnlabelled").iterdir()) == ["Case_00001_0000.nii.gz", "Case_00002_0000.nii.gz"]

    dj = json.loads((d / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "CT"} and dj["numTraining"] == 3 and dj["file_ending"] == ".nii.gz"
    assert dj["labels"] == labels.dataset_json_labels() and dj["description"]

    man = json.loads((d / "manifest.json").read_text())
    assert man["unlabelled"] == ["Case_00001", "Case_00002"]
    by_id = {c["case_id"]: c for c in man["cases"]}
    assert len(by_id) == 7
    c = by_id["FLARE22_Tr_0002"]
    assert c["split"] == "train" and c["shape"] == list(SHAPE) and c["spacing"] == list(SPACING)
    assert c["source_image"] == str((flare / LAB / "images" / "FLARE22_Tr_0002_0000.nii.gz").resolve())
    assert c["source_label"] == str((flare / LAB / "labels" / "FLARE22_Tr_0002.nii.gz").resolve())
    assert by_id["Case_00001"]["split"] == "unlabelled" and by_id["Case_00001"]["label"] is None
    assert by_id["FLARE22_Ts_0001"]["split"] == "test"

    # images copied byte for byte, labels rewritten as uint8 on the image's exact header geometry
    src_img = flare / LAB / "images" / "FLARE22_Tr_0002_0000.nii.gz"
    assert (d / "imagesTr" / src_img.name).read_bytes() == src_img.read_bytes()
    img, lab = nib.load(str(src_img)), nib.load(str(d / "labelsTr" / "FLARE22_Tr_0002.nii.gz"))
    assert lab.get_data_dtype() == np.uint8
    assert np.array_equal(lab.get_sform(), img.get_sform()) and np.array_equal(lab.get_qform(), img.get_qform())
    assert lab.header["sform_code"] == img.header["sform_code"] and lab.header.get_zooms() == img.header.get_zooms()
    assert np.array_equal(np.asarray(lab.dataobj), label_array(seed=1))
    assert snapshot(flare) == before
    assert leftovers(tmp_path / "raw") == ["Dataset501_FLARE22"]


def test_nnunet_verify_dataset_integrity(flare, tmp_path):
    # nnU-Net reads its folders from the environment at first import: run it in a fresh interpreter
    res = convert_flare22(flare, tmp_path / "raw", 502, "Check")
    broken = convert_flare22(flare, tmp_path / "raw", 503, "Broken")
    (broken.dataset_dir / "labelsTr" / "FLARE22_Tr_0002.nii.gz").unlink()
    env = dict(os.environ)
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[k] = str(tmp_path / k)
        (tmp_path / k).mkdir()
    code = textwrap.dedent(f"""
        from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
        from flare_utils.data.convert import verify_with_nnunet
        from flare_utils.errors import FlareInputError
        verify_dataset_integrity({str(res.dataset_dir)!r}, num_processes=1)
        try:
            verify_with_nnunet({str(broken.dataset_dir)!r})
        except FlareInputError as e:
            print("BROKEN REJECTED:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    good, _, bad = out.stdout.partition("BROKEN REJECTED:")
    assert "verify_dataset_integrity Done" in good
    assert "Error" not in good and "Warning" not in good, good
    assert "Dataset503_Broken" in bad and "FLARE22_Tr_0002" in bad


def test_reuse_different_inputs_and_overwrite(flare, tmp_path):
    raw = tmp_path / "raw"
    first = convert_flare22(flare, raw, 503)
    marker = first.dataset_dir / "manifest.json"
    mtime = marker.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = convert_flare22(flare, raw, 503)
    assert again.reused and time.perf_counter() - t0 < 2.0
    assert marker.stat().st_mtime_ns == mtime and again.manifest == first.manifest

    (first.dataset_dir / "imagesTs" / "FLARE22_Ts_0001_0000.nii.gz").unlink()
    with pytest.raises(FlareInputError, match="incomplete"):
        convert_flare22(flare, raw, 503)
    write_image(flare / "Training" / "FLARE22_UnlabeledCase" / "Case_00009_0000.nii.gz", seed=9)
    with pytest.raises(FlareInputError, match="different inputs") as ei:
        convert_flare22(flare, raw, 503)
    assert str(first.dataset_dir) in str(ei.value)
    res = convert_flare22(flare, raw, 503, overwrite=True)
    assert not res.reused and res.num_unlabelled == 3
    assert leftovers(raw) == ["Dataset503_FLARE22"]

    with pytest.raises(FlareInputError, match="same dataset id"):
        convert_flare22(flare, raw, 503, "Other")


def test_foreign_target_is_not_reused(flare, tmp_path):
    (tmp_path / "raw" / "Dataset504_FLARE22").mkdir(parents=True)
    with pytest.raises(FlareInputError, match="not a dataset made by"):
        convert_flare22(flare, tmp_path / "raw", 504)


@pytest.mark.parametrize("link", ["hardlink", "symlink"])
def test_link_modes(flare, tmp_path, link):
    res = convert_flare22(flare, tmp_path / "raw", 505, link=link)
    src = flare / LAB / "images" / "FLARE22_Tr_0001_0000.nii.gz"
    dst = res.dataset_dir / "imagesTr" / src.name
    if link == "symlink":
        assert dst.is_symlink() and dst.resolve() == src.resolve()
    else:
        assert os.path.samefile(dst, src)
    assert {c["image_mode"] for c in res.manifest["cases"]} == {link}
    # labels are never links
    assert not (res.dataset_dir / "labelsTr" / "FLARE22_Tr_0001.nii.gz").is_symlink()


def test_reencoding_float_labels_and_renamed_ids(tmp_path):
    lab_dir = tmp_path / "in"
    # uncompressed image with a singleton 4th axis, a float label holding integer values,
    # an id with a space and a dot
    data = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(*SHAPE, 1)
    (lab_dir / "images").mkdir(parents=True)
    nib.save(nib.Nifti1Image(data, affine()), str(lab_dir / "images" / "case 1.v2_0000.nii"))
    write_label(lab_dir / "labels" / "case 1.v2.nii.gz", dtype=np.float32)
    layout = Flare22Layout(lab_dir / "images", lab_dir / "labels")
    res = convert_flare22(layout, tmp_path / "raw", 9)
    assert res.case_ids() == ["case_1_v2"] and res.manifest["renamed"] == {"case 1.v2": "case_1_v2"}
    out = nib.load(str(res.dataset_dir / "imagesTr" / "case_1_v2_0000.nii.gz"))
    assert out.shape == SHAPE and np.array_equal(np.asarray(out.dataobj), data[..., 0])
    assert res.manifest["cases"][0]["image_mode"] == "reencoded"
    lab = nib.load(str(res.dataset_dir / "labelsTr" / "case_1_v2.nii.gz"))
    assert lab.get_data_dtype() == np.uint8 and np.array_equal(np.asarray(lab.dataobj), label_array())


def test_parallel_conversion_and_summary(flare, tmp_path):
    res = convert_flare22(flare, tmp_path / "raw", 506, processes=2)
    serial = convert_flare22(flare, tmp_path / "raw2", 506, processes=1)
    assert res.manifest["cases"] == serial.manifest["cases"]

    df = dataset_summary(res.dataset_dir, processes=2)
    assert len(df) == 7 and list(df.columns[:4]) == ["case", "split", "shape", "spacing"]
    assert [o.name for o in labels.ORGANS] == list(df.columns[4:])
    row = df.set_index("case").loc["FLARE22_Tr_0001"]
    voxel_ml = np.prod(SPACING) / 1000
    lab = label_array(seed=0)
    for o in labels.ORGANS:
        assert row[o.name] == pytest.approx((lab == o.label).sum() * voxel_ml)
    assert row["shape"] == SHAPE and row["spacing"] == SPACING
    assert df.set_index("case").loc["Case_00001"][["liver", "spleen"]].isna().all()
    spleen_ts = (label_array(seed=200) == 3).sum() * voxel_ml
    assert spleen_ts > 0 and df.set_index("case").loc["FLARE22_Ts_0001", "spleen"] == pytest.approx(spleen_ts)
    assert df.equals(dataset_summary(res.dataset_dir))

    csv_path, json_path = write_summary(df, tmp_path / "summary")
    assert csv_path.name == "summary.csv" and "16x16x8" in csv_path.read_text()
    recs = json.loads(json_path.read_text())
    assert len(recs) == 7 and recs[0]["shape"] == list(SHAPE)
    assert next(r for r in recs if r["case"] == "Case_00001")["liver"] is None


# ----------------------------------------------------------------------------- input errors

def _gz_truncate(path: Path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _garbage(path: Path):
    path.write_bytes(b"this is not a nifti file" * 20)


def _relabel(value, dtype=np.uint8):
    def f(path: Path):
        lab = label_array()
        lab[0, 0, 0] = 0
        arr = lab.astype(dtype)
        arr[0, 0, 0] = value
        write_label(path, data=arr, dtype=dtype)
    return f


ERROR_CASES = {
    # name: (file to break relative to root, how, expected message fragment)
    "missing_label": (f"{LAB}/labels/FLARE22_Tr_0002.nii.gz", Path.unlink, "no label found"),
    "missing_image": (f"{LAB}/images/FLARE22_Tr_0002_0000.nii.gz", Path.unlink, "no image found"),
    "shape_mismatch": (f"{LAB}/labels/FLARE22_Tr_0002.nii.gz",
                       lambda p: write_label(p, shape=(16, 16, 9)), "shape"),
    "spacing_mismatch": (f"{LAB}/labels/FLARE22_Tr_0002.nii.gz",
                         lambda p: write_label(p, spacing=(1.5, 1.5, 2.5)), "spacing"),
    "origin_mismatch": (f"{LAB}/labels/FLARE22_Tr_0002.nii.gz",
                        lambda p: write_label(p, origin=(10.0, -20.0, 8.0)), "origin"),
    "direction_mismatch": (f"{LAB}/labels/FLARE22_Tr_0002.nii.gz",
                           lambda p: write_label(p, flip_x=True), "direction"),
    "label_out_of_range": (f"{LAB}/labels/FLARE22_Tr_0002.nii.gz", _relabel(14), "[14]"),
    "label_negative": (f"{LAB}/labels/FLARE22_Tr_0002.nii.gz", _relabel(-1, np.int16), "[-1]"),
    "label_non_integer": (f"{LAB}/labels/FLARE22_Tr_0002.nii.gz", _relabel(2.5, np.float32), "non-integer"),
    "truncated_image": (f"{LAB}/images/FLARE22_Tr_0003_0000.nii.gz", _gz_truncate, "truncated"),
    "truncated_label": (f"{LAB}/labels/FLARE22_Tr_0003.nii.gz", _gz_truncate, "truncated"),
    "garbage_unlabelled": ("Training/FLARE22_UnlabeledCase/Case_00002_0000.nii.gz", _garbage, "unreadable"),
    "garbage_validation_label": ("Validation/labels/FLARE22_Ts_0002.nii.gz", _garbage, "unreadable"),
    "duplicate_in_folder": ("Training/FLARE22_UnlabeledCase/Case_00001.nii.gz",
                            lambda p: write_image(p), "duplicate case id"),
    "duplicate_across_sets": ("Training/FLARE22_UnlabeledCase/FLARE22_Tr_0001_0000.nii.gz",
                              lambda p: write_image(p), "duplicate case id"),
    "unlabelled_not_3d": ("Training/FLARE22_UnlabeledCase/Case_00002_0000.nii.gz",
                          lambda p: nib.save(nib.Nifti1Image(np.zeros((4, 4), np.int16), np.eye(4)), str(p)),
                          "3D"),
    "missing_validation_label": ("Validation/labels/FLARE22_Ts_0001.nii.gz", Path.unlink, "no label found"),
}


@pytest.mark.parametrize("name", sorted(ERROR_CASES))
def test_input_errors_name_the_file_and_leave_nothing(flare, tmp_path, name):
    rel, breaker, fragment = ERROR_CASES[name]
    broken = flare / rel
    breaker(broken)
    before = snapshot(flare)
    raw = tmp_path / "raw"
    with pytest.raises(FlareInputError) as ei:
        convert_flare22(flare, raw, 510)
    msg = str(ei.value)
    assert fragment in msg
    # the message names the culprit: the broken file, or (for a removed file) its partner
    named = {broken.name, broken.name.replace("_0000.nii.gz", ".nii.gz"),
             broken.name.replace(".nii.gz", "_0000.nii.gz")}
    assert any(n in msg for n in named), msg
    assert not raw.exists(), leftovers(raw)
    assert snapshot(flare) == before


def test_empty_inputs(tmp_path):
    (tmp_path / "in" / "images").mkdir(parents=True)
    (tmp_path / "in" / "labels").mkdir()
    (tmp_path / "in" / "images" / "notes.txt").write_text("not an image")
    layout = Flare22Layout(tmp_path / "in" / "images", tmp_path / "in" / "labels")
    with pytest.raises(FlareInputError, match="holds no NIfTI files") as ei:
        convert_flare22(layout, tmp_path / "raw", 11)
    assert str(tmp_path / "in" / "images") in str(ei.value)
    write_image(tmp_path / "in" / "images" / "a_0000.nii.gz")
    write_label(tmp_path / "in" / "labels" / "a.nii.gz")
    (tmp_path / "unl").mkdir()
    layout.unlabelled_images = tmp_path / "unl"
    with pytest.raises(FlareInputError, match="unlabelled images folder holds no NIfTI") as ei:
        convert_flare22(layout, tmp_path / "raw", 11)
    assert str(tmp_path / "unl") in str(ei.value)
    assert not (tmp_path / "raw").exists()


def test_bad_parameters(flare, tmp_path):
    for kw, frag in [(dict(link="move"), "link"), (dict(dataset_id=1000), "dataset_id"),
                     (dict(dataset_name="a b"), "dataset_name")]:
        args = dict(dataset_id=1, **kw) if "dataset_id" not in kw else kw
        with pytest.raises(FlareInputError, match=frag):
            convert_flare22(flare, tmp_path / "raw", **args)
    assert not (tmp_path / "raw").exists()


def test_failure_midway_in_parallel_leaves_no_target(flare, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "keep.txt").write_text("user file")
    _gz_truncate(flare / "Training" / "FLARE22_UnlabeledCase" / "Case_00002_0000.nii.gz")
    before = snapshot(flare)
    with pytest.raises(FlareInputError, match="Case_00002_0000.nii.gz"):
        convert_flare22(flare, raw, 512, processes=2)
    assert leftovers(raw) == ["keep.txt"]  # no target, no .partial folder
    assert snapshot(flare) == before


def test_failed_overwrite_keeps_previous_dataset(flare, tmp_path):
    raw = tmp_path / "raw"
    good = convert_flare22(flare, raw, 513)
    before = snapshot(good.dataset_dir)
    _garbage(flare / LAB / "labels" / "FLARE22_Tr_0003.nii.gz")
    with pytest.raises(FlareInputError, match="FLARE22_Tr_0003.nii.gz"):
        convert_flare22(flare, raw, 513, overwrite=True)
    assert snapshot(good.dataset_dir) == before
    assert leftovers(raw) == ["Dataset513_FLARE22"]
