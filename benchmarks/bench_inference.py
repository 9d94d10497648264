"""Benchmark: efficient inference (flare_utils.inference.predictor) against nnU-Net v2's own predictor.

Usage::

    .venv/bin/python benchmarks/bench_inference.py                      # trains a demo model, ~30-60 min on 2 cores
    .venv/bin/python benchmarks/bench_inference.py --model RESULTS_DIR  # reuse a trained results folder

What runs, each measurement in its own fresh subprocess (so its peak RSS is its own):

* cases: synthetic CTs from `flare_utils.synthetic.phantom` at 512 x 512 with 0.8 x 0.8 x 1.25 mm voxels: a
  "whole_body"-FOV scan of 400 slices, an abdomen-only scan, and (for memory) a 1000-slice scan;
* model: unless --model is given, `tests/demo_model.py`'s `train_demo_model` trains the project's
  `efficient_demo` plan (stock nnU-Net v2 trainer, nnU-Net's Adam recipe, short schedule) on
  demo-scale phantom cases;
* methods: ours (mode "efficient", no TTA, centre threshold 1 voxel = the paper's rule), the same
  with a 1000-voxel centre threshold (`_t1000`), with the in-plane step 0.33 (`_ip33`), with the
  adaptive in-plane grid (`_adaptive`: the 3x3 windows spread to the edges of a body wider than the
  paper's band; `_adaptive50`, only when named in --methods: at most 0.5 patch between windows, so
  more windows on wide bodies), the same over a folder of 4 copies of the case (`_batch4`:
  background read/preprocess and write; wall time per case), the same with PyTorch's native
  convolution dispatch (`onednn=False`, to separate the oneDNN gain from the algorithmic one),
  ours (mode "full", no TTA: the DSC reference of the efficient sliding window), nnU-Net v2's
  `nnUNetPredictor` with its defaults (step 0.5, Gaussian, mirroring over the checkpoint's axes) and
  with mirroring off; on `--gap-cases` more whole-body cases (other seeds) only ours full and the
  efficient variants of GAP_METHODS, because one case's efficient-vs-full DSC difference is noisy.
  nnU-Net is run single-process (`predict_from_files_sequential`; its multi-process variant only
  adds worker processes for preprocessing/export, which on 2 cores does not shorten a single case);
* figures: windows (and network forward passes: windows x 8 with mirroring), wall time of the
  prediction (model loaded, file to file), peak RSS (ru_maxrss of the worker: whole process,
  imports and model included; plus the ResourceMonitor's peak during prediction), DSC per case
  (mean over the organs present in the ground truth, flare_utils.evaluation.metrics), and for ours the time per
  phase and the summed network-forward time of the windows evaluated, for the first case of the
  process (cold: what one `flare-study predict` call costs) and for the same case predicted again in
  that process (`warm`: every later case of a batch).

Results: JSON (--out, default benchmarks/results/inference.json) and a Markdown table on stdout.
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
sys.path.insert(0, str(PROJECT / "tests"))   # demo_model: the test suite's small trained model

METHODS = ("ours_efficient", "ours_efficient_native", "ours_full", "ours_efficient_t1000", "ours_efficient_batch4",
           "ours_efficient_ip33", "ours_efficient_adaptive", "nnunet_default", "nnunet_no_tta")
# run only when named in --methods: the adaptive grid with another largest spacing (adaptive50: 0.5 patch)
EXTRA_METHODS = ("ours_efficient_adaptive50",)
GAP_METHODS = ("ours_efficient", "ours_full", "ours_efficient_ip33", "ours_efficient_adaptive",
               "ours_efficient_adaptive50")
# (case, method) pairs of a default run
RUNS = [("wholebody", m) for m in (*METHODS, *EXTRA_METHODS)] + \
       [("abdomen", m) for m in ("ours_efficient", "ours_full", "ours_efficient_adaptive", "ours_efficient_adaptive50",
                                 "nnunet_default", "nnunet_no_tta")] + \
       [("long", m) for m in ("ours_efficient", "ours_full", "ours_efficient_t1000")]


# ----------------------------------------------------------------------------------------------
# cases

def make_case(path_img: Path, path_gt: Path, seed: int, fov: str, n_slices: int | None) -> dict:
    import numpy as np
    from flare_utils.synthetic.phantom import PRESETS, generate_case
    preset = dataclasses.replace(PRESETS["realistic"], name="bench_0.8x1.25", matrix=(512, 512),
                                 inplane_spacing=(0.8, 0.8), slice_spacing=(1.25, 1.25), slice_choices=(1.25,),
                                 max_slices=max(400, n_slices or 0), n_slices=n_slices)
    c = generate_case(seed, preset, fov=fov)
    c.label = c.label.astype(np.uint8)
    c.save(path_img, path_gt)
    return {"shape": list(c.shape), "spacing": list(c.spacing), "fov": fov, "seed": seed,
            "present_labels": list(map(int, c.present_labels))}


def gap_case_names(n: int) -> list[str]:
    """Names of the extra whole-body cases (efficient vs full DSC only)."""
    return [f"wholebody{i + 2}" for i in range(n)]


def ensure_cases(work: Path, long_slices: int, skip_long: bool, gap_cases: int = 0) -> dict[str, dict]:
    specs = {"wholebody": dict(seed=7001, fov="whole_body", n_slices=400),
             "abdomen": dict(seed=7002, fov="abdomen", n_slices=None)}
    for i, name in enumerate(gap_case_names(gap_cases)):
        specs[name] = dict(seed=7011 + i, fov="whole_body", n_slices=400)
    if not skip_long:
        specs["long"] = dict(seed=7003, fov="whole_body", n_slices=long_slices)
    out = {}
    for name, s in specs.items():
        d = work / "cases" / name
        img, gt = d / "images" / f"{name}_0000.nii.gz", d / "gt" / f"{name}.nii.gz"
        meta = d / "case.json"
        if meta.is_file() and json.loads(meta.read_text()).get("spec") == s and img.is_file() and gt.is_file():
            out[name] = json.loads(meta.read_text())
            continue
        img.parent.mkdir(parents=True, exist_ok=True)
        gt.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        # generate in a child process: the 1000-slice case needs several GB while it is drawn
        res = _run_child(["make_case", str(img), str(gt), str(s["seed"]), s["fov"], str(s["n_slices"] or 0)])
        info = {"spec": s, "image": str(img), "gt": str(gt), **res, "generate_s": time.time() - t0}
        meta.write_text(json.dumps(info, indent=1))
        out[name] = info
        print(f"case {name}: {info['shape']} {info['spacing']} ({info['generate_s']:.0f} s)", flush=True)
    return out


# ----------------------------------------------------------------------------------------------
# model

def ensure_model(work: Path, epochs: int, iterations: int, n_cases: int, optimizer: str = "adamw",
                 oversample: float | None = None, augment: bool = False) -> Path:
    from demo_model import train_demo_model
    t0 = time.time()
    m = train_demo_model(work / "model", dataset_id=952, name="BenchInference", n_cases=n_cases, preset="demo",
                         fov=("abdomen", "whole_body", "chest_abdomen_pelvis", "abdomen", "abdomen_pelvis"),
                         variant="efficient_demo", epochs=epochs, iterations=iterations, seed=1, timeout=4 * 3600,
                         optimizer=optimizer, oversample_foreground=oversample, augment=augment)
    print(f"model: {m} ({time.time() - t0:.0f} s)", flush=True)
    return m


# ----------------------------------------------------------------------------------------------
# workers (run in subprocesses)

def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(method: str, model: str, image: str, out_dir: str, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    from flare_utils.evaluation.efficiency import ResourceMonitor
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = Path(image).name.replace("_0000.nii.gz", "")
    res: dict = {"method": method, "threads": threads, "load_before": os.getloadavg()[0]}
    if method.startswith("ours"):
        import re
        import shutil
        from flare_utils.inference.defaults import ADAPTIVE_MAX_STEP, DEFAULT_CENTRE_THRESHOLD, DEFAULT_INPLANE_STEP
        from flare_utils.inference.predictor import EfficientPredictor
        thr = re.search(r"_t(\d+)", method)
        batch = re.search(r"_batch(\d+)", method)
        inplane = re.search(r"_ip(\d+)", method)
        adaptive = re.search(r"_adaptive(\d*)", method)
        centre_threshold = int(thr.group(1)) if thr else DEFAULT_CENTRE_THRESHOLD
        inplane_step = int(inplane.group(1)) / 100 if inplane else DEFAULT_INPLANE_STEP
        grid = dict(inplane_grid="adaptive" if adaptive else "paper",
                    adaptive_max_step=int(adaptive.group(1)) / 100 if adaptive and adaptive.group(1) else ADAPTIVE_MAX_STEP)
        t0 = time.perf_counter()
        p = EfficientPredictor.from_results_folder(model, folds=(0,), mode="full" if "full" in method else "efficient",
                                                   device="cpu", monitor=False, onednn="native" not in method,
                                                   centre_threshold=centre_threshold, inplane_step=inplane_step,
                                                   **grid)
        res["load_model_s"] = time.perf_counter() - t0
        res["centre_threshold"] = p.centre_threshold
        res.update(inplane_step=p.inplane_step, inplane_grid=p.inplane_grid, adaptive_max_step=p.adaptive_max_step)
        if batch:
            # a folder of N copies (links) of the case: background read/preprocess and write overlap the network
            n = int(batch.group(1))
            src = out_dir / "in"
            shutil.rmtree(out_dir, ignore_errors=True)
            src.mkdir(parents=True)
            for i in range(n):
                os.symlink(image, src / f"{name}{i}_0000.nii.gz")
            with ResourceMonitor(interval=0.1) as mon:
                t0 = time.perf_counter()
                df = p.predict_folder(src, out_dir)
                res["wall_s"] = time.perf_counter() - t0
            res.update(batch_cases=n, wall_per_case_s=res["wall_s"] / n,
                       network_forward_s=float(df["network_forward_s"].sum()) / n,
                       time_network_s=float(df["time_network_s"].sum()) / n,
                       windows_evaluated=int(df["windows_evaluated"].iloc[0]),
                       forward_passes=int(df["windows_evaluated"].iloc[0]))
            os.replace(out_dir / f"{name}0.nii.gz", out_dir / f"{name}.nii.gz")
        else:
            with ResourceMonitor(interval=0.1) as mon:
                t0 = time.perf_counter()
                _, rep = p.predict_case(image, out_dir / f"{name}.nii.gz", return_label=False)
                res["wall_s"] = time.perf_counter() - t0
            phases = ("time_read_s", "time_preprocess_s", "time_network_s", "network_forward_s", "time_resample_s",
                      "time_write_s", "total_s")
            row = rep.to_row()
            res.update({k: row[k] for k in ("windows_evaluated", "windows_skipped", "windows_grid",
                                            "windows_paper_eq2", "windows_nnunet_full", "z_steps", *phases,
                                            "network_shape", "padded_shape", "crop_box")})
            res["centre_foreground"] = [w["foreground"] for w in rep.windows if w["role"] == "centre"]
            res["forward_passes"] = rep.windows_evaluated
            # the same case again in the same process: steady state (oneDNN primitives built, memory mapped
            # once), as every case after the first of a batch; the first one above is the cold single case
            _, warm = p.predict_case(image, out_dir / f"{name}_warm.nii.gz", return_label=False)
            res["warm"] = {k: getattr(warm, k) for k in phases}
            os.remove(out_dir / f"{name}_warm.nii.gz")
    else:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from flare_utils.inference.sliding_window import nnunet_window_count
        mirroring = method == "nnunet_default"
        t0 = time.perf_counter()
        p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                            perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                            allow_tqdm=False)
        p.initialize_from_trained_model_folder(model, (0,))
        res["load_model_s"] = time.perf_counter() - t0
        with ResourceMonitor(interval=0.1) as mon:
            t0 = time.perf_counter()
            p.predict_from_files_sequential([[image]], [str(out_dir / name)], False, True, None)
            res["wall_s"] = time.perf_counter() - t0
        # nnU-Net's windows: its (nonzero-cropped = whole CT) image resampled to the plans' spacing
        import nibabel as nib
        from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
        img = nib.load(image)
        shape = [img.shape[2], img.shape[1], img.shape[0]]
        sp = [float(z) for z in img.header.get_zooms()[:3]][::-1]
        tf = p.plans_manager.transpose_forward
        new = compute_new_shape([shape[t] for t in tf], [sp[t] for t in tf], p.configuration_manager.spacing)
        padded = [max(int(s), int(q)) for s, q in zip(new, p.configuration_manager.patch_size)]
        n = nnunet_window_count(padded, p.configuration_manager.patch_size, 0.5)
        n_mirror = 2 ** len(p.allowed_mirroring_axes or ()) if mirroring else 1
        res.update(windows_evaluated=n, forward_passes=n * n_mirror, padded_shape=padded)
    res["peak_rss_monitor_mib"] = mon.result.peak_rss_mib
    res["cpu_util_mean"] = mon.result.cpu_util_mean
    res["maxrss_mib"] = _maxrss_mib()
    res["load_after"] = os.getloadavg()[0]
    res["output"] = str(out_dir / f"{name}.nii.gz")
    return res


def dsc_of(pred: str, gt: str) -> dict:
    import nibabel as nib
    import numpy as np
    from flare_utils.evaluation.metrics import evaluate_case
    g = nib.load(gt)
    gt_a = np.asarray(g.dataobj)
    pr = np.asarray(nib.load(pred).dataobj)
    scores = evaluate_case(pr, gt_a, tuple(float(z) for z in g.header.get_zooms()[:3]))
    present = [int(l) for l in np.unique(gt_a) if l > 0]
    d = {int(k): float(v.dsc) for k, v in scores.items()}
    return {"mean_dsc_present": float(np.mean([d[l] for l in present])) if present else None,
            "liver_dsc": d.get(1), "dsc_per_label": d, "present": present}


def _run_child(args: list[str], timeout: float = 3600) -> dict:
    return run_child(__file__, args, timeout=timeout)


def _child_main(argv: list[str]) -> None:
    kind = argv[0]
    if kind == "make_case":
        img, gt, seed, fov, n = argv[1:]
        out = make_case(Path(img), Path(gt), int(seed), fov, int(n) or None)
    elif kind == "worker":
        out = worker(*argv[1:5], int(argv[5]))
    elif kind == "dsc":
        out = dsc_of(argv[1], argv[2])
    else:
        raise SystemExit(f"unknown child {kind}")
    reply(out)


# ----------------------------------------------------------------------------------------------
def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/flare_bench_inference"))
    ap.add_argument("--model", type=Path, default=None, help="trained nnU-Net v2 results folder to reuse")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "inference.json")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every measured run")
    ap.add_argument("--train-epochs", type=int, default=60)
    ap.add_argument("--train-iterations", type=int, default=50)
    ap.add_argument("--train-cases", type=int, default=10)
    ap.add_argument("--train-optimizer", choices=("adamw", "sgd"), default="adamw",
                    help="the model's optimizer (adamw: nnU-Net's Adam recipe)")
    ap.add_argument("--train-oversample", type=float, default=None,
                    help="share of training patches centred on foreground (default: nnU-Net's 0.33)")
    ap.add_argument("--train-augment", action="store_true",
                    help="train with nnU-Net's data augmentation (default: none, which converges faster)")
    ap.add_argument("--long-slices", type=int, default=1000)
    ap.add_argument("--skip-long", action="store_true")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=(*METHODS, *EXTRA_METHODS))
    ap.add_argument("--cases", nargs="+", default=["wholebody", "abdomen", "long"])
    ap.add_argument("--gap-cases", type=int, default=4,
                    help="extra whole-body cases (other seeds) on which only ours full and the efficient "
                         "variants run: the efficient-vs-full DSC difference over several cases, not one")
    a = ap.parse_args()

    a.work.mkdir(parents=True, exist_ok=True)
    model = a.model or ensure_model(a.work, a.train_epochs, a.train_iterations, a.train_cases, a.train_optimizer,
                                     a.train_oversample, a.train_augment)
    cases = ensure_cases(a.work, a.long_slices, a.skip_long, a.gap_cases)
    marker = a.work / "model" / "flare_demo_model.json"
    results: dict = {"model": str(model), "threads": a.threads,
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), "machine": {
        "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "cases": cases, "runs": [],
        "model_request": json.loads(marker.read_text())["request"] if a.model is None and marker.is_file() else None}
    runs = [(c, m) for c, m in RUNS if c in a.cases and m in a.methods and not (c == "long" and a.skip_long)]
    runs += [(c, m) for c in gap_case_names(a.gap_cases) for m in GAP_METHODS if m in a.methods]
    for case, method in runs:
        info = cases[case]
        t0 = time.time()
        r = _run_child(["worker", method, str(model), info["image"], str(a.work / "pred" / method / case),
                        str(a.threads)], timeout=4 * 3600)
        r.update(case=case, process_s=time.time() - t0)
        r.update(_run_child(["dsc", r["output"], info["gt"]]))
        results["runs"].append(r)
        print(f"{case:10s} {method:15s} windows {r['windows_evaluated']:5d} fwd {r['forward_passes']:6d} "
              f"wall {r['wall_s']:8.1f} s  maxrss {r['maxrss_mib']:7.0f} MiB  DSC {r['mean_dsc_present']:.4f} "
              f"liver {r['liver_dsc']:.4f}",
              flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1, default=float))
    results["efficient_vs_full"] = efficient_vs_full(results["runs"])
    a.out.write_text(json.dumps(results, indent=1, default=float))
    print(markdown(results))


def efficient_vs_full(runs: list[dict]) -> dict | None:
    """Mean DSC of each efficient variant minus ours full, per whole-body case and over them (mean,
    sd, n); `other_cases`: the same difference on the other cases both ran (abdomen); `windows`:
    the windows evaluated per case (whole-body and other)."""
    import numpy as np
    dsc = {(r["case"], r["method"]): r["mean_dsc_present"] for r in runs}
    windows = {(r["case"], r["method"]): r["windows_evaluated"] for r in runs}
    out = {}
    for method in (m for m in GAP_METHODS if m != "ours_full"):
        both = [c for c, m in dsc if m == method and (c, "ours_full") in dsc and c != "long"]
        cases = [c for c in both if c.startswith("wholebody")]
        if not cases:
            continue
        diff = {c: dsc[(c, method)] - dsc[(c, "ours_full")] for c in cases}
        d = np.array(list(diff.values()))
        out[method] = {"per_case": diff, "mean": float(d.mean()), "sd": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                       "n": len(d), "method_mean": float(np.mean([dsc[(c, method)] for c in cases])),
                       "full_mean": float(np.mean([dsc[(c, "ours_full")] for c in cases])),
                       "other_cases": {c: dsc[(c, method)] - dsc[(c, "ours_full")] for c in both if c not in cases},
                       "windows": {c: windows[(c, method)] for c in both}}
    return out or None


def markdown(results: dict) -> str:
    rows = ["| case | method | windows (forward passes) | wall (s) | network forward (s) | peak RSS (MiB) "
            "| mean DSC | liver DSC |", "|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        fwd = f"{r['network_forward_s']:.2f}" if "network_forward_s" in r else "-"
        wall = f"{r['wall_per_case_s']:.1f} per case" if "wall_per_case_s" in r else f"{r['wall_s']:.1f}"
        rows.append(f"| {r['case']} | {r['method']} | {r['windows_evaluated']} ({r['forward_passes']}) | "
                    f"{wall} | {fwd} | {r['maxrss_mib']:.0f} | {r['mean_dsc_present']:.4f} | "
                    f"{r['liver_dsc']:.4f} |")
    rows += ["", "| case | method | run | read | preprocess | sliding window (forward) | labels back | write | total "
             "| total / forward |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        for run, ph in (("cold", r), ("warm", r.get("warm"))):
            if not ph or "total_s" not in ph:
                continue
            rows.append(f"| {r['case']} | {r['method']} | {run} | {ph['time_read_s']:.2f} | {ph['time_preprocess_s']:.2f} "
                        f"| {ph['time_network_s']:.2f} ({ph['network_forward_s']:.2f}) | {ph['time_resample_s']:.2f} "
                        f"| {ph['time_write_s']:.2f} | {ph['total_s']:.2f} | {ph['total_s'] / ph['network_forward_s']:.2f} |")
    for method, g in (results.get("efficient_vs_full") or {}).items():
        rows.append(f"\n{method} - ours_full, mean DSC over {g['n']} whole-body cases: {g['mean']:+.4f} "
                    f"(sd {g['sd']:.4f}; {g['method_mean']:.4f} vs {g['full_mean']:.4f}); per case "
                    + ", ".join(f"{c} {v:+.4f}" for c, v in {**g["per_case"], **g.get("other_cases", {})}.items())
                    + "; windows " + ", ".join(f"{c} {n}" for c, n in g.get("windows", {}).items()))
    return "\n".join(rows)


if __name__ == "__main__":
    main()
