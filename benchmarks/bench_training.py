"""Benchmark: training iterations per second of FlarePseudoLabelTrainer vs stock nnUNetTrainer.

Both trainers run in the same process on the same demo-scale plan (`efficient_demo`: 8 base
features, 3 downsamplings, patch 24x48x64, batch 2) and the same synthetic phantom data (`demo`
preset, abdomen field of view): stock nnU-Net v2 `nnUNetTrainer` on the labelled cases, ours on the
labelled cases plus pseudo-labelled cases (the phantom's truth of its "unlabelled" cases) with
pseudo share 0.5 (`MixedBatchDataLoader`). One training iteration = what nnU-Net's `run_training`
does per iteration: `train_step(next(dataloader_train))` (patch sampling, augmentation, forward,
backward, SGD step). Both use nnU-Net's augmentation in the main process (`nnUNet_n_proc_DA=0` /
`n_proc_da: 0`), the same torch thread count, fp32 on CPU (or AMP on CUDA), seed 0.

Warm-up iterations are excluded; then blocks of `--iterations` iterations alternate in ABBA order
(stock, ours, ours, stock, stock, ours, ...; `--blocks` each), so that load drift on a shared
machine hits both alike. Reported:
median and mean iterations/s of each trainer and the ratio ours/stock (of the medians of the
per-iteration times). Prints a markdown table and writes JSON (default benchmarks/results/training.json).

    .venv/bin/python benchmarks/bench_training.py [--iterations 10] [--blocks 6] [--warmup 3]
        [--threads 1] [--device cpu] [--workdir DIR] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASET = 521
NAME = "BenchTrain"
PLANS = "nnUNetPlans_efficient_demo"


def prepare(workdir: Path, n_labelled: int, n_unlabelled: int) -> dict:
    """Phantom cohort -> nnU-Net raw dataset -> efficient_demo plans -> selection file (reused)."""
    from flare_utils.data.convert import convert_flare22
    from flare_utils.synthetic.phantom import write_cohort
    from flare_utils.planning.plans import plan_and_preprocess
    from flare_utils.layout import RunLayout
    from flare_utils.semisup.selection_file import write_selection_file
    from flare_utils.training.with_pseudo_labels import prepare_pseudo_cases

    RunLayout(workdir).activate()
    info = write_cohort(workdir / "cohort", n_labelled, n_unlabelled, 1, preset="demo", fov_mix="abdomen")
    res = convert_flare22(workdir / "cohort", workdir / "nnUNet_raw", DATASET, NAME)
    plan_and_preprocess(DATASET, ("efficient_demo",), processes=1, verify=False)
    unl = sorted(f.name[:-len("_0000.nii.gz")] for f in (res.dataset_dir / "imagesUnlabelled").glob("*_0000.nii.gz"))
    sel = write_selection_file(workdir / "selection.json", unl, workdir / "cohort" / "SyntheticTruth" /
                               "unlabelled_labels", res.dataset_dir / "imagesUnlabelled")
    prepare_pseudo_cases(DATASET, PLANS, sel)
    return {"selection": sel, "n_labelled": n_labelled, "n_unlabelled": len(unl), "cohort_seed": info.seed}


def make_trainers(workdir: Path, selection: Path, device: str, threads: int):
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from flare_utils.training.with_pseudo_labels import FlarePseudoLabelTrainer, PseudoLabelConfig

    pre = workdir / "nnUNet_preprocessed" / f"Dataset{DATASET:03d}_{NAME}"
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    dj = json.loads((pre / "dataset.json").read_text())
    dev = torch.device(device)
    cfg = PseudoLabelConfig.from_dict({"device": device, "seed": 0, "n_proc_da": 0, "num_threads": threads,
                                       "selection_file": str(selection), "pseudo_share": 0.5,
                                       "num_epochs": 1000, "num_iterations_per_epoch": 250})
    cfg_file = cfg.save(workdir / "bench_config.json")
    os.environ["FLARE_TRAINING_CONFIG"] = str(cfg_file)
    os.environ["nnUNet_n_proc_DA"] = "0"
    torch.manual_seed(0)
    stock = nnUNetTrainer({**plans, "continue_training": False}, "3d_fullres", 0, dj, dev)
    ours = FlarePseudoLabelTrainer({**plans, "continue_training": False}, "3d_fullres", 0, dj, dev)
    for t in (stock, ours):
        t.on_train_start()
        t.network.train()
        t.on_train_epoch_start()
    torch.set_num_threads(threads)
    return stock, ours


def iterate(trainer, n: int) -> list[float]:
    import torch
    times = []
    for _ in range(n):
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.train_step(next(trainer.dataloader_train))
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=10, help="timed iterations per block")
    ap.add_argument("--blocks", type=int, default=6, help="alternating blocks per trainer")
    ap.add_argument("--warmup", type=int, default=3, help="untimed iterations per trainer first")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--labelled", type=int, default=6)
    ap.add_argument("--unlabelled", type=int, default=6)
    ap.add_argument("--workdir", default=None, help="keep data here (reused when re-run); default: a temp dir")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "training.json"))
    a = ap.parse_args(argv)

    tmp = None
    if a.workdir:
        workdir = Path(a.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_training_")
        workdir = Path(tmp.name)
    t0 = time.perf_counter()
    data = prepare(workdir, a.labelled, a.unlabelled)
    prep_s = time.perf_counter() - t0
    import torch
    stock, ours = make_trainers(workdir, data["selection"], a.device, a.threads)
    iterate(stock, a.warmup)
    iterate(ours, a.warmup)
    times = {"stock": [], "ours": []}
    for b in range(a.blocks):       # ABBA order: load drift on a shared machine hits both alike
        order = (("stock", stock), ("ours", ours)) if b % 2 == 0 else (("ours", ours), ("stock", stock))
        for k, t in order:
            times[k] += iterate(t, a.iterations)
        print(f"block {b + 1}/{a.blocks}: stock {statistics.median(times['stock']):.3f} s/it, "
              f"ours {statistics.median(times['ours']):.3f} s/it", flush=True)
    for t in (stock, ours):
        t.dataloader_train = t.dataloader_val = None

    res = {}
    for k, v in times.items():
        res[k] = {"iterations": len(v), "median_s_per_it": statistics.median(v), "mean_s_per_it": statistics.mean(v),
                  "median_it_per_s": 1.0 / statistics.median(v), "mean_it_per_s": len(v) / sum(v)}
    ratio = res["ours"]["median_it_per_s"] / res["stock"]["median_it_per_s"]
    ratio_mean = res["ours"]["mean_it_per_s"] / res["stock"]["mean_it_per_s"]
    cm = stock.configuration_manager
    out = {
        "benchmark": "training iterations per second, FlarePseudoLabelTrainer vs nnUNetTrainer",
        "plans": PLANS, "patch_size": list(cm.patch_size), "batch_size": int(stock.batch_size),
        "data": {**{k: v for k, v in data.items() if k != "selection"}, "preset": "demo", "fov": "abdomen"},
        "pseudo_share": 0.5, "device": a.device, "torch_threads": a.threads, "warmup": a.warmup,
        "blocks": a.blocks, "iterations_per_block": a.iterations, "results": res,
        "ratio_ours_over_stock_median": ratio, "ratio_ours_over_stock_mean": ratio_mean,
        "data_preparation_s": prep_s,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
    }
    print("\n| trainer | median s/it | median it/s | mean it/s |\n|---|---|---|---|")
    for k, name in (("stock", "nnUNetTrainer (stock)"), ("ours", "FlarePseudoLabelTrainer")):
        r = res[k]
        print(f"| {name} | {r['median_s_per_it']:.3f} | {r['median_it_per_s']:.2f} | {r['mean_it_per_s']:.2f} |")
    print(f"\nratio ours/stock: {ratio:.3f} (medians), {ratio_mean:.3f} (means)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2, default=str))
    print(f"written {a.out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
