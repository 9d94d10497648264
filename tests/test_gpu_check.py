"""benchmarks/gpu_check.py (scripts/gpu_check.sh): the GPU readiness check, run here as a CPU dry run.

The dry run goes through every step the check takes on a CUDA machine (tiny cohort -> plans -> the
teacher and student trainers' short runs and timed train steps -> efficient inference fp32 vs fp16 ->
ResourceMonitor -> the study's inference stage) and its output files are checked field by field.
nnU-Net's ResEnc M training is left out here (`--no-resenc`: a 26M-parameter network costs seconds per
step on 2 cores; test_plans.py trains one)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PROJECT = Path(__file__).resolve().parents[1]
SCRIPT = PROJECT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(PROJECT / "benchmarks"))
import gpu_check  # noqa: E402


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_") and k != "FLARE_TRAINING_CONFIG"}
    # on a CPU shared with other jobs OpenMP's spin-waiting makes the tiny networks 5-10x slower
    env.update(OMP_WAIT_POLICY="PASSIVE", FLARE_SKIP_SETUP="1", PYTHONHASHSEED="0")
    env.setdefault("FLARE_VENV", sys.prefix)       # the environment running these tests
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    p = subprocess.run([sys.executable, str(SCRIPT), str(out), "--device", "cpu", "--no-resenc", "--iterations", "1",
                        "--steps", "2", "--repeats", "1", "--processes", "1", "--threads", "2"],
                       cwd=PROJECT, env=_env(), capture_output=True, text=True, timeout=600)
    return out, p


def test_cpu_dry_run_passes_every_step(dry_run):
    out, p = dry_run
    assert p.returncode == gpu_check.EXIT_OK, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads((out / gpu_check.JSON_NAME).read_text())
    assert r["status"] == "ok" and r["device"] == "cpu" and r["dry_run"] is True and r["failed_steps"] == []
    assert list(r["steps"]) == ["data", "training", "inference", "monitor", "smoke_inference"]
    assert all(s["status"] == "ok" and s["seconds"] >= 0 for s in r["steps"].values())
    assert r["exit_codes"] == {"ok": 0, "failed": 1, "usage": 2, "no_cuda": 3}
    env = r["environment"]
    assert env["torch"] and env["nnunetv2"] == "2.8.1" and "cuda_available" in env


def test_dry_run_training_figures(dry_run):
    out, _ = dry_run
    r = json.loads((out / gpu_check.JSON_NAME).read_text())
    plans = r["steps"]["data"]["figures"]["plans"]
    assert set(plans) == {"teacher", "student"} and plans["teacher"]["network"] == "PlainConvUNet"
    tr = r["steps"]["training"]["figures"]
    assert {t["trainer"] for t in tr.values()} == {"FlareTeacherTrainer", "FlareStudentTrainer"}
    for role, t in tr.items():
        assert Path(t["results"], "fold_all", "checkpoint_final.pth").is_file()
        assert t["fp16_autocast"] is False                    # nnU-Net's autocast + GradScaler are CUDA-only
        assert t["loss_finite"] and t["iterations"] == 1 and t["epoch_s"] > 0 and t["run_wall_s"] > 0
        assert t["peak_gpu_allocated_mib"] is None and t["monitor"]["gpu_mem_peak_mib"] is None
        st = t["step"]
        assert st["steps"] == 2 and st["median_step_s"] > 0 and st["loss_finite"]
        assert st["parameters"] == plans[role]["parameters"]                  # the trainer's network = the plan's
        assert st["patch_size"] == plans[role]["patch_size"]


def test_dry_run_inference_figures(dry_run):
    out, _ = dry_run
    r = json.loads((out / gpu_check.JSON_NAME).read_text())
    inf = r["steps"]["inference"]["figures"]
    assert set(inf["precisions"]) == {"fp32", "fp16"}
    for prec, d in inf["precisions"].items():
        assert d["fp16_autocast_active"] is False and d["device"] == "cpu" and d["resampling_device"] == "cpu"
        assert d["mean_total_s"] > 0 and d["mean_network_s"] > 0
        assert len(d["cases"]) == 1 and d["cases"][0]["windows_evaluated"] > 0
        assert d["peak_gpu_allocated_mib"] is None and d["monitor_gpu_mem_peak_mib"] is None
    a = inf["fp16_vs_fp32"]                 # on the CPU both precisions are fp32: identical
    assert a["min_voxel_agreement"] == 1.0 and a["full_window_logits"]["max_abs_logit_diff"] == 0.0
    assert a["full_window_logits"]["argmax_agreement"] == 1.0
    mo = r["steps"]["monitor"]["figures"]
    assert mo["ok"] and mo["gpu_mem_peak_mib"] is None and mo["monitor_device"] == "cpu" and mo["samples"] >= 2
    sm = r["steps"]["smoke_inference"]["figures"]
    assert sm["source"] == "this check's teacher and student" and sm["models"] == ["teacher", "student"]
    assert sm["cases"] == 1 and sm["windows_evaluated"] > 0
    assert set(sm["mean_dsc_per_model"]) == {"teacher", "student"}
    for name in sm["models"]:
        assert len(list(Path(sm["output_dir"], name).glob("*.nii.gz"))) == 1
    md = (out / gpu_check.MD_NAME).read_text()
    for heading in ("# GPU check (ok)", "## Training", "## Efficient inference", "## GPU memory monitor",
                    "## Inference stage"):
        assert heading in md
    assert "FlareStudentTrainer" in md and "not measured" in md


def test_smoke_run_inputs_are_a_finished_studys_models_and_held_out_cases(dry_run, tmp_path):
    """--smoke-run: the models come from the study's models.json, the cases from its raw dataset."""
    import yaml
    out, _ = dry_run
    r = json.loads((out / gpu_check.JSON_NAME).read_text())
    tr = r["steps"]["training"]["figures"]
    run = tmp_path / "study"
    (run / "nnUNet_raw").mkdir(parents=True)
    raw = Path(r["steps"]["data"]["figures"]["raw_dataset"])
    (run / "nnUNet_raw" / raw.name).symlink_to(raw)
    (run / "params.yaml").write_text(yaml.safe_dump({"data": {"dataset_id": 979, "dataset_name": "GpuCheck"}}))
    (run / "models.json").write_text(json.dumps({
        "teacher": {"path": tr["teacher"]["results"], "folds": ["all"], "title": "t", "role": "teacher"},
        "student_selected": {"path": tr["student"]["results"], "folds": ["all"], "title": "s", "role": "student"}}))
    models, images, gt = gpu_check._smoke_run_inputs(run)
    assert models == {"teacher": {"path": tr["teacher"]["results"], "folds": ["all"]},
                      "student_selected": {"path": tr["student"]["results"], "folds": ["all"]}}
    assert images == run / "nnUNet_raw" / raw.name / "imagesTs" and len(list(images.glob("*.nii.gz"))) == 1
    assert gt == run / "nnUNet_raw" / raw.name / "labelsTs" and gt.is_dir()


def test_no_cuda_exits_with_its_own_code(tmp_path, monkeypatch, capsys):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([str(tmp_path / "out"), "--device", "cuda"]) == gpu_check.EXIT_NO_CUDA == 3
    assert "no CUDA device" in capsys.readouterr().err
    r = json.loads((tmp_path / "out" / gpu_check.JSON_NAME).read_text())
    assert r["status"] == "no_cuda" and r["steps"] == {} and "--device cpu" in r["message"]
    assert "no_cuda" in (tmp_path / "out" / gpu_check.MD_NAME).read_text()
    assert not (tmp_path / "out" / "work").exists()                          # nothing was run
    assert gpu_check.main([str(tmp_path / "bad"), "--device", "gpu"]) == gpu_check.EXIT_USAGE


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA device")
def test_shell_script_without_cuda(tmp_path):
    p = subprocess.run(["bash", str(PROJECT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")], cwd=PROJECT,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 3 and "no CUDA device" in p.stderr
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["status"] == "no_cuda"


def test_label_agreement():
    a = np.zeros((4, 4, 4), np.uint8)
    b = a.copy()
    a[:2] = 1
    b[:1] = 1
    share, dice = gpu_check._agreement(a, b)
    assert share == 0.75 and dice == pytest.approx(2 * 16 / (32 + 16))
    assert gpu_check._agreement(np.zeros(3), np.zeros(3)) == (1.0, None)
