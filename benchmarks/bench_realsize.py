"""Benchmark: the real-size `efficient` plan on CPU (issue 17 section 2), and CPU inference backends.

Usage::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_realsize.py --backend-e2e always  # full size (~25 min)
    .venv/bin/python benchmarks/bench_realsize.py --slices 60 --inplane 256 --work /tmp/rs_small  # reduced (~3 min)
    .venv/bin/python benchmarks/bench_realsize.py --part backends                          # backends only

What it builds once (cached in --work, default /tmp/flare_bench_realsize):

* model: a valid nnU-Net v2 results folder (dataset.json, plans.json, fold_0/checkpoint_final.pth with
  nnU-Net's checkpoint keys, trainer `nnUNetTrainer`) of the project's real `efficient` plan
  (`make_plan_variant(skeleton_base_plans(), "efficient")`: PlainConvUNet, 16 base features, 2 convs per
  stage, 5 stages, patch 32 x 128 x 192 at 4 x 1.2 x 1.2 mm, ~5.6M parameters, 14 outputs) with a
  RANDOMLY INITIALISED network (nnU-Net's He init, torch seed --seed). Timing does not depend on the
  weights; labels and DSC are meaningless and not reported;
* case: a whole-body phantom CT (`flare_utils.synthetic.phantom`, realistic preset forced to
  --inplane x --inplane voxels of 0.8 x 0.8 mm and --slices slices of 2.5 mm: FLARE22's median spacing;
  default 512 x 512 x 400 = 1000 mm, head to thighs).

Part `e2e` (each method in its own fresh subprocess, so its peak RSS, ru_maxrss, is its own; model
loaded before the clock starts, then file to file):

* ours_efficient: `EfficientPredictor` mode "efficient", torch with oneDNN convolutions, no TTA,
  centre threshold 0 (every z step runs all 9 windows: with random weights the centre window may
  predict nothing and skip its neighbours, which would flatter ours). The windows the paper's rule
  (threshold 1) would have run are derived from the same run's centre-window foreground counts and
  reported beside it;
* ours_efficient_<backend>: the same with `backend="onnx"` / `"openvino"` (`flare_utils.inference.backends`:
  the network exported to ONNX when the model is loaded, counted in load_model_s; only when the backend
  part found that backend >= --e2e-min-speedup faster per window, or with --backend-e2e always), plus
  the fraction of voxels whose label equals ours_efficient's;
* nnunet_no_tta: nnU-Net v2's `nnUNetPredictor` (step 0.5, Gaussian, no mirroring), single process
  (`predict_from_files_sequential`), its `_internal_maybe_mirror_and_predict` wrapped to time and count
  the windows (forward time = the summed time of those calls);
* nnunet_default: the same with mirroring over the checkpoint's 3 axes (8 forward passes per window).
  --nnunet-tta auto runs it in full only if the estimate (nnunet_no_tta wall + 7 x its forward time)
  is at most --tta-budget-s (900 s); otherwise it is EXTRAPOLATED: a subprocess times K windows of the
  case through nnU-Net's `_internal_maybe_mirror_and_predict` with and without mirroring, and
  wall(default) = wall(no TTA, measured) + windows x (t_mirrored - t_plain); the JSON and the table mark it.

Part `backends` (one subprocess): the same network exported to ONNX (torch.onnx.export, fixed input
1 x 1 x 32 x 128 x 192, opset 17) and run on real windows of the case (the efficient grid's windows of the
preprocessed case, spread over z): torch with oneDNN convolutions (ours), ONNX Runtime
(CPUExecutionProvider, --threads intra-op threads, 1 inter-op), OpenVINO (CPU, LATENCY hint, 1 stream,
--threads inference threads, f32 inference precision; and the same with bf16 precision, reported
separately). Per backend: median / min of the per-window forward time over --reps passes over the windows after
--warmup passes, and against torch the max abs difference of the logits and the fraction of voxels whose
argmax equals torch's.

Every subprocess runs with --threads torch threads (2) and OMP_WAIT_POLICY=PASSIVE (docs/benchmarks.md).
Results: JSON (--out, default benchmarks/results/realsize.json) and Markdown tables on stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(HERE))
from child import reply, run_child  # noqa: E402  (benchmarks/child.py)

E2E_METHODS = ("ours_efficient", "nnunet_no_tta", "nnunet_default")
BACKENDS = ("onnx", "openvino")
DATASET = "Dataset022_FLARE22"
RESULTS_NAME = "nnUNetTrainer__nnUNetPlans_efficient__3d_fullres"


# ----------------------------------------------------------------------------------------------
# model and case

def build_model(model_dir: Path, seed: int) -> dict:
    """A valid nnU-Net v2 results folder of the real `efficient` plan with a random network."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from flare_utils.planning.plans import flare22_dataset_json, make_plan_variant, skeleton_base_plans
    plans = make_plan_variant(skeleton_base_plans(), "efficient")
    plans["dataset_name"] = DATASET
    dj = flare22_dataset_json()
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    torch.manual_seed(seed)
    net = nnUNetTrainer.build_network_architecture(pm, cm, 1, len(dj["labels"]), enable_deep_supervision=False)
    n_params = int(sum(p.numel() for p in net.parameters()))
    (model_dir / "fold_0").mkdir(parents=True, exist_ok=True)
    (model_dir / "plans.json").write_text(json.dumps(plans, indent=1))
    (model_dir / "dataset.json").write_text(json.dumps(dj, indent=1))
    ck = {"network_weights": net.state_dict(), "optimizer_state": None, "grad_scaler_state": None,
          "logging": {}, "_best_ema": None, "current_epoch": 0,
          "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dj,
                        "device": torch.device("cpu")},
          "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)}
    torch.save(ck, model_dir / "fold_0" / "checkpoint_final.pth")
    return {"parameters": n_params, "seed": seed, "weights": "random (nnU-Net He init, torch seed %d)" % seed,
            "patch_size": cm.patch_size, "spacing": cm.spacing,
            "features": cm.network_arch_init_kwargs["features_per_stage"]}


def ensure_model(work: Path, seed: int) -> tuple[Path, dict]:
    d = work / "model" / DATASET / RESULTS_NAME
    meta = d / "flare_bench_model.json"
    if meta.is_file() and json.loads(meta.read_text()).get("seed") == seed \
            and (d / "fold_0" / "checkpoint_final.pth").is_file():
        return d, json.loads(meta.read_text())
    info = _run_child(["build_model", str(d), str(seed)])
    meta.write_text(json.dumps(info, indent=1))
    return d, info


def make_case(path_img: Path, seed: int, n_slices: int, inplane: int, spacing: tuple[float, float, float]) -> dict:
    import numpy as np
    from flare_utils.synthetic.phantom import PRESETS, generate_case
    sx, sy, sz = spacing
    preset = dataclasses.replace(PRESETS["realistic"], name="bench_realsize", matrix=(inplane, inplane),
                                 inplane_spacing=(sx, sx), slice_spacing=(sz, sz), slice_choices=(sz,),
                                 max_slices=n_slices, n_slices=n_slices)
    c = generate_case(seed, preset, fov="whole_body")
    c.label = c.label.astype(np.uint8)
    gt = path_img.parent.parent / "gt" / path_img.name.replace("_0000", "")
    gt.parent.mkdir(parents=True, exist_ok=True)
    c.save(path_img, gt)
    return {"shape": list(c.shape), "spacing": list(c.spacing), "fov": "whole_body", "seed": seed}


def ensure_case(work: Path, seed: int, n_slices: int, inplane: int, spacing) -> dict:
    spec = {"seed": seed, "slices": n_slices, "inplane": inplane, "spacing": list(spacing)}
    d = work / "cases" / f"wb_{inplane}x{n_slices}_s{seed}"
    img, meta = d / "images" / "wholebody_0000.nii.gz", d / "case.json"
    if meta.is_file() and json.loads(meta.read_text()).get("spec") == spec and img.is_file():
        return json.loads(meta.read_text())
    img.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = _run_child(["make_case", str(img), str(seed), str(n_slices), str(inplane), *map(str, spacing)])
    info = {"spec": spec, "image": str(img), **res, "generate_s": time.time() - t0}
    meta.write_text(json.dumps(info, indent=1))
    print(f"case: {info['shape']} {info['spacing']} ({info['generate_s']:.0f} s)", flush=True)
    return info


# ----------------------------------------------------------------------------------------------
# backends, per window (the bench's own runner, so that OpenVINO's bf16 precision can be timed too; the
# end-to-end runs use flare_utils.inference.backends, the same export and settings)

class _Runner:
    """x (torch, 1x1xpatch, float32) -> logits (torch); `kind`: onnx | openvino | openvino_bf16."""

    def __init__(self, kind: str, onnx_path: Path, threads: int):
        self.kind = kind
        if kind == "onnx":
            import onnxruntime as ort
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self.sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
            self.version = ort.__version__
        else:
            import openvino as ov
            core = ov.Core()
            cfg = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(threads),
                   "INFERENCE_PRECISION_HINT": "bf16" if kind == "openvino_bf16" else "f32"}
            self.compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", cfg)
            self.request = self.compiled.create_infer_request()
            self.version = ov.__version__

    def __call__(self, x):
        import numpy as np
        import torch
        a = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        if self.kind == "onnx":
            y = self.sess.run(None, {"x": a})[0]
        else:
            y = self.request.infer({0: a})[0]
        return torch.from_numpy(np.asarray(y, dtype=np.float32))


# ----------------------------------------------------------------------------------------------
# workers (run in subprocesses)

def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _nnunet_windows(p, image: str) -> tuple[int, list[int]]:
    import nibabel as nib
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
    from flare_utils.inference.sliding_window import nnunet_window_count
    img = nib.load(image)
    shape = [img.shape[2], img.shape[1], img.shape[0]]
    sp = [float(z) for z in img.header.get_zooms()[:3]][::-1]
    tf = p.plans_manager.transpose_forward
    new = compute_new_shape([shape[t] for t in tf], [sp[t] for t in tf], p.configuration_manager.spacing)
    padded = [max(int(s), int(q)) for s, q in zip(new, p.configuration_manager.patch_size)]
    return nnunet_window_count(padded, p.configuration_manager.patch_size, 0.5), padded


def worker(method: str, model: str, image: str, out_dir: str, threads: int, onnx_path: str = "") -> dict:
    import torch
    torch.set_num_threads(threads)
    from flare_utils.evaluation.efficiency import ResourceMonitor
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "wholebody.nii.gz"
    res: dict = {"method": method, "threads": threads, "load_before": os.getloadavg()[0]}
    if method.startswith("ours"):
        from flare_utils.inference.predictor import EfficientPredictor
        backend = method.split("ours_efficient_")[1] if method.startswith("ours_efficient_") else "torch"
        t0 = time.perf_counter()
        # backend "openvino" / "onnx": flare_utils.inference.backends (the network exported to ONNX while loading)
        p = EfficientPredictor.from_results_folder(model, folds=(0,), mode="efficient", device="cpu", monitor=False,
                                                   centre_threshold=0, backend=backend)
        res["load_model_s"] = time.perf_counter() - t0
        res["backend"] = backend
        with ResourceMonitor(interval=0.1) as mon:
            t0 = time.perf_counter()
            _, rep = p.predict_case(image, out, return_label=False)
            res["wall_s"] = time.perf_counter() - t0
        row = rep.to_row()
        res.update({k: row[k] for k in ("windows_evaluated", "windows_skipped", "windows_grid", "windows_paper_eq2",
                                        "windows_nnunet_full", "z_steps", "time_read_s", "time_preprocess_s",
                                        "time_network_s", "network_forward_s", "time_resample_s", "time_write_s",
                                        "total_s", "network_shape", "padded_shape", "crop_box")})
        centre_fg = [w["foreground"] for w in rep.windows if w["role"] == "centre"]
        per_step = rep.windows_grid // max(1, rep.z_steps)
        res["centre_threshold"] = p.centre_threshold
        res["centre_foreground"] = centre_fg
        # the windows the paper's rule (skip the neighbours when the centre predicts no foreground) would run
        res["windows_paper_rule"] = sum(1 if not fg else per_step for fg in centre_fg)
        res["forward_passes"] = rep.windows_evaluated
    else:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        mirroring = method == "nnunet_default"
        t0 = time.perf_counter()
        p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                            perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                            allow_tqdm=False)
        p.initialize_from_trained_model_folder(model, (0,))
        res["load_model_s"] = time.perf_counter() - t0
        spent = {"s": 0.0, "n": 0}
        inner = p._internal_maybe_mirror_and_predict

        def timed(x):
            t = time.perf_counter()
            y = inner(x)
            spent["s"] += time.perf_counter() - t
            spent["n"] += 1
            return y
        p._internal_maybe_mirror_and_predict = timed
        with ResourceMonitor(interval=0.1) as mon:
            t0 = time.perf_counter()
            p.predict_from_files_sequential([[image]], [str(out_dir / "wholebody")], False, True, None)
            res["wall_s"] = time.perf_counter() - t0
        n, padded = _nnunet_windows(p, image)
        n_mirror = 2 ** len(p.allowed_mirroring_axes or ()) if mirroring else 1
        res.update(windows_evaluated=spent["n"], windows_expected=n, forward_passes=spent["n"] * n_mirror,
                   network_forward_s=spent["s"], padded_shape=padded)
    res["peak_rss_monitor_mib"] = mon.result.peak_rss_mib
    res["cpu_util_mean"] = mon.result.cpu_util_mean
    res["maxrss_mib"] = _maxrss_mib()
    res["load_after"] = os.getloadavg()[0]
    res["output"] = str(out)
    return res


def _case_windows(model: str, image: str, n: int, threads: int):
    """The predictor (torch, oneDNN) and n windows (1x1xpatch) of the preprocessed case, spread over the
    efficient grid's windows (all z steps, every in-plane position in turn)."""
    import torch
    torch.set_num_threads(threads)
    from flare_utils.inference.predictor import EfficientPredictor
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    p = EfficientPredictor.from_results_folder(model, folds=(0,), mode="efficient", device="cpu", monitor=False,
                                               centre_threshold=0)
    pre = p.preprocess(image)
    padded = pad_nd_image(pre.data, p.patch_size, "constant", {"value": 0}, False, None)
    grid = p.make_grid(padded.shape[1:], pre.long_axis)
    starts = [s for g in grid.groups() for s in g]
    pick = [starts[round(i * (len(starts) - 1) / max(1, n - 1))] for i in range(min(n, len(starts)))]
    wins = [padded[(slice(None), *(slice(s, s + q) for s, q in zip(st, p.patch_size)))][None].contiguous()
            for st in pick]
    return p, wins, {"windows_in_grid": len(starts), "windows_used": len(wins), "grid_shape": list(grid.shape)}


def _time(fn, wins, warmup: int, reps: int) -> tuple[list[float], list]:
    import torch
    outs = []
    with torch.inference_mode():
        for _ in range(warmup):
            fn(wins[0])
        times = []
        for r in range(reps):
            for i, w in enumerate(wins):
                t = time.perf_counter()
                y = fn(w)
                times.append(time.perf_counter() - t)
                if r == 0:
                    outs.append(y)
    return times, outs


def backends_worker(model: str, image: str, onnx_path: str, threads: int, n_windows: int, warmup: int,
                    reps: int, kinds: str) -> dict:
    import numpy as np
    import torch
    p, wins, info = _case_windows(model, image, n_windows, threads)
    onnx_path = Path(onnx_path)
    t0 = time.perf_counter()
    if not onnx_path.is_file():
        from flare_utils.inference.backends import export_onnx
        export_onnx(p.networks[0], p.patch_size, onnx_path)
    res: dict = {**info, "threads": threads, "warmup": warmup, "reps": reps, "export_s": time.perf_counter() - t0,
                 "torch": torch.__version__, "load_before": os.getloadavg()[0], "backends": {}}
    net = p.networks[0]
    fns = {"torch_onednn": lambda x: net(x)}
    for kind in kinds.split(","):
        try:
            fns[kind] = _Runner(kind, onnx_path, threads)
        except Exception as e:          # package missing, or a plugin that cannot run here
            res["backends"][kind] = {"error": f"{type(e).__name__}: {e}"}
    # interleaved (every window through every backend in turn), so that a change of the machine's load
    # affects all backends alike
    times = {k: [] for k in fns}
    outs = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for f in fns.values():
                f(wins[0])
        for r in range(reps):
            for w in wins:
                for k, f in fns.items():
                    t = time.perf_counter()
                    y = f(w)
                    times[k].append(time.perf_counter() - t)
                    if r == 0:
                        outs[k].append(y)
    ref = outs["torch_onednn"]
    for k, f in fns.items():
        b = res["backends"][k] = {"median_s": float(np.median(times[k])), "min_s": float(np.min(times[k])),
                                  "n": len(times[k])}
        if k != "torch_onednn":
            b.update(max_abs_logit_diff=max(float((o - t).abs().max()) for o, t in zip(outs[k], ref)),
                     logit_abs_max=max(float(t.abs().max()) for t in ref),
                     argmax_agreement=float(np.mean([float((o.argmax(1) == t.argmax(1)).float().mean())
                                                     for o, t in zip(outs[k], ref)])),
                     version=f.version)
    t_ref = res["backends"]["torch_onednn"]["median_s"]
    for k, b in res["backends"].items():
        if "median_s" in b:
            b["speedup_vs_torch"] = t_ref / b["median_s"]
    res["maxrss_mib"] = _maxrss_mib()
    res["load_after"] = os.getloadavg()[0]
    return res


def tta_worker(model: str, image: str, threads: int, n_windows: int, warmup: int) -> dict:
    """nnU-Net's per-window time with and without mirroring, on windows of the case (for the extrapolation)."""
    import numpy as np
    import torch
    torch.set_num_threads(threads)
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    _, wins, info = _case_windows(model, image, n_windows, threads)
    out = {**info, "threads": threads, "load_before": os.getloadavg()[0]}
    for mirroring in (False, True):
        p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                            perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                            allow_tqdm=False)
        p.initialize_from_trained_model_folder(model, (0,))
        p.network.eval()
        times, _ = _time(p._internal_maybe_mirror_and_predict, wins, warmup, 1)
        out["mirrored" if mirroring else "plain"] = {"median_s": float(np.median(times)), "mean_s": float(np.mean(times)),
                                                     "n": len(times)}
    out["load_after"] = os.getloadavg()[0]
    return out


def agreement(a: str, b: str) -> float:
    import nibabel as nib
    import numpy as np
    x, y = np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj)
    return float(np.mean(x == y))


# ----------------------------------------------------------------------------------------------
def _run_child(args: list[str], timeout: float = 4 * 3600) -> dict:
    return run_child(__file__, args, timeout=timeout)


def _child_main(argv: list[str]) -> None:
    kind, a = argv[0], argv[1:]
    if kind == "build_model":
        out = build_model(Path(a[0]), int(a[1]))
    elif kind == "make_case":
        out = make_case(Path(a[0]), int(a[1]), int(a[2]), int(a[3]), tuple(float(s) for s in a[4:7]))
    elif kind == "worker":
        out = worker(a[0], a[1], a[2], a[3], int(a[4]), a[5])
    elif kind == "backends":
        out = backends_worker(a[0], a[1], a[2], int(a[3]), int(a[4]), int(a[5]), int(a[6]), a[7])
    elif kind == "tta":
        out = tta_worker(a[0], a[1], int(a[2]), int(a[3]), int(a[4]))
    elif kind == "agreement":
        out = {"agreement": agreement(a[0], a[1])}
    else:
        raise SystemExit(f"unknown child {kind}")
    reply(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/flare_bench_realsize"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "realsize.json")
    ap.add_argument("--part", choices=("all", "e2e", "backends"), default="all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the random network")
    ap.add_argument("--case-seed", type=int, default=7001)
    ap.add_argument("--slices", type=int, default=400)
    ap.add_argument("--inplane", type=int, default=512)
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 2.5), metavar=("X", "Y", "Z"))
    ap.add_argument("--methods", nargs="+", default=list(E2E_METHODS), choices=E2E_METHODS)
    ap.add_argument("--nnunet-tta", choices=("auto", "full", "extrapolate"), default="auto")
    ap.add_argument("--tta-budget-s", type=float, default=900)
    ap.add_argument("--tta-windows", type=int, default=6, help="windows timed for the TTA extrapolation")
    ap.add_argument("--backends", default="onnx,openvino,openvino_bf16")
    ap.add_argument("--backend-windows", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="passes over the backend windows (median over all)")
    ap.add_argument("--backend-e2e", choices=("auto", "always", "never"), default="auto")
    ap.add_argument("--e2e-min-speedup", type=float, default=1.5)
    a = ap.parse_args()

    a.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    model, model_info = ensure_model(a.work, a.seed)
    case = ensure_case(a.work, a.case_seed, a.slices, a.inplane, tuple(a.spacing))
    onnx_path = a.work / "model" / f"efficient_seed{a.seed}.onnx"
    results: dict = {"model": str(model), "model_info": model_info, "case": case, "threads": a.threads,
                     "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "date": time.strftime("%Y-%m-%d %H:%M"),
                     "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "platform": platform.platform()}, "runs": [], "notes": [
        "weights: " + model_info["weights"] + "; labels are meaningless, timings are not",
        "ours: centre threshold 0 (all 9 windows per z step); windows_paper_rule = the paper's rule's count"]}
    print(f"model: {model_info['parameters'] / 1e6:.2f}M parameters, {model_info['weights']}", flush=True)

    def save():
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1, default=float))

    if a.part in ("all", "backends"):
        t0 = time.time()
        b = _run_child(["backends", str(model), case["image"], str(onnx_path), str(a.threads),
                        str(a.backend_windows), str(a.warmup), str(a.reps), a.backends])
        b["process_s"] = time.time() - t0
        results["backends"] = b
        save()
        print(markdown_backends(b), flush=True)
    if a.part in ("all", "e2e"):
        methods = [m for m in E2E_METHODS if m in a.methods]
        b = results.get("backends", {}).get("backends", {})
        extra = [f"ours_efficient_{k}" for k in BACKENDS if "error" not in b.get(k, {}) and (
            a.backend_e2e == "always" or (
                a.backend_e2e == "auto" and b.get(k, {}).get("speedup_vs_torch", 0) >= a.e2e_min_speedup))]
        for method in [m for m in methods if m != "nnunet_default"] + extra + \
                      (["nnunet_default"] if "nnunet_default" in methods else []):
            t0 = time.time()
            if method == "nnunet_default":
                r = _nnunet_default(a, model, case, results["runs"])
            else:
                try:
                    r = _run_child(["worker", method, str(model), case["image"], str(a.work / "pred" / method),
                                    str(a.threads), str(onnx_path)])
                except RuntimeError as e:
                    if method == "ours_efficient" or not method.startswith("ours_efficient_"):
                        raise
                    print(f"{method}: failed, left out ({str(e).strip().splitlines()[-1]})", flush=True)
                    results.setdefault("failed", {})[method] = str(e)[-2000:]
                    continue
            r["process_s"] = time.time() - t0
            if method.startswith("ours_efficient_"):
                ref = next((x for x in results["runs"] if x["method"] == "ours_efficient"), None)
                if ref:
                    r["label_agreement_vs_torch"] = _run_child(["agreement", r["output"], ref["output"]])["agreement"]
            results["runs"].append(r)
            save()
            print(f"{method:22s} windows {r['windows_evaluated']:5d} fwd passes {r['forward_passes']:6d} "
                  f"wall {r['wall_s']:8.1f} s  forward {r.get('network_forward_s', float('nan')):8.1f} s  "
                  f"maxrss {r.get('maxrss_mib') or float('nan'):7.0f} MiB"
                  + ("  (EXTRAPOLATED)" if r.get("extrapolated") else ""), flush=True)
        print(markdown_e2e(results))
    save()


def _nnunet_default(a, model: Path, case: dict, runs: list[dict]) -> dict:
    no_tta = next((r for r in runs if r["method"] == "nnunet_no_tta"), None)
    mode = a.nnunet_tta
    if mode == "auto":
        if no_tta is None:
            mode = "full"
        else:
            est = no_tta["wall_s"] + 7 * no_tta["network_forward_s"]
            mode = "full" if est <= a.tta_budget_s else "extrapolate"
            print(f"nnunet_default: estimated {est:.0f} s -> {mode}", flush=True)
    if mode == "full" or no_tta is None:
        return _run_child(["worker", "nnunet_default", str(model), case["image"], str(a.work / "pred" / "nnunet_default"),
                           str(a.threads), ""])
    t = _run_child(["tta", str(model), case["image"], str(a.threads), str(a.tta_windows), str(a.warmup)])
    extra = t["mirrored"]["mean_s"] - t["plain"]["mean_s"]
    n = no_tta["windows_evaluated"]
    return {"method": "nnunet_default", "extrapolated": True, "windows_evaluated": n, "forward_passes": 8 * n,
            "wall_s": no_tta["wall_s"] + n * extra,
            "network_forward_s": no_tta["network_forward_s"] + n * extra,
            "maxrss_mib": None, "tta_timing": t,
            "derivation": (f"nnunet_no_tta wall {no_tta['wall_s']:.1f} s (measured) + {n} windows x "
                           f"({t['mirrored']['mean_s']:.3f} - {t['plain']['mean_s']:.3f}) s (mean per-window time with "
                           f"and without mirroring over {t['plain']['n']} windows of the case, nnU-Net's "
                           "_internal_maybe_mirror_and_predict); peak RSS not measured (mirroring adds only "
                           "per-window tensors; take nnunet_no_tta's)")}


def markdown_backends(b: dict) -> str:
    rows = [f"Per-window forward, {b['windows_used']} windows of the case x {b['reps']} passes after {b['warmup']} "
            f"warm-up, {b['threads']} threads (load {b['load_before']:.1f} -> {b['load_after']:.1f})", "",
            "| backend | median (s) | min (s) | speed-up vs torch | max abs logit diff | argmax agreement |",
            "|---|---|---|---|---|---|"]
    for k, r in b["backends"].items():
        if "error" in r:
            rows.append(f"| {k} | {r['error']} | | | | |")
            continue
        rows.append(f"| {k} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['speedup_vs_torch']:.2f}x | "
                    f"{r.get('max_abs_logit_diff', 0):.2e} | {r.get('argmax_agreement', 1):.6f} |")
    return "\n".join(rows)


def markdown_e2e(results: dict) -> str:
    rows = ["| method | windows (forward passes) | wall (s) | network forward (s) | peak RSS (MiB) | note |",
            "|---|---|---|---|---|---|"]
    for r in results["runs"]:
        note = []
        if r.get("extrapolated"):
            note.append("EXTRAPOLATED: " + r["derivation"])
        if "windows_paper_rule" in r and r["windows_paper_rule"] != r["windows_evaluated"]:
            note.append(f"paper's skip rule: {r['windows_paper_rule']} windows")
        if "label_agreement_vs_torch" in r:
            note.append(f"labels equal to torch's: {r['label_agreement_vs_torch']:.6f}")
        rss = f"{r['maxrss_mib']:.0f}" if r.get("maxrss_mib") else "-"
        rows.append(f"| {r['method']} | {r['windows_evaluated']} ({r['forward_passes']}) | {r['wall_s']:.1f} | "
                    f"{r['network_forward_s']:.1f} | {rss} | {'; '.join(note)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
