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


# ---------------------------------------------------------------------------------- shared file helpers

def test_nifti_listing_skips_hidden_and_other_files(tmp_path):
    for name in ("b_0000.nii.gz", "a_0000.nii", "a.nii.gz", ".a.nii.gz.1f2e3d4c.tmp.nii.gz", "notes.txt",
                 "c_0001.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "d.nii.gz").mkdir()                     # a folder is not an image
    assert [p.name for p in io.list_nifti(tmp_path)] == ["a.nii.gz", "a_0000.nii", "b_0000.nii.gz", "c_0001.nii.gz"]
    assert [p.name for p in io.list_nifti(tmp_path, suffixes=("_0000.nii.gz", "_0000.nii"))] == \
        ["a_0000.nii", "b_0000.nii.gz"]
    assert list(io.nifti_by_case(tmp_path)) == ["a", "a_0000", "b_0000", "c_0001"]
    with pytest.raises(FlareInputError, match="'a' appears twice"):
        io.nifti_by_case(tmp_path, channel_suffix=True)     # a.nii.gz and a_0000.nii


def test_atomic_json_converts_numpy_and_paths(tmp_path):
    import json
    from pathlib import Path
    obj = {"i": np.int64(3), "f": np.float32(0.5), "b": np.bool_(True), "a": np.arange(3), "p": Path("x/y"),
           "t": (1, 2)}
    out = io.atomic_write_json(tmp_path / "sub" / "o.json", obj)
    assert json.loads(out.read_text()) == {"i": 3, "f": 0.5, "b": True, "a": [0, 1, 2], "p": "x/y", "t": [1, 2]}
    assert out.read_text() == json.dumps(json.loads(out.read_text()), indent=1)
    with pytest.raises(TypeError, match="not JSON serialisable"):
        io.atomic_write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists() and [p.name for p in tmp_path.iterdir()] == ["sub"]


def test_remove_stale_temporaries(tmp_path):
    (tmp_path / ".a.nii.gz.0123abcd.tmp.nii.gz").write_bytes(b"")
    (tmp_path / ".b.json.tmp").write_text("{")
    (tmp_path / ".hidden").write_text("kept")
    (tmp_path / "c.tmp.nii.gz").write_text("kept: not hidden")
    assert io.remove_stale_temporaries(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "c.tmp.nii.gz"]
    assert io.remove_stale_temporaries(tmp_path / "missing") == 0
