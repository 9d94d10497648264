"""GPU readiness check: the project's CUDA code paths, run and measured on a small synthetic study.

Usage::

    bash scripts/gpu_check.sh OUT_DIR                          # on a CUDA machine (exit 3 without one)
    bash scripts/gpu_check.sh OUT_DIR --scale demo --smoke     # demo-size cases, plus the smoke study on the GPU
    .venv/bin/python benchmarks/gpu_check.py OUT_DIR --device cpu --no-resenc   # CPU dry run of every code path

What runs, in one process, each step timed (on CUDA also `torch.cuda.max_memory_allocated` and the
project's `ResourceMonitor`, which reads device-wide GPU memory through NVML or torch):

1. data: a synthetic cohort (`flare_utils.synthetic.phantom`, preset by --scale: tiny, demo, or
   realistic for `full`), converted to an nnU-Net dataset and planned/preprocessed with the scale's
   teacher and student plans and nnU-Net's ResEnc M plans (--resenc);
2. training: `FlareTeacherTrainer` (teacher plans), `FlareStudentTrainer` (student plans) and
   `FlareTeacherTrainer` on the ResEnc plans: a real short run through `flare_utils.training.train`
   (one epoch of --iterations iterations: data loading and augmentation, nnU-Net's fp16 autocast and
   GradScaler on CUDA, checkpoint; whether the GradScaler ran is read back from the checkpoint), then
   --steps timed `train_step` calls on one fixed random batch (the network step alone);
3. inference: `EfficientPredictor` (efficient mode, no TTA) on the held-out cases with fp16 autocast
   and with fp32: time per phase, the device the resampling ran on, windows, GPU memory, and how far
   the fp16 labels agree with the fp32 ones (voxels, mean Dice over labels); on the first case also
   the logits of the full sliding window (max difference, argmax agreement). The check's models are
   barely trained (their labels are mostly background); --model RESULTS_DIR uses a trained nnU-Net
   results folder here instead;
4. monitor: `ResourceMonitor(gpu=True)` around a known 256 MiB allocation, which it must see;
5. smoke inference: the study's inference stage (`flare_utils.inference.stage.run_inference_stage`)
   with the check's teacher and student, or with every model of a finished smoke study
   (--smoke-run RUN_DIR; --smoke first runs `params/smoke.yaml` on the check's device).

With --device cpu everything runs the same way on the CPU (a dry run: fp16 autocast is CUDA-only, so
the fp16/fp32 figures agree exactly and the GPU figures read "not measured").

Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (after every step, so a crash leaves the
figures so far); the work run (data, models, predictions) is OUT_DIR/work.

Exit codes: 0 every step passed; 1 a step failed (the JSON and the markdown name it, with its
traceback in the JSON); 2 bad arguments; 3 no CUDA device for --device cuda: nothing is run, a message
goes to stderr and the JSON says status "no_cuda".
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_CUDA = 0, 1, 2, 3
JSON_NAME, MD_NAME = "gpu_check.json", "gpu_check.md"
DATASET_ID, DATASET_NAME = 979, "GpuCheck"
MIB = 1024.0 * 1024.0
RESENC_CHOICES = ("resenc_m", "resenc_l", "resenc_xl", "none")


def _tiny_variants():
    """The tiny scale's one plan (teacher and student share it, as in params/smoke.yaml)."""
    from flare_utils.planning.plans import PlanVariant
    return (PlanVariant("gpucheck_tiny", "GPU check, tiny network", base_features=8, max_features=64,
                        n_conv_per_stage=2, n_downsamplings=2, patch_size_zyx=(16, 32, 32),
                        spacing_zyx=(8.0, 8.0, 8.0), batch_size=2),)


# scale -> phantom preset, labelled cases, held-out cases, teacher and student plan variants
SCALES: dict[str, dict[str, Any]] = {
    "tiny": {"preset": "tiny", "n_labelled": 3, "n_test": 1, "teacher": "gpucheck_tiny", "student": "gpucheck_tiny"},
    "demo": {"preset": "demo", "n_labelled": 3, "n_test": 2, "teacher": "accurate_demo", "student": "efficient_demo"},
    "full": {"preset": "realistic", "n_labelled": 2, "n_test": 1, "teacher": "accurate", "student": "efficient"},
}


# ----------------------------------------------------------------------------------------------
# small helpers

def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _cuda(device: str) -> bool:
    return device.startswith("cuda")


def _sync(device: str) -> None:
    if _cuda(device):
        import torch
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if _cuda(device):
        import torch
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_allocated_mib(device: str) -> float | None:
    if not _cuda(device):
        return None
    import torch
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / MIB, 1)


def _monitor_figures(report) -> dict[str, Any]:
    """The ResourceMonitor's figures of one block (GPU ones None when not measured)."""
    if report is None:
        return {}
    return {"wall_s": round(report.wall_s, 3), "peak_rss_mib": round(report.peak_rss_mib, 1),
            "gpu_mem_peak_mib": None if report.gpu_mem_peak_mib is None else round(report.gpu_mem_peak_mib, 1),
            "gpu_backend": report.gpu_backend, "monitor_device": report.device, "samples": report.samples}


def _median(xs):
    xs = sorted(xs)
    return None if not xs else (xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]))


@contextlib.contextmanager
def _quiet(log_file: Path):
    """nnU-Net's console output goes to a log file."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        with open(log_file, "a") as f:
            f.write(buf.getvalue())


# ----------------------------------------------------------------------------------------------
# the steps

def environment_info(device: str) -> dict[str, Any]:
    import torch
    from importlib import metadata

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None
    d = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
         "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
         "nnunetv2": version("nnunetv2"), "dynamic_network_architectures": version("dynamic_network_architectures"),
         "pynvml": version("nvidia-ml-py") or version("pynvml")}
    if _cuda(device) and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        d.update(gpu=p.name, gpu_memory_mib=round(p.total_memory / MIB), compute_capability=f"{p.major}.{p.minor}",
                 gpu_count=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version(),
                 bf16_supported=bool(torch.cuda.is_bf16_supported()))
    return d


def make_data(work: Path, scale: str, resenc: str | None, processes: int) -> dict[str, Any]:
    """Cohort -> nnU-Net dataset -> plans (teacher, student, ResEnc) preprocessed."""
    from flare_utils.data.convert import convert_flare22
    from flare_utils.layout import RunLayout
    from flare_utils.planning.plans import count_parameters, describe_plans, plan_and_preprocess
    from flare_utils.synthetic.phantom import write_cohort

    s = SCALES[scale]
    run = RunLayout(work).activate()
    t0 = time.perf_counter()
    write_cohort(work / "cohort", s["n_labelled"], 0, s["n_test"], seed=0, preset=s["preset"], fov_mix="abdomen",
                 processes=processes)
    conv = convert_flare22(work / "cohort", run.nnunet_raw, DATASET_ID, DATASET_NAME, processes=processes)
    t_cohort = time.perf_counter() - t0
    variants = list(_tiny_variants()) if scale == "tiny" else [s["teacher"], s["student"]]
    if resenc:
        variants.append(resenc)
    t0 = time.perf_counter()
    ids = plan_and_preprocess(DATASET_ID, variants, processes=processes, verify=False)
    t_plan = time.perf_counter() - t0
    raw = run.nnunet_raw / f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"
    names = {"teacher": s["teacher"], "student": s["student"], **({"resenc": resenc} if resenc else {})}
    plans = {}
    for role, name in names.items():
        d = describe_plans(ids[name], dataset=DATASET_ID, with_parameters=False)
        plans[role] = {"variant": name, "plans": ids[name], "network": d["network"], "patch_size": d["patch_size"],
                       "spacing": d["spacing"], "batch_size": d["batch_size"], "n_stages": d["n_stages"],
                       "parameters": count_parameters(ids[name], dataset=DATASET_ID)}
    return {"dataset_id": DATASET_ID, "raw_dataset": str(raw), "preset": s["preset"],
            "n_training_cases": s["n_labelled"], "n_test_cases": s["n_test"],
            "cohort_and_conversion_s": round(t_cohort, 2), "plan_and_preprocess_s": round(t_plan, 2),
            "plans": plans, "reused_conversion": bool(conv.reused)}


def _training_config(device: str, iterations: int, n_proc_da: int | None) -> dict[str, Any]:
    return {"num_epochs": 1, "num_iterations_per_epoch": int(iterations), "num_val_iterations_per_epoch": 1,
            "device": "cuda" if _cuda(device) else "cpu", "seed": 0, "final_validation": False, "compile": False,
            "export_processes": 1, "save_every": 1000,
            "n_proc_da": (0 if not _cuda(device) else None) if n_proc_da is None else int(n_proc_da)}


def train_model(work: Path, trainer: str, plans_id: str, device: str, iterations: int, steps: int,
                n_proc_da: int | None) -> dict[str, Any]:
    """A short real training run (`flare_utils.training.train`), then `steps` timed train steps."""
    import torch
    from flare_utils.evaluation.efficiency import ResourceMonitor
    from flare_utils.training import train

    cfg = _training_config(device, iterations, n_proc_da)
    _reset_peak(device)
    t0 = time.perf_counter()
    with ResourceMonitor(interval=0.1) as mon, _quiet(work / "logs" / "training_console.log"):
        results = train(DATASET_ID, plans_id, "all", trainer, cfg)
    wall = time.perf_counter() - t0
    ck = torch.load(results / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    log = ck["logging"]
    epoch_s = float(log["epoch_end_timestamps"][-1] - log["epoch_start_timestamps"][-1])
    loss = float(log["train_losses"][-1])
    out = {"trainer": trainer, "plans": plans_id, "results": str(results),
           "fp16_autocast": ck.get("grad_scaler_state") is not None,      # nnU-Net: GradScaler + autocast on CUDA
           "iterations": int(iterations), "run_wall_s": round(wall, 2), "epoch_s": round(epoch_s, 3),
           "epoch_s_per_iteration": round(epoch_s / (iterations + 1), 4),  # + 1 validation iteration
           "train_loss": loss, "loss_finite": bool(loss == loss and abs(loss) != float("inf")),
           "peak_gpu_allocated_mib": _peak_allocated_mib(device), "monitor": _monitor_figures(mon.result),
           "n_proc_da": cfg["n_proc_da"]}
    if steps > 0:
        out["step"] = step_benchmark(work, trainer, plans_id, device, cfg, steps)
    return out


def step_benchmark(work: Path, trainer: str, plans_id: str, device: str, cfg: dict[str, Any],
                   steps: int) -> dict[str, Any]:
    """`steps` calls of the trainer's own `train_step` on one fixed random batch (forward, loss,
    backward, optimizer; autocast + GradScaler on CUDA): the network step without data loading."""
    import torch
    import torch.nn.functional as F
    from nnunetv2.run.run_training import get_trainer_from_args

    from flare_utils.training import TrainingConfig, find_trainer
    from flare_utils.training.config import ENV_VAR
    from flare_utils.utilities.environment import environment

    find_trainer(trainer)
    cfg_file = TrainingConfig.from_dict(cfg).save(work / "logs" / f"step_{trainer}_{plans_id}.json")
    with environment(**{ENV_VAR: str(cfg_file)}), _quiet(work / "logs" / "training_console.log"):
        t = get_trainer_from_args(str(DATASET_ID), "3d_fullres", "all", trainer, plans_id,
                                  device=torch.device(device))
        t.initialize()
    try:
        patch = [int(p) for p in t.configuration_manager.patch_size]
        bs = int(t.batch_size)
        g = torch.Generator().manual_seed(0)
        data = torch.randn(bs, int(t.num_input_channels), *patch, generator=g)
        seg = torch.randint(0, int(t.label_manager.num_segmentation_heads), (bs, 1, *patch), generator=g).float()
        if t.enable_deep_supervision:
            target = [F.interpolate(seg, size=[max(1, round(p * f)) for p, f in zip(patch, sc)], mode="nearest")
                      for sc in t._get_deep_supervision_scales()]
        else:
            target = seg
        batch = {"data": data, "target": target}
        t.network.train()
        _reset_peak(device)
        times, losses = [], []
        for _ in range(int(steps)):
            _sync(device)
            t0 = time.perf_counter()
            losses.append(float(t.train_step(batch)["loss"]))
            _sync(device)
            times.append(time.perf_counter() - t0)
        return {"batch_size": bs, "patch_size": patch, "steps": int(steps), "fp16_autocast": t.grad_scaler is not None,
                "first_step_s": round(times[0], 4),
                "median_step_s": round(_median(times[1:] or times), 4),
                "loss_finite": all(x == x and abs(x) != float("inf") for x in losses),
                "peak_gpu_allocated_mib": _peak_allocated_mib(device),
                "parameters": int(sum(p.numel() for p in t.network.parameters()))}
    finally:
        del t
        if _cuda(device):
            torch.cuda.empty_cache()


def _agreement(a, b) -> tuple[float, float | None]:
    """(share of voxels with the same label, mean Dice over the labels present in either)."""
    import numpy as np
    labels = sorted((set(np.unique(a).tolist()) | set(np.unique(b).tolist())) - {0})
    dices = []
    for lab in labels:
        x, y = a == lab, b == lab
        dices.append(2.0 * np.logical_and(x, y).sum() / (x.sum() + y.sum()))
    return float((a == b).mean()), (float(np.mean(dices)) if dices else None)


def inference(work: Path, model_dir: Path, folds, images: list[Path], device: str, repeats: int) -> dict[str, Any]:
    """Efficient inference with fp16 and fp32 autocast off; times, GPU memory, label agreement."""
    import numpy as np
    import torch
    from flare_utils.inference.predictor import EfficientPredictor

    per_precision, labels, logits = {}, {}, {}
    for precision in ("fp32", "fp16"):
        p = EfficientPredictor.from_results_folder(model_dir, folds=folds, mode="efficient", device=device,
                                                   fp16=precision == "fp16")
        pre = p.preprocess(images[0])
        resample_device = str(pre.data.device)            # the normalised, resampled case: where it was made
        _, res, _ = p.predict_preprocessed(pre.data, pre.long_axis, mode="full", keep_logits=True)
        logits[precision] = res.logits.float().cpu()
        del pre, res
        _reset_peak(device)
        cases = []
        for r in range(int(repeats)):
            for img in images:
                lab, rep = p.predict_case(img, return_label=True)
                eff = rep.efficiency or {}
                gpu = eff.get("gpu_mem_peak_mib")
                cases.append({"case": rep.case_id, "repeat": r, "total_s": round(rep.total_s, 4),
                              "read_s": round(rep.time_read_s, 4), "preprocess_s": round(rep.time_preprocess_s, 4),
                              "network_s": round(rep.time_network_s, 4), "forward_s": round(rep.network_forward_s, 4),
                              "resample_to_original_s": round(rep.time_resample_s, 4),
                              "windows_evaluated": rep.windows_evaluated,
                              "windows_nnunet_full": rep.windows_nnunet_full,
                              "network_shape": rep.network_shape, "original_shape": rep.original_shape,
                              "monitor_gpu_mem_peak_mib": gpu if isinstance(gpu, (int, float)) else None,
                              "peak_rss_mib": rep.peak_rss_mib})
                if r == 0:
                    labels.setdefault(precision, {})[rep.case_id] = lab
        last = [c for c in cases if c["repeat"] == int(repeats) - 1]
        gpus = [c["monitor_gpu_mem_peak_mib"] for c in cases if c["monitor_gpu_mem_peak_mib"] is not None]
        per_precision[precision] = {
            "fp16_autocast_active": bool(p.fp16 and p.device.type == "cuda"), "device": str(p.device),
            "resampling_device": resample_device, "batch_size": p.batch_size,
            "mean_total_s": round(float(np.mean([c["total_s"] for c in last])), 4),
            "mean_network_s": round(float(np.mean([c["network_s"] for c in last])), 4),
            "mean_preprocess_s": round(float(np.mean([c["preprocess_s"] for c in last])), 4),
            "peak_gpu_allocated_mib": _peak_allocated_mib(device),
            "monitor_gpu_mem_peak_mib": max(gpus) if gpus else None, "cases": cases}
        del p
        if _cuda(device):
            torch.cuda.empty_cache()
    agree = {}
    for cid, a in labels["fp32"].items():
        b = labels["fp16"][cid]
        share, dice = _agreement(a, b)
        agree[cid] = {"voxel_agreement": share, "mean_dice": dice,
                      "foreground_voxels_fp32": int((a > 0).sum()), "foreground_voxels_fp16": int((b > 0).sum())}
    d = (logits["fp16"] - logits["fp32"]).abs()
    full = {"case": images[0].name, "max_abs_logit_diff": float(d.max()), "mean_abs_logit_diff": float(d.mean()),
            "argmax_agreement": float((logits["fp16"].argmax(0) == logits["fp32"].argmax(0)).float().mean())}
    return {"model": str(model_dir), "folds": [str(f) for f in folds], "repeats": int(repeats),
            "precisions": per_precision, "fp16_vs_fp32": {
                "min_voxel_agreement": min(v["voxel_agreement"] for v in agree.values()),
                "mean_dice": (None if all(v["mean_dice"] is None for v in agree.values()) else
                              float(np.mean([v["mean_dice"] for v in agree.values() if v["mean_dice"] is not None]))),
                "cases": agree, "full_window_logits": full}}


def monitor_check(device: str, mib: int = 256) -> dict[str, Any]:
    """ResourceMonitor around a known allocation: on CUDA it must read the GPU and see the allocation;
    on the CPU it must report the GPU as not measured."""
    import numpy as np
    import torch
    from flare_utils.evaluation.efficiency import ResourceMonitor

    cuda = _cuda(device)
    if cuda:
        torch.cuda.init()
        torch.empty(1, device=device)            # the CUDA context exists before the baseline is read
        _sync(device)
    with ResourceMonitor(interval=0.05, gpu=True if cuda else None) as mon:
        time.sleep(0.3)
        if cuda:
            x = torch.ones(int(mib * MIB) // 4, dtype=torch.float32, device=device)
            _sync(device)
        else:
            x = np.ones(int(mib * MIB) // 8)
        time.sleep(0.5)
        del x
        if cuda:
            torch.cuda.empty_cache()
        time.sleep(0.2)
    r = mon.result
    gpu_series = [s[3] for s in mon.timeseries if s[3] is not None]
    seen = (max(gpu_series) - gpu_series[0]) if gpu_series else None
    ok = (seen is not None and seen >= 0.75 * mib) if cuda else (r.gpu_mem_peak_mib is None)
    return {"allocated_mib": mib, "gpu_increase_seen_mib": None if seen is None else round(seen, 1), "ok": bool(ok),
            **_monitor_figures(r), "gpu_auc": r.gpu_auc, "missed_slots": r.missed_slots}


def _smoke_run_inputs(smoke_run: Path) -> tuple[dict, Path, Path]:
    """A finished study's models and its held-out images / labels."""
    import yaml
    from flare_utils.layout import RunLayout
    from flare_utils.study.models import select_models
    run = RunLayout(smoke_run)
    params = yaml.safe_load(run.params_file.read_text())
    raw = run.dataset_dir(int(params["data"]["dataset_id"]), params["data"]["dataset_name"])
    models = {n: {"path": m["path"], "folds": m["folds"]} for n, m in select_models(run.root, "all").items()}
    return models, raw / "imagesTs", raw / "labelsTs"


def run_smoke_study(work: Path, device: str) -> tuple[Path, dict[str, Any]]:
    """params/smoke.yaml with device set to the check's, run by `python -m flare_utils run`."""
    import yaml
    params = yaml.safe_load((PROJECT / "params" / "smoke.yaml").read_text())
    run_dir = work / "smoke_run"
    params.update(device="cuda" if _cuda(device) else "cpu", run_dir=str(run_dir))
    f = work / "smoke_params.yaml"
    f.write_text(yaml.safe_dump(params, sort_keys=False))
    t0 = time.perf_counter()
    with open(work / "logs" / "smoke_study.log", "w") as log:
        rc = subprocess.run([sys.executable, "-m", "flare_utils", "run", str(f)], cwd=PROJECT, stdout=log,
                            stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"the smoke study failed (exit {rc}); see {work / 'logs' / 'smoke_study.log'}")
    return run_dir, {"smoke_study_wall_s": round(wall, 1), "smoke_params": str(f)}


def smoke_inference(work: Path, device: str, models: dict, input_dir: Path, gt_dir: Path | None,
                    run_dir: Path, source: str) -> dict[str, Any]:
    """The study's inference stage on the device: every model on the held-out images, DSC, window picture."""
    from flare_utils.evaluation.efficiency import ResourceMonitor
    from flare_utils.inference.stage import run_inference_stage

    out_dir = work / "smoke_inference"
    if out_dir.exists():                   # predictions of an earlier check would be reused, not timed
        import shutil
        shutil.rmtree(out_dir)
    lines: list[str] = []
    _reset_peak(device)
    with ResourceMonitor(interval=0.1) as mon, _quiet(work / "logs" / "smoke_inference.log"):
        res = run_inference_stage(run_dir, models=models, input_dir=input_dir, output_dir=out_dir,
                                  device="cuda" if _cuda(device) else "cpu",
                                  ground_truth_dir=gt_dir if gt_dir is not None and gt_dir.is_dir() else None,
                                  log=lines.append)
    ov = res.overview.reset_index().to_dict(orient="records")
    return {"source": source, "run_dir": str(run_dir), "models": list(models), "input_dir": str(input_dir),
            "output_dir": str(out_dir), "cases": int(len(res.cases)),
            "windows_evaluated": int(res.summary["windows_evaluated"]), "mean_dsc_per_model": res.dsc,
            "overview": json.loads(json.dumps(ov, default=float)), "figure": res.summary.get("figure"),
            "peak_gpu_allocated_mib": _peak_allocated_mib(device), "monitor": _monitor_figures(mon.result)}


# ----------------------------------------------------------------------------------------------
# report

def _fmt(v, nd=3):
    if v is None:
        return "not measured"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown(result: dict[str, Any]) -> str:
    env, steps = result.get("environment", {}), result.get("steps", {})
    lines = [f"# GPU check ({result.get('status')})", "",
             f"- device: {result.get('device')} ({env.get('gpu', 'no GPU')}); dry run: {_fmt(result.get('dry_run'))}; "
             f"scale: {result.get('scale')}; started {result.get('started')}",
             f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), nnunetv2 {env.get('nnunetv2')}, "
             f"Python {env.get('python')}, {env.get('cpu_count')} CPUs"]
    if result.get("message"):
        lines += ["", result["message"]]
    if steps:
        lines += ["", "| step | status | time (s) |", "|---|---|---|"]
        lines += [f"| {n} | {s.get('status')} | {_fmt(s.get('seconds'), 1)} |" for n, s in steps.items()]
        for n, s in steps.items():
            if s.get("status") == "failed":
                lines += ["", f"**{n} failed**: `{s.get('error')}`"]
    tr = steps.get("training", {}).get("figures") or {}
    if tr:
        lines += ["", "## Training", "",
                  "| model | trainer | plans | parameters (M) | fp16 autocast | run (s) | epoch s/iteration | "
                  "step s (median) | step peak GPU alloc (MiB) | run peak GPU (monitor, MiB) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        plans = (steps.get("data", {}).get("figures") or {}).get("plans", {})
        for role, t in tr.items():
            st = t.get("step", {})
            n = (plans.get(role) or {}).get("parameters") or st.get("parameters")
            lines.append(f"| {role} | {t['trainer']} | {t['plans']} | {_fmt(None if n is None else n / 1e6, 2)} | "
                         f"{_fmt(t['fp16_autocast'])} | {_fmt(t['run_wall_s'], 1)} | "
                         f"{_fmt(t['epoch_s_per_iteration'])} | "
                         f"{_fmt(st.get('median_step_s'))} | {_fmt(st.get('peak_gpu_allocated_mib'), 1)} | "
                         f"{_fmt(t['monitor'].get('gpu_mem_peak_mib'), 1)} |")
    inf = steps.get("inference", {}).get("figures") or {}
    if inf:
        lines += ["", "## Efficient inference", "", f"model: `{inf['model']}` folds {inf['folds']}", "",
                  "| precision | autocast active | resampling on | mean total (s) | network (s) | preprocess (s) | "
                  "peak GPU alloc (MiB) | peak GPU (monitor, MiB) |", "|---|---|---|---|---|---|---|---|"]
        for prec, d in inf["precisions"].items():
            lines.append(f"| {prec} | {_fmt(d['fp16_autocast_active'])} | {d['resampling_device']} | "
                         f"{_fmt(d['mean_total_s'])} | {_fmt(d['mean_network_s'])} | {_fmt(d['mean_preprocess_s'])} | "
                         f"{_fmt(d['peak_gpu_allocated_mib'], 1)} | {_fmt(d['monitor_gpu_mem_peak_mib'], 1)} |")
        a = inf["fp16_vs_fp32"]
        f = a["full_window_logits"]
        lines += ["", f"fp16 vs fp32 labels: voxel agreement (worst case) {_fmt(a['min_voxel_agreement'], 5)}, "
                      f"mean Dice over labels {_fmt(a['mean_dice'], 4)}; full sliding window logits of {f['case']}: "
                      f"max |diff| {_fmt(f['max_abs_logit_diff'], 4)}, "
                      f"argmax agreement {_fmt(f['argmax_agreement'], 5)}"]
    mo = steps.get("monitor", {}).get("figures") or {}
    if mo:
        lines += ["", "## GPU memory monitor", "",
                  f"ResourceMonitor around a {mo['allocated_mib']} MiB allocation: backend {mo.get('gpu_backend')}, "
                  f"increase seen {_fmt(mo.get('gpu_increase_seen_mib'), 1)} MiB, peak "
                  f"{_fmt(mo.get('gpu_mem_peak_mib'), 1)} MiB, ok: {_fmt(mo.get('ok'))}"]
    sm = steps.get("smoke_inference", {}).get("figures") or {}
    if sm:
        dsc = ", ".join(f"{k} {_fmt(v, 3)}" for k, v in (sm.get("mean_dsc_per_model") or {}).items())
        lines += ["", "## Inference stage", "",
                  f"{sm['source']}: {len(sm['models'])} models x {sm['cases']} cases in "
                  f"{_fmt(sm['monitor'].get('wall_s'), 2)} s, {sm['windows_evaluated']} windows (shown model), "
                  f"peak GPU alloc {_fmt(sm.get('peak_gpu_allocated_mib'), 1)} MiB, monitor "
                  f"{_fmt(sm['monitor'].get('gpu_mem_peak_mib'), 1)} MiB; mean DSC: {dsc or 'no ground truth'}"]
        if sm.get("smoke_study_wall_s") is not None:
            lines.append(f"(the smoke study itself took {sm['smoke_study_wall_s']} s on {result.get('device')})")
    return "\n".join(lines) + "\n"


def _write(out: Path, result: dict[str, Any]) -> None:
    from flare_utils.data.io import atomic_write_text
    atomic_write_text(out / JSON_NAME, json.dumps(result, indent=1, default=str))
    atomic_write_text(out / MD_NAME, markdown(result))


# ----------------------------------------------------------------------------------------------
# main

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="output folder (gpu_check.json, gpu_check.md, work/)")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu (a dry run)")
    ap.add_argument("--scale", choices=sorted(SCALES), default="tiny",
                    help="cases and plans: tiny (8 mm, tiny networks), demo (accurate_demo/efficient_demo), "
                         "full (realistic 512x512 cases, the papers' accurate/efficient)")
    ap.add_argument("--resenc", choices=RESENC_CHOICES, default="resenc_m",
                    help="nnU-Net ResEnc preset trained as a third model (none: skip)")
    ap.add_argument("--no-resenc", dest="resenc", action="store_const", const="none")
    ap.add_argument("--iterations", type=int, default=5, help="training iterations of each short run")
    ap.add_argument("--steps", type=int, default=10, help="timed train steps on a fixed batch (0: none)")
    ap.add_argument("--repeats", type=int, default=2, help="inference passes over the held-out cases")
    ap.add_argument("--n-proc-da", type=int, default=None,
                    help="augmentation workers (default: 0 on CPU, nnU-Net's default on CUDA)")
    ap.add_argument("--processes", type=int, default=2, help="processes for cohort writing and preprocessing")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--model", type=Path, default=None,
                    help="a trained nnU-Net results folder for the inference step (default: the check's student)")
    ap.add_argument("--folds", nargs="+", default=None, help="folds of --model (default: all its folds)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--smoke-run", type=Path, default=None, help="a finished smoke study whose inference stage is run")
    g.add_argument("--smoke", action="store_true",
                   help="run params/smoke.yaml on the device first, then its inference stage")
    return ap


def run_check(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    work = out / "work"
    out.mkdir(parents=True, exist_ok=True)
    device = str(args.device)
    if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        print(f"gpu_check: --device must be cuda, cuda:N or cpu, got {device!r}", file=sys.stderr)
        return EXIT_USAGE
    if device.startswith("cuda:"):            # the trainers take "cuda": pin the process to that GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = device[5:]
        device = "cuda"
    import torch
    if args.threads:
        torch.set_num_threads(int(args.threads))
    result: dict[str, Any] = {"check": "gpu_check", "format": 1, "status": "running", "started": _now(),
                              "device": device, "dry_run": not _cuda(device), "scale": args.scale,
                              "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "exit_codes": {"ok": EXIT_OK, "failed": EXIT_FAILED, "usage": EXIT_USAGE,
                                             "no_cuda": EXIT_NO_CUDA},
                              "environment": {}, "steps": {}}
    if _cuda(device) and not torch.cuda.is_available():
        msg = (f"gpu_check: no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}: "
               "torch.cuda.is_available() is False). Nothing was run. On a machine without a GPU, "
               "`--device cpu` runs every step on the CPU as a dry run; on a GPU machine whose torch is a CPU "
               "build, install a CUDA build (scripts/setup_env.sh with TORCH_INDEX_URL).")
        print(msg, file=sys.stderr)
        result.update(status="no_cuda", message=msg, finished=_now(), environment=environment_info("cpu"))
        _write(out, result)
        return EXIT_NO_CUDA
    result["environment"] = environment_info(device)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    _write(out, result)
    resenc = None if args.resenc == "none" else args.resenc
    say = print

    def step(name: str, fn: Callable[[], dict[str, Any]], needs: tuple[str, ...] = ()) -> dict[str, Any] | None:
        missing = [n for n in needs if result["steps"].get(n, {}).get("status") != "ok"]
        if missing:
            result["steps"][name] = {"status": "skipped", "reason": f"needs {missing}"}
            _write(out, result)
            return None
        say(f"[gpu_check] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            figures = fn()
            result["steps"][name] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 2), "figures": figures}
        except Exception as e:  # noqa: BLE001 - every failure is a finding of the check
            result["steps"][name] = {"status": "failed", "seconds": round(time.perf_counter() - t0, 2),
                                     "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            say(f"[gpu_check] {name} FAILED: {type(e).__name__}: {e}", flush=True)
        _write(out, result)
        return result["steps"][name].get("figures")

    data = step("data", lambda: make_data(work, args.scale, resenc, max(1, args.processes)))

    def training():
        figs = {}
        roles = [("teacher", "FlareTeacherTrainer"), ("student", "FlareStudentTrainer")]
        if resenc:
            roles.append(("resenc", "FlareTeacherTrainer"))
        for role, trainer in roles:
            figs[role] = train_model(work, trainer, data["plans"][role]["plans"], device, args.iterations,
                                     args.steps, args.n_proc_da)
        bad = [r for r, f in figs.items() if not f["loss_finite"] or (_cuda(device) and not f["fp16_autocast"])]
        if bad:
            raise RuntimeError(f"training of {bad}: loss not finite or no fp16 autocast on CUDA: "
                               + json.dumps({r: figs[r] for r in bad}, default=str)[:2000])
        return figs
    trained = step("training", training, needs=("data",))

    def infer():
        raw = Path(data["raw_dataset"])
        images = sorted((raw / "imagesTs").glob("*.nii.gz"))
        if not images:
            raise RuntimeError(f"no held-out images in {raw / 'imagesTs'}")
        if args.model is not None:
            from flare_utils.inference.folds import available_folds
            model = Path(args.model).resolve()
            folds = tuple(args.folds) if args.folds else tuple(available_folds(model))
        else:
            model, folds = Path(trained["student"]["results"]), ("all",)
        return inference(work, model, folds, images, device, max(1, args.repeats))
    step("inference", infer, needs=("data",) if args.model is not None else ("data", "training"))
    step("monitor", lambda: monitor_check(device))

    def smoke():
        extra: dict[str, Any] = {}
        if args.smoke:
            run_dir, extra = run_smoke_study(work, device)
            source = "smoke study run by this check"
        elif args.smoke_run is not None:
            run_dir, source = Path(args.smoke_run).resolve(), "finished smoke study"
        else:
            run_dir, source = None, "this check's teacher and student"
        if run_dir is not None:
            models, images, gt = _smoke_run_inputs(run_dir)
        else:
            raw = Path(data["raw_dataset"])
            models = {r: {"path": trained[r]["results"], "folds": ["all"]} for r in ("teacher", "student")}
            images, gt, run_dir = raw / "imagesTs", raw / "labelsTs", work
        return {**smoke_inference(work, device, models, images, gt, run_dir, source), **extra}
    step("smoke_inference", smoke, needs=() if (args.smoke or args.smoke_run) else ("data", "training"))

    failed = [n for n, s in result["steps"].items() if s["status"] != "ok"]
    result.update(status="failed" if failed else "ok", finished=_now(), failed_steps=failed)
    _write(out, result)
    say(f"[gpu_check] {result['status']}: {out / JSON_NAME}, {out / MD_NAME}", flush=True)
    return EXIT_FAILED if failed else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
