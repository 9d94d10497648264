"""DICOM CT series -> NIfTI (flare_utils.data.dicom), on synthetic series written with pydicom and the real one."""
from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from flare_utils.data.dicom import dicom_series_to_nifti, list_dicom_series, read_dicom_series
from flare_utils.errors import FlareInputError

ROWS, COLS = 3, 5                     # non-square, so a transposition shows
PS = (0.8, 0.6)                       # PixelSpacing: (row spacing, column spacing)
ANGLE = math.radians(30)
ROW_DIR = np.array([math.cos(ANGLE), math.sin(ANGLE), 0.0])
COL_DIR = np.array([-math.sin(ANGLE), math.cos(ANGLE), 0.0])
NORMAL = np.cross(ROW_DIR, COL_DIR)
ORIGIN = np.array([-100.0, 50.0, 20.0])
SPACING = 2.5
LPS2RAS = np.diag([-1.0, -1.0, 1.0])


def slice_pixels(k: int) -> np.ndarray:
    return (np.arange(ROWS * COLS, dtype=np.uint16).reshape(ROWS, COLS) * 10 + 1000 + 100 * k)


def write_slice(path: Path, k: float, *, series_uid: str, pixels=None, slope=1.0, intercept=-1024.0,
                position=None, iop=None, instance=1, thickness=5.0):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = f"synthetic {series_uid[-4:]}"
    ds.InstanceNumber = instance
    pixels = slice_pixels(int(k)) if pixels is None else pixels
    ds.Rows, ds.Columns = pixels.shape
    pos = ORIGIN + k * SPACING * NORMAL if position is None else np.asarray(position)
    ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (iop if iop is not None else [*ROW_DIR, *COL_DIR])]
    ds.PixelSpacing = list(PS)
    ds.SliceThickness = thickness
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


# file names deliberately not in slice order, instance numbers reversed
NAMES = ["IMG_c.dcm", "IMG_a.dcm", "IMG_d.dcm", "IMG_b.dcm"]


def make_series(folder: Path, n=4, uid="1.2.826.0.1.3680043.8.498.1", **kw) -> Path:
    for k in range(n):
        write_slice(folder / NAMES[k % len(NAMES)].replace(".dcm", f"{k // len(NAMES) or ''}.dcm"), k,
                    series_uid=uid, instance=n - k, **kw)
    return folder


def expected_ras(i, j, k, spacing=SPACING):
    lps = ORIGIN + k * spacing * NORMAL + i * PS[1] * ROW_DIR + j * PS[0] * COL_DIR
    return LPS2RAS @ lps


def test_synthetic_series_order_geometry_and_hu(tmp_path):
    folder = make_series(tmp_path / "s")
    vol, aff = read_dicom_series(folder)
    assert vol.shape == (COLS, ROWS, 4) and vol.dtype == np.int16
    for k in range(4):
        assert np.array_equal(vol[:, :, k], slice_pixels(k).T.astype(np.int32) - 1024)
    for ijk in [(0, 0, 0), (COLS - 1, 0, 0), (0, ROWS - 1, 0), (0, 0, 3), (COLS - 1, ROWS - 1, 3)]:
        assert np.allclose(aff @ [*ijk, 1], [*expected_ras(*ijk), 1], atol=1e-5)
    assert np.allclose(np.linalg.norm(aff[:3, :3], axis=0), [PS[1], PS[0], SPACING], atol=1e-6)


def test_float_rescale_and_per_slice_intercept(tmp_path):
    folder = tmp_path / "f"
    for k in range(3):
        write_slice(folder / f"s{k}.dcm", k, series_uid="1.2.3.4", slope=0.5, intercept=-1000 - k)
    vol, _ = read_dicom_series(folder)
    assert vol.dtype == np.float32
    for k in range(3):
        assert np.allclose(vol[:, :, k], slice_pixels(k).T * 0.5 - 1000 - k)


def test_reversed_normal_and_spacing_not_from_thickness(tmp_path):
    # positions walk against the normal; the output still starts at the lowest position
    folder = tmp_path / "r"
    for k in range(3):
        write_slice(folder / f"x{k}.dcm", -k * 0.8, series_uid="1.2.3.5", pixels=slice_pixels(k), thickness=9.0)
    vol, aff = read_dicom_series(folder)
    assert np.allclose(aff[:3, 3], LPS2RAS @ (ORIGIN - 1.6 * SPACING * NORMAL), atol=1e-5)
    assert np.isclose(np.linalg.norm(aff[:3, 2]), 0.8 * SPACING)
    assert np.array_equal(vol[:, :, 0], slice_pixels(2).T.astype(np.int32) - 1024)


def test_missing_slice(tmp_path):
    folder = make_series(tmp_path / "m", n=5)
    (folder / "IMG_d.dcm").unlink()   # k = 2
    with pytest.raises(FlareInputError, match="1 slice\\(s\\) missing") as ei:
        read_dicom_series(folder)
    msg = str(ei.value)
    assert "IMG_a.dcm" in msg and "IMG_b.dcm" in msg


def test_duplicate_slice(tmp_path):
    folder = make_series(tmp_path / "d")
    write_slice(folder / "copy.dcm", 2, series_uid="1.2.826.0.1.3680043.8.498.1")
    with pytest.raises(FlareInputError, match="duplicate slice") as ei:
        read_dicom_series(folder)
    assert "copy.dcm" in str(ei.value) and "IMG_d.dcm" in str(ei.value)


def test_non_uniform_spacing(tmp_path):
    folder = make_series(tmp_path / "n")
    write_slice(folder / "IMG_b.dcm", 3.4, series_uid="1.2.826.0.1.3680043.8.498.1", pixels=slice_pixels(3))
    with pytest.raises(FlareInputError, match="non-uniform slice spacing") as ei:
        read_dicom_series(folder)
    assert "IMG_b.dcm" in str(ei.value)
    # jitter within the documented tolerance (0.05 mm + 1 %) is accepted
    write_slice(folder / "IMG_b.dcm", 3 + 0.04 / SPACING, series_uid="1.2.826.0.1.3680043.8.498.1",
                pixels=slice_pixels(3))
    assert read_dicom_series(folder)[0].shape[2] == 4


def test_tilted_stack_and_orientation_mismatch(tmp_path):
    folder = make_series(tmp_path / "t")
    write_slice(folder / "IMG_b.dcm", 3, series_uid="1.2.826.0.1.3680043.8.498.1",
                position=ORIGIN + 3 * SPACING * NORMAL + 2.0 * ROW_DIR)
    with pytest.raises(FlareInputError, match="sideways") as ei:
        read_dicom_series(folder)
    assert "IMG_b.dcm" in str(ei.value)
    write_slice(folder / "IMG_b.dcm", 3, series_uid="1.2.826.0.1.3680043.8.498.1", iop=[1, 0, 0, 0, 1, 0])
    with pytest.raises(FlareInputError, match="ImageOrientationPatient") as ei:
        read_dicom_series(folder)
    assert "IMG_b.dcm" in str(ei.value)


def test_several_series(tmp_path):
    folder = make_series(tmp_path / "two", uid="1.2.3.100")
    for k in range(2):
        write_slice(folder / f"other{k}.dcm", k, series_uid="1.2.3.200")
    with pytest.raises(FlareInputError, match="2 DICOM series") as ei:
        read_dicom_series(folder)
    assert "1.2.3.100 (4 files" in str(ei.value) and "1.2.3.200 (2 files" in str(ei.value)
    assert read_dicom_series(folder, series_uid="1.2.3.200")[0].shape == (COLS, ROWS, 2)
    assert read_dicom_series(folder, series_uid="1.2.3.100")[0].shape == (COLS, ROWS, 4)
    with pytest.raises(FlareInputError, match="no series"):
        read_dicom_series(folder, series_uid="9.9")
    assert sorted(list_dicom_series(folder)) == ["1.2.3.100", "1.2.3.200"]


def test_non_dicom_and_non_image_files(tmp_path):
    folder = make_series(tmp_path / "x")
    (folder / ".DS_Store").write_bytes(b"\x00\x01junk")       # hidden: skipped
    # a DICOM file without image data (like DICOMDIR): skipped
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.PatientName = "x"
    ds.save_as(str(folder / "DICOMDIR"), enforce_file_format=True)
    # a structured report (a known non-image class) under any name: skipped too
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.save_as(str(folder / "report.dcm"), enforce_file_format=True)
    assert read_dicom_series(folder)[0].shape == (COLS, ROWS, 4)
    (folder / "notes.txt").write_text("these are not DICOM slices\n" * 10)
    with pytest.raises(FlareInputError, match="not a DICOM file") as ei:
        read_dicom_series(folder)
    assert "notes.txt" in str(ei.value)


@pytest.mark.parametrize("keep", [0.5, -12], ids=["header_cut", "pixels_cut"])
def test_truncated_file(tmp_path, keep):
    folder = make_series(tmp_path / "tr")
    raw = (folder / "IMG_b.dcm").read_bytes()
    (folder / "IMG_b.dcm").write_bytes(raw[: int(len(raw) * keep)] if keep > 0 else raw[:keep])
    with pytest.raises(FlareInputError, match="incomplete DICOM image header|pixel data unreadable") as ei:
        read_dicom_series(folder)
    assert "IMG_b.dcm" in str(ei.value)


def test_empty_and_single_slice(tmp_path):
    (tmp_path / "e").mkdir()
    with pytest.raises(FlareInputError, match="no DICOM image"):
        read_dicom_series(tmp_path / "e")
    with pytest.raises(FlareInputError, match="missing"):
        read_dicom_series(tmp_path / "nope")
    write_slice(tmp_path / "one" / "a.dcm", 0, series_uid="1.2")
    with pytest.raises(FlareInputError, match="single slice"):
        read_dicom_series(tmp_path / "one")


def test_to_nifti_atomic(tmp_path):
    folder = make_series(tmp_path / "s")
    out = dicom_series_to_nifti(folder, tmp_path / "out" / "ct.nii.gz")
    img = nib.load(str(out))
    vol, aff = read_dicom_series(folder)
    assert np.allclose(img.affine, aff, atol=1e-5) and img.get_data_dtype() == np.int16
    assert np.array_equal(np.asarray(img.dataobj), vol)
    assert img.header.get_xyzt_units()[0] == "mm"
    (folder / "IMG_a.dcm").unlink()   # k = 1: a missing slice
    with pytest.raises(FlareInputError):
        dicom_series_to_nifti(folder, tmp_path / "out" / "ct2.nii.gz")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ct.nii.gz"]


def test_real_series(real_dicom_series, tmp_path):
    out = dicom_series_to_nifti(real_dicom_series, tmp_path / "real.nii.gz")
    img = nib.load(str(out))
    vol = np.asarray(img.dataobj)
    aff = img.affine
    files = sorted(real_dicom_series.iterdir())
    assert vol.shape == (512, 512, len(files)) and vol.dtype == np.int16

    # the tags, read independently
    dss = [pydicom.dcmread(str(f)) for f in files]
    iop = np.array([float(v) for v in dss[0].ImageOrientationPatient])
    ps = [float(v) for v in dss[0].PixelSpacing]
    normal = np.cross(iop[:3], iop[3:])
    dss.sort(key=lambda d: float(np.dot(normal, [float(v) for v in d.ImagePositionPatient])))
    ipp = np.array([[float(v) for v in d.ImagePositionPatient] for d in dss])
    gaps = np.diff(ipp @ normal)
    assert np.allclose(gaps, gaps[0])
    thickness = float(dss[0].SliceThickness)
    assert not np.isclose(gaps[0], thickness)                       # 2 mm apart, 3 mm thick
    assert np.isclose(np.linalg.norm(aff[:3, 2]), gaps[0], atol=1e-4)
    for k, d in enumerate(dss):
        # voxel (i, j, k) sits at IPP_k + i * col spacing * row dir + j * row spacing * col dir (LPS)
        for i, j in [(0, 0), (511, 0), (0, 511), (300, 200)]:
            lps = ipp[k] + i * ps[1] * iop[:3] + j * ps[0] * iop[3:]
            assert np.allclose(aff @ [i, j, k, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-3)
        hu = d.pixel_array.astype(np.int32) * float(d.RescaleSlope) + float(d.RescaleIntercept)
        assert np.array_equal(vol[:, :, k], hu.T)

    assert -1100 <= vol.min() <= -900 and 500 <= vol.max() <= 3100
    body = vol[200:312, 200:312, :]
    assert -200 < np.median(body) < 200                               # soft tissue inside the body


def test_real_series_matches_simpleitk(real_dicom_series):
    sitk = pytest.importorskip("SimpleITK")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(real_dicom_series)))
    ref = reader.Execute()
    vol, aff = read_dicom_series(real_dicom_series)
    ref_arr = sitk.GetArrayFromImage(ref)               # (k, j, i)
    assert np.array_equal(vol, ref_arr.transpose(2, 1, 0))
    direction = np.array(ref.GetDirection()).reshape(3, 3)
    ref_aff = np.eye(4)
    ref_aff[:3, :3] = direction * np.array(ref.GetSpacing())
    ref_aff[:3, 3] = ref.GetOrigin()
    assert np.allclose(np.diag([-1, -1, 1, 1]) @ ref_aff, aff, atol=1e-4)
