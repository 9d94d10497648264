"""`flare-study` subcommands that are not covered elsewhere: phantom and convert."""
import json
import subprocess
import sys

import numpy as np

from flare_utils.data.io import read_array


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flare_utils", *map(str, args)],
                          capture_output=True, text=True)


def test_phantom_then_convert_flare22(tmp_path):
    cohort = tmp_path / "cohort"
    r = _cli("phantom", cohort, "--labelled", 2, "--unlabelled", 1, "--validation", 1, "--preset", "tiny")
    assert r.returncode == 0, r.stderr
    assert len(list((cohort / "Training" / "FLARE22_LabeledCase50" / "labels").glob("*.nii.gz"))) == 2
    r = _cli("convert", "flare22", cohort, tmp_path / "raw", "--id", 7, "--name", "Cli",
             "--summary", tmp_path / "summary")
    assert r.returncode == 0, r.stderr
    ds = tmp_path / "raw" / "Dataset007_Cli"
    assert json.loads((ds / "dataset.json").read_text())["numTraining"] == 2
    assert (tmp_path / "summary" / "summary.csv").exists()
    # a second conversion into the same place is refused with a clear message, not a traceback
    r = _cli("convert", "flare22", tmp_path / "missing", tmp_path / "raw", "--id", 8)
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr


def test_convert_masks_and_dicom_on_real_data(tmp_path, real_ct, real_dicom_series):
    out = tmp_path / "labels.nii.gz"
    r = _cli("convert", "masks", real_ct / "masks", out)
    assert r.returncode == 0, r.stderr
    lab, _ = read_array(out)
    liver, _ = read_array(real_ct / "masks" / "liver.nii.gz")
    assert int((lab == 1).sum()) == int(liver.sum())
    ct = tmp_path / "ct.nii.gz"
    r = _cli("convert", "dicom", real_dicom_series, ct)
    assert r.returncode == 0, r.stderr
    img, geom = read_array(ct)
    assert img.shape == (512, 512, 20) and np.isclose(geom.spacing[2], 2.0, atol=0.01)


def test_cohort_without_validation_cases_converts(tmp_path):
    from flare_utils.data.convert import convert_flare22
    from flare_utils.synthetic.phantom import write_cohort
    write_cohort(tmp_path / "c", 2, 0, 0, preset="tiny")
    res = convert_flare22(tmp_path / "c", tmp_path / "raw", 9, "NoVal")
    assert len(list((res.dataset_dir / "imagesTr").iterdir())) == 2
    assert not list((res.dataset_dir).glob("imagesTs/*.nii.gz"))
