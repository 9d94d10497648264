"""The FLARE22 recipe rehearsed at full resolution (params/rehearsal.yaml): every stage on
clinical-size CTs within 12 GiB of RAM per stage, predictions on each held-out case's own grid.

About 50 minutes on 2 CPU cores, so `slow` (not in CI's default run):
    bash scripts/test.sh -m slow tests/test_rehearsal.py
Its per-stage time and memory are the figures of docs/rehearsal.md.
"""
import json
from pathlib import Path

import nibabel as nib
import pandas as pd
import pytest

from flare_utils.study.params import load_params
from flare_utils.study.runner import run_study

PROJECT = Path(__file__).resolve().parents[1]
PARAMS = PROJECT / "params" / "rehearsal.yaml"
RAM_LIMIT_MIB = 12 * 1024
MODELS = ("teacher", "teacher_pseudo", "student_selected", "student_labelled_only", "student_all")


@pytest.mark.slow
def test_rehearsal_runs_every_stage_at_full_resolution_within_12_gib(tmp_path):
    run_dir = tmp_path / "rehearsal"
    results = run_study(PARAMS, run_dir=run_dir, log=print)
    assert [r.status for r in results] == ["done"] * len(results)
    stages = json.loads((run_dir / "stages.json").read_text())
    for s in stages:
        print(f"{s['unit']:<24} {s['seconds']:8.1f} s {s['peak_ram_mib'] / 1024:6.2f} GiB")
    over = {s["unit"]: s["peak_ram_mib"] for s in stages if not s["peak_ram_mib"] < RAM_LIMIT_MIB}
    assert not over, f"stages above 12 GiB of RAM (MiB): {over}"

    params = load_params(PARAMS)
    raw = run_dir / "nnUNet_raw" / f"Dataset{params.data.dataset_id:03d}_{params.data.dataset_name}"
    images = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))
    assert len(images) == params.data.phantom.n_validation
    for image in images:          # clinical size: 512 x 512, sub-millimetre in-plane
        img = nib.load(image)
        assert img.shape[:2] == (512, 512) and max(img.header.get_zooms()[:2]) <= 1.0
    # the plans kept the recipe's geometry (only the widths were cut) and nnU-Net planned ResEnc M
    summary = json.loads(next((run_dir / "nnUNet_preprocessed").glob("*/flare_plans_summary.json")).read_text())
    assert summary["accurate_rehearsal"]["patch_size"] == [48, 224, 224]
    assert summary["accurate_rehearsal"]["spacing"] == [2.5, 0.8, 0.8]
    assert summary["efficient_rehearsal"]["patch_size"] == [32, 128, 192]
    assert summary["resenc_m"]["network"] == "ResidualEncoderUNet"

    # three pseudo-label rounds over every unlabelled case, then the selection
    for k in (1, 2, 3):
        labels = list((run_dir / "pseudo_labels" / f"round_{k:02d}").glob("*.nii.gz"))
        assert len(labels) == params.data.phantom.n_unlabelled, k
    selection = json.loads((run_dir / "selection" / "selection.json").read_text())
    assert 0 < len(selection["cases"]) < params.data.phantom.n_unlabelled

    # every model predicted every held-out case, on that case's own grid, and was scored
    for name in MODELS:
        for image in images:
            pred = nib.load(run_dir / "inference" / name / image.name.replace("_0000", ""))
            ref = nib.load(image)
            assert pred.shape == ref.shape, name
            assert abs(pred.affine - ref.affine).max() < 1e-3, name
    overview = pd.read_csv(run_dir / "evaluation" / "overview.csv")
    assert sorted(overview["set"]) == sorted(MODELS) and (overview["cases"] == len(images)).all()
    page = (run_dir / "index.html").read_text()
    assert "<th>peak RAM</th>" in page
