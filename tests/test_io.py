"""flare_utils.data.io's gzip path (ISA-L when installed): standard files, exact data, clear errors."""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from flare_utils.data import io
from flare_utils.errors import FlareInputError


def _image(dtype=np.int16, shape=(20, 18, 7)):
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 1500, size=shape).astype(dtype)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [-10, 5, 30]
    return data, affine


@pytest.mark.parametrize("name", ["a.nii.gz", "a.nii"])
def test_written_files_are_standard_nifti_with_exact_data(tmp_path, name):
    data, affine = _image()
    out = io.save_nifti(data, affine, tmp_path / name)
    ref = nib.load(str(out))                          # nibabel's own reader (zlib)
    assert np.array_equal(np.asanyarray(ref.dataobj), data) and np.allclose(ref.affine, affine)
    if name.endswith(".gz"):
        assert gzip.decompress(out.read_bytes())[:4] == (348).to_bytes(4, "little")
    img, arr = io.read_nifti(out)
    assert np.array_equal(arr, data) and np.allclose(img.affine, affine)


def test_gzip_output_is_deterministic(tmp_path):
    data, affine = _image()
    a = io.save_nifti(data, affine, tmp_path / "a.nii.gz").read_bytes()
    b = io.save_nifti(data, affine, tmp_path / "b.nii.gz").read_bytes()
    assert a == b                                     # no file name or time in the gzip header


def test_unscaled_read_keeps_stored_values(tmp_path):
    data, affine = _image()
    img = nib.Nifti1Image(data, affine)
    img.header.set_slope_inter(2.0, -5.0)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    im, raw = io.read_nifti(tmp_path / "s.nii.gz", unscaled=True)
    assert raw.dtype == np.int16 and np.array_equal(raw, data)
    assert im.dataobj.slope == 2.0 and im.dataobj.inter == -5.0
    _, scaled = io.read_nifti(tmp_path / "s.nii.gz")
    assert np.allclose(scaled, data * 2.0 - 5.0)


def test_truncated_gzip_names_the_file(tmp_path):
    data, affine = _image()
    out = io.save_nifti(data, affine, tmp_path / "t.nii.gz")
    out.write_bytes(out.read_bytes()[: len(out.read_bytes()) // 2])
    with pytest.raises(FlareInputError) as e:
        io.load_nifti(out)
    assert "t.nii.gz" in str(e.value) and "truncated" in str(e.value)


def test_nifti2_gz_is_read(tmp_path):
    data, affine = _image(np.float32)
    nib.save(nib.Nifti2Image(data, affine), str(tmp_path / "n2.nii.gz"))
    img, arr = io.read_nifti(tmp_path / "n2.nii.gz")
    assert isinstance(img, nib.Nifti2Image) and np.array_equal(arr, data)


def test_corrupt_gzip_is_an_input_error(tmp_path):
    data, affine = _image()
    out = io.save_nifti(data, affine, tmp_path / "c.nii.gz")
    blob = bytearray(out.read_bytes())
    blob[len(blob) // 2:len(blob) // 2 + 64] = bytes(64)     # damage the deflate stream
    out.write_bytes(bytes(blob))
    with pytest.raises(FlareInputError) as e:
        io.load_nifti(out)
    assert "c.nii.gz" in str(e.value)
