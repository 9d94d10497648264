"""Issue 15: clear errors everywhere, sources never modified (data conversion, I/O, evaluation, CLI)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from flare_utils.data import io
from flare_utils.errors import FlareInputError


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flare_utils", *map(str, args)], capture_output=True, text=True)


def _save(arr, path: Path, spacing=(1.0, 1.0, 2.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr), np.diag([*spacing, 1.0])), str(path))
    return path


def _mask_folder(d: Path) -> Path:
    liver = np.zeros((8, 8, 4), np.uint8)
    liver[1:5, 1:5] = 1
    spleen = np.zeros((8, 8, 4), np.uint8)
    spleen[5:7, 5:7] = 1
    _save(liver, d / "liver.nii.gz")
    _save(spleen, d / "spleen.nii.gz")
    return d


def _series(d: Path) -> Path:
    from tests.test_dicom import make_series
    return make_series(d)


# ------------------------------------------------------------------ 1. sources are never modified

def test_convert_masks_refuses_output_inside_the_mask_folder(tmp_path):
    from flare_utils.data.multimask import convert_mask_folder
    d = _mask_folder(tmp_path / "masks")
    before = (d / "liver.nii.gz").read_bytes()
    for out in (d / "liver.nii.gz", d / "labels.nii.gz", d / "sub" / "labels.nii.gz"):
        with pytest.raises(FlareInputError, match="inside the mask folder") as ei:
            convert_mask_folder(d, out, overwrite=True)
        assert ei.value.path == out
    assert (d / "liver.nii.gz").read_bytes() == before
    assert sorted(p.name for p in d.iterdir()) == ["liver.nii.gz", "spleen.nii.gz"]
    # the same through a symbolic link to the mask folder
    (tmp_path / "link").symlink_to(d)
    with pytest.raises(FlareInputError, match="inside the mask folder"):
        convert_mask_folder(tmp_path / "link", d / "spleen.nii.gz", overwrite=True)
    r = _cli("convert", "masks", d, d / "liver.nii.gz", "--overwrite")
    assert r.returncode == 2 and "liver.nii.gz" in r.stderr and "Traceback" not in r.stderr
    assert (d / "liver.nii.gz").read_bytes() == before


def test_convert_masks_and_dicom_replace_outputs_only_with_overwrite(tmp_path):
    from flare_utils.data.dicom import dicom_series_to_nifti
    from flare_utils.data.multimask import convert_mask_folder
    d = _mask_folder(tmp_path / "masks")
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"keep me")
    with pytest.raises(FlareInputError, match="already exists.*overwrite=True.*--overwrite") as ei:
        convert_mask_folder(d, out)
    assert ei.value.path == out and out.read_bytes() == b"keep me"
    convert_mask_folder(d, out, overwrite=True)
    assert io.read_array(out)[0].max() == 3            # spleen
    r = _cli("convert", "masks", d, out)
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert _cli("convert", "masks", d, out, "--overwrite").returncode == 0

    s = _series(tmp_path / "series")
    ct = tmp_path / "ct.nii.gz"
    ct.write_bytes(b"keep me")
    with pytest.raises(FlareInputError, match="already exists"):
        dicom_series_to_nifti(s, ct)
    assert ct.read_bytes() == b"keep me"
    r = _cli("convert", "dicom", s, ct)
    assert r.returncode == 2 and "--overwrite" in r.stderr and ct.read_bytes() == b"keep me"
    r = _cli("convert", "dicom", s, ct, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert io.read_array(ct)[0].shape == (5, 3, 4)


def test_convert_dicom_refuses_output_inside_the_series_folder(tmp_path):
    from flare_utils.data.dicom import dicom_series_to_nifti
    s = _series(tmp_path / "series")
    names = sorted(p.name for p in s.iterdir())
    for out in (s / "ct.nii.gz", s / "sub" / "ct.nii.gz"):
        with pytest.raises(FlareInputError, match="inside the DICOM series folder") as ei:
            dicom_series_to_nifti(s, out, overwrite=True)
        assert ei.value.path == out
    assert sorted(p.name for p in s.iterdir()) == names


def test_convert_flare22_refuses_raw_root_inside_the_source_root_or_the_reverse(tmp_path):
    from flare_utils.data.convert import convert_flare22
    from flare_utils.synthetic.phantom import write_cohort
    cohort = tmp_path / "cohort"
    write_cohort(cohort, 1, 0, 0, seed=0, preset="tiny")
    with pytest.raises(FlareInputError, match="inside the FLARE22 source") as ei:
        convert_flare22(cohort, cohort / "raw", 1)
    assert ei.value.path == cohort / "raw"
    assert not (cohort / "raw").exists()
    with pytest.raises(FlareInputError, match="inside"):
        convert_flare22(cohort, tmp_path, 1)           # the source root lies inside the raw root
    with pytest.raises(FlareInputError, match="inside"):
        convert_flare22(cohort, cohort, 1)
    assert not list(tmp_path.glob("Dataset*")) and not list(cohort.glob("Dataset*"))


# ------------------------------------------------------------------ 2. case ids

def test_case_ids_strip_only_the_channel_suffix_0000():
    assert io.case_id_from_path("patient_0001.nii.gz", channel_suffix=True) == "patient_0001"
    assert io.case_id_from_path("patient_0002.nii", channel_suffix=True) == "patient_0002"
    assert io.case_id_from_path("patient_0001_0000.nii.gz", channel_suffix=True) == "patient_0001"
    assert io.case_id_from_path("_0000.nii.gz", channel_suffix=True) == "_0000"
    assert io.case_id_from_path("patient_0000.nii.gz") == "patient_0000"


def test_folder_ids_do_not_collide_on_numbered_names(tmp_path):
    for name in ("patient_0001.nii.gz", "patient_0002.nii.gz", "ct_0000.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    assert list(io.nifti_by_case(tmp_path, channel_suffix=True)) == ["ct", "patient_0001", "patient_0002"]


# ------------------------------------------------------------------ 3. silently accepted data

def test_inference_refuses_an_image_with_nan_voxels(tmp_path):
    from flare_utils.inference.images import read_image
    arr = np.zeros((6, 6, 4), np.float32)
    good = _save(arr, tmp_path / "good.nii.gz")
    assert read_image(good).array.shape == (6, 6, 4)
    arr[2, 3, 1] = np.nan
    bad = _save(arr, tmp_path / "bad.nii.gz")
    with pytest.raises(FlareInputError, match="NaN") as ei:
        read_image(bad)
    assert ei.value.path == bad
    arr[2, 3, 1] = np.inf
    with pytest.raises(FlareInputError, match="infinite"):
        read_image(_save(arr, tmp_path / "inf.nii.gz"))


def _eval_folders(tmp_path, pred_extra=None, gt_extra=None):
    gt = np.zeros((10, 10, 6), np.uint8)
    gt[2:6, 2:6, 1:5] = 1
    gt[6:9, 6:9, 1:5] = 2
    pred = gt.copy()
    if pred_extra is not None:
        pred[0, 0, 0] = pred_extra
    g = gt.copy()
    if gt_extra is not None:
        g[9, 9, 5] = gt_extra
    _save(g, tmp_path / "gt" / "c1.nii.gz")
    _save(gt, tmp_path / "gt" / "c2.nii.gz")
    _save(pred, tmp_path / "pred" / "c1.nii.gz")
    _save(gt, tmp_path / "pred" / "c2.nii.gz")
    return tmp_path / "pred", tmp_path / "gt"


def test_evaluate_warns_counts_and_can_refuse_unknown_labels(tmp_path):
    from flare_utils.evaluation.evaluate import SUMMARY_NAME, evaluate_folders
    clean = evaluate_folders(*_eval_folders(tmp_path / "clean"), processes=1)
    assert clean.summary["n_cases_with_unknown_labels"] == 0 and clean.summary["unknown_label_values"] == []
    pdir, gdir = _eval_folders(tmp_path / "noisy", pred_extra=20, gt_extra=99)
    with pytest.warns(UserWarning, match="outside 0-13"):
        res = evaluate_folders(pdir, gdir, tmp_path / "out", processes=1)
    # scored as the official script does (unknown values are background): same numbers as the clean run
    assert res.summary["mean_dsc"] == pytest.approx(clean.summary["mean_dsc"])
    summary = json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())
    assert summary["n_cases_with_unknown_labels"] == 1
    assert summary["unknown_label_values"] == [20, 99]
    assert summary["cases_with_unknown_labels"] == ["c1"]
    with pytest.raises(FlareInputError, match="outside 0-13") as ei:
        evaluate_folders(pdir, gdir, processes=1, strict=True)
    assert ei.value.path.name == "c1.nii.gz"
    r = _cli("evaluate", pdir, gdir, "--processes", 1, "--strict")
    assert r.returncode == 2 and "c1.nii.gz" in r.stderr and "Traceback" not in r.stderr
    r = _cli("evaluate", pdir, gdir, "--processes", 1)
    assert r.returncode == 0 and "outside 0-13" in r.stderr


def test_convert_refuses_a_dangling_symlink(tmp_path):
    from flare_utils.data.convert import convert_flare22
    from flare_utils.synthetic.phantom import write_cohort
    cohort = tmp_path / "cohort"
    write_cohort(cohort, 2, 0, 0, seed=0, preset="tiny")
    images = next(cohort.rglob("images"))
    victim = sorted(images.iterdir())[0]
    link = images / ("link_" + victim.name)
    link.symlink_to(tmp_path / "gone.nii.gz")
    with pytest.raises(FlareInputError, match="dangling") as ei:
        convert_flare22(cohort, tmp_path / "raw", 3)
    assert ei.value.path == link


# ------------------------------------------------------------------ 4. messages, not tracebacks

def test_empty_nifti_file_is_a_named_error(tmp_path):
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    for read in (io.load_nifti, io.read_array, io.read_label_map):
        with pytest.raises(FlareInputError, match="empty") as ei:
            read(empty)
        assert ei.value.path == empty
    from flare_utils.inference.images import read_image
    with pytest.raises(FlareInputError, match="empty"):
        read_image(empty)
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt" / "c.nii.gz").write_bytes(b"")
    _save(np.zeros((4, 4, 4), np.uint8), tmp_path / "pred" / "c.nii.gz")
    r = _cli("evaluate", tmp_path / "pred", tmp_path / "gt", "--processes", 1)
    assert r.returncode == 2 and "c.nii.gz" in r.stderr and "Traceback" not in r.stderr


def test_writers_refuse_a_non_nifti_name(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)
    ref = nib.Nifti1Image(arr, np.eye(4))
    for write in (lambda p: io.save_nifti(arr, np.eye(4), p), lambda p: io.save_nifti_like(arr, ref, p),
                  lambda p: io.save_nifti_planes_like(iter(arr.T), arr.shape, np.uint8, ref, p)):
        out = tmp_path / "labels.png"
        with pytest.raises(FlareInputError, match=r"\.nii\.gz") as ei:
            write(out)
        assert ei.value.path == out and not out.exists()
    assert list(tmp_path.iterdir()) == []
    d = _mask_folder(tmp_path / "masks")
    r = _cli("convert", "masks", d, tmp_path / "labels.mha")
    assert r.returncode == 2 and "labels.mha" in r.stderr and "Traceback" not in r.stderr
    s = _series(tmp_path / "series")
    r = _cli("convert", "dicom", s, tmp_path / "ct.nrrd")
    assert r.returncode == 2 and "ct.nrrd" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "labels.mha").exists() and not (tmp_path / "ct.nrrd").exists()


# ------------------------------------------------------------------ 5. the command line names its flags

def test_cli_messages_name_flags(tmp_path):
    pdir, gdir = _eval_folders(tmp_path)
    os.remove(pdir / "c2.nii.gz")
    r = _cli("evaluate", pdir, gdir, "--processes", 1)
    assert r.returncode == 2 and "--allow-missing" in r.stderr
    r = _cli("evaluate", pdir, gdir, "--processes", 1, "--allow-missing")
    assert r.returncode == 0, r.stderr
    soft = _mask_folder(tmp_path / "soft")
    _save(np.full((8, 8, 4), 0.5, np.float32), soft / "spleen.nii.gz")
    r = _cli("convert", "masks", soft, tmp_path / "l.nii.gz")
    assert r.returncode == 2 and "--threshold" in r.stderr


def test_api_segment_docstring_names_the_single_file_rule():
    from flare_utils.api import segment
    assert "_0000" in segment.__doc__
