"""Benchmark: one pseudo-label round on a Dask LocalCluster against the same round in one process.

Usage::

    .venv/bin/python benchmarks/bench_distributed.py      # cold rounds, noop tasks, 200-case memory round: ~3 min
    .venv/bin/python benchmarks/bench_distributed.py --warmup 4 --skip-memory --noop 0 \
        --out benchmarks/results/distributed_warm.json    # rounds after a first one (steady state): ~2 min

(plus, the first time, the model's training and the cases, a few minutes, cached in --work)

What runs, each measurement in its own fresh subprocess (`OMP_WAIT_POLICY=PASSIVE`, as the other
benchmarks):

* model: `tests/demo_model.py`'s `train_demo_model`, the demo's teacher scale (8 base features,
  2 convs per stage, patch 24x32x32 at 8 mm), trained briefly: a round predicts in nnU-Net's full
  sliding-window mode, which runs every window whatever the weights, so its time does not depend
  on training;
* cases: `--cases` unlabelled phantoms of the demo preset with the demo's FLARE22-like fields of
  view (`flare_utils.synthetic.phantom.write_cohort`);
* the round (`flare_utils.semisup.rounds.predict_round`, the code the pseudo stage runs), cold
  (a fresh process / fresh workers: imports and the model load are part of the round) or, with
  `--warmup N`, after a first round of N cases in the same process / on the same workers:
  serial with 1 torch thread, serial with 2 torch threads, and on a `LocalCluster` of `--workers`
  worker processes x 1 thread, 1 torch thread each (`open_cluster`, as a study's `cluster:`
  section opens it); the label files of the three are compared byte for byte;
* Dask's own cost per task: `--noop` empty tasks through the same `map_cases` on that cluster;
* the overhead of the distributed round: its wall time minus the summed case times divided by the
  workers (what perfect scheduling would take), per task and as a share of a case's time;
* memory: `--memory-cases` cases (the distinct ones, linked again under more names) in one round on
  the cluster; each worker's resident memory after its 10th case and after its last.

Results: JSON (`--out`, default benchmarks/results/distributed.json) and Markdown tables on stdout.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(HERE))
from child import reply, run_child  # noqa: E402  (benchmarks/child.py)
sys.path.insert(0, str(PROJECT / "tests"))   # demo_model: the test suite's small trained model

# the demo's unlabelled fields of view (params/demo.yaml)
FOV_MIX = {"abdomen": 0.6, "abdomen_pelvis": 0.2, "chest_abdomen": 0.1, "chest_abdomen_pelvis": 0.1}


def ensure_model(work: Path, epochs: int, iterations: int) -> Path:
    from demo_model import train_demo_model
    return train_demo_model(work / "model", dataset_id=953, name="BenchDistributed", n_cases=5, preset="demo",
                            fov="abdomen", variant="tiny", patch_zyx=(24, 32, 32), spacing_zyx=(8.0, 8.0, 8.0),
                            n_conv=2, epochs=epochs, iterations=iterations, optimizer="adamw", seed=0)


def ensure_cases(work: Path, n: int, n_memory: int) -> tuple[Path, Path | None]:
    """`n` distinct unlabelled phantoms, and a folder of `n_memory` names linking to them in turn."""
    from flare_utils.synthetic.phantom import write_cohort
    root = work / f"cohort_{n}"
    write_cohort(root, 0, n, 0, seed=18, preset="demo", fov_mix={"unlabelled": FOV_MIX}, processes=2)
    images = root / "Training" / "FLARE22_UnlabeledCase"
    memory = None
    if n_memory:
        memory = work / f"images_{n_memory}"
        files = sorted(images.glob("*_0000.nii.gz"))
        if not memory.is_dir() or len(list(memory.glob("*_0000.nii.gz"))) != n_memory:
            tmp = memory.with_name(memory.name + ".partial")
            if tmp.exists():
                for f in tmp.iterdir():
                    f.unlink()
            tmp.mkdir(parents=True, exist_ok=True)
            for i in range(n_memory):
                (tmp / f"Mem_{i:05d}_0000.nii.gz").symlink_to(files[i % len(files)].resolve())
            if memory.exists():
                for f in memory.iterdir():
                    f.unlink()
                memory.rmdir()
            tmp.rename(memory)
    return images, memory


# ----------------------------------------------------------------------------------------------
# children

def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.nii.gz"))}


def _round_figures(info, folder: Path) -> dict:
    import pandas as pd
    cases = pd.read_csv(folder / "cases.csv")
    return {"predict_s": info.predict_s, "n_cases": info.n_cases, "case_s_sum": float(cases["seconds"].sum()),
            "case_s_mean": float(cases["seconds"].mean()), "case_s_median": float(cases["seconds"].median()),
            "memory": info.memory, "labels": _hashes(folder)}


def _warm_up(run_dir: str, model: str, images: str, warmup: int, client=None) -> dict:
    """A round of the first `warmup` cases into its own folder: imports, first-touch memory and (on
    the workers) the cached model are then in place, as for every round after the first."""
    from flare_utils.semisup.rounds import predict_round, unlabelled_images
    if not warmup:
        return {}
    cases = sorted(unlabelled_images(images))[:warmup]
    t0 = time.perf_counter()
    predict_round(run_dir + "_warmup", 1, model, images, device="cpu", cases=cases, client=client)
    return {"warmup_cases": len(cases), "warmup_s": time.perf_counter() - t0}


def child_serial(model: str, images: str, run_dir: str, threads: int, warmup: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    from flare_utils.semisup.rounds import predict_round, round_dir
    warm = _warm_up(run_dir, model, images, warmup)
    t0 = time.perf_counter()
    info = predict_round(run_dir, 1, model, images, device="cpu")
    return {"wall_s": time.perf_counter() - t0, **warm, **_round_figures(info, round_dir(run_dir, 1))}


def _noop(x):
    return x


def child_cluster(model: str, images: str, run_dir: str, workers: int, noop: int, memory_images: str,
                  memory_run: str, warmup: int) -> dict:
    import torch
    torch.set_num_threads(1)
    from flare_utils.distributed.cases import map_cases
    from flare_utils.distributed.cluster import ClusterParams, open_cluster
    from flare_utils.semisup.rounds import predict_round, round_dir
    out: dict = {}
    t0 = time.perf_counter()
    params = ClusterParams(type="local_cluster", workers=workers, threads_per_worker=1, torch_threads=1,
                           dashboard_address=":0")
    with open_cluster(params, device="cpu", say=lambda s: None) as client:
        client.wait_for_workers(workers, timeout=120)
        out["cluster_start_s"] = time.perf_counter() - t0
        out.update(_warm_up(run_dir, model, images, warmup, client))
        t1 = time.perf_counter()
        info = predict_round(run_dir, 1, model, images, device="cpu", client=client)
        out["wall_s"] = time.perf_counter() - t1
        out.update(_round_figures(info, round_dir(run_dir, 1)))
        if noop:
            t2 = time.perf_counter()
            n = sum(1 for _ in map_cases(client, _noop, ((str(i), i) for i in range(noop)), key_prefix="noop"))
            out["noop"] = {"tasks": n, "wall_s": time.perf_counter() - t2}
        if memory_images:
            import pandas as pd
            t3 = time.perf_counter()
            mem = predict_round(memory_run, 1, model, memory_images, device="cpu", client=client)
            recs = pd.read_csv(round_dir(memory_run, 1) / "cases.csv")
            per_worker = {}
            for w, g in recs.groupby("worker"):
                g = g.sort_values("index")
                at10 = g[g["index"] == 10]
                per_worker[str(w)] = {"cases": int(len(g)), "rss_mib_case10": float(at10["rss_mib"].iloc[0]),
                                      "rss_mib_last": float(g["rss_mib"].iloc[-1]),
                                      "rss_mib_max": float(g["rss_mib"].max()), "last_index": int(g["index"].iloc[-1])}
            out["memory_round"] = {"cases": mem.n_cases, "wall_s": time.perf_counter() - t3,
                                   "per_worker": per_worker, "summary": mem.memory}
    return out


def _run_child(args: list[str], threads: int, timeout: float = 3600) -> dict:
    return run_child(__file__, args, env={"OMP_NUM_THREADS": str(threads)}, timeout=timeout)


def _child_main(argv: list[str]) -> None:
    kind = argv[0]
    if kind == "serial":
        out = child_serial(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]))
    elif kind == "cluster":
        out = child_cluster(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]), argv[6], argv[7], int(argv[8]))
    else:
        raise SystemExit(f"unknown child {kind}")
    reply(out)


# ----------------------------------------------------------------------------------------------

def summarise(res: dict) -> dict:
    s1, s2, c = res["serial_1thread"], res["serial_2threads"], res["cluster"]
    w = res["workers"]
    ideal = c["case_s_sum"] / w                     # perfect scheduling of the workers' own case times
    overhead = (c["predict_s"] - ideal) / c["n_cases"]
    case_s = s1["case_s_mean"]                      # a case's time, measured alone (serial, 1 thread)
    noop = c.get("noop")
    return {
        "identical_labels_cluster_vs_serial1": c["labels"] == s1["labels"],
        "identical_labels_serial2_vs_serial1": s2["labels"] == s1["labels"],
        "throughput_ratio_vs_serial_1thread": s1["predict_s"] / c["predict_s"],
        "throughput_ratio_vs_serial_2threads": s2["predict_s"] / c["predict_s"],
        "serial_fixed_s": s1["predict_s"] - s1["case_s_sum"],      # imports and model load, once per round
        "cluster_round_minus_ideal_s": c["predict_s"] - ideal,
        "cluster_overhead_s_per_task": overhead,
        "cluster_overhead_share_of_case": overhead / case_s,
        "dask_noop_s_per_task": (noop["wall_s"] / noop["tasks"]) if noop else None,
        "dask_noop_share_of_case": (noop["wall_s"] / noop["tasks"] / case_s) if noop else None,
    }


def markdown(res: dict) -> str:
    s = res["summary"]
    rows = [f"warm-up round before the timed one: {res.get('warmup') or 'none'} case(s)", "",
            "| run | cases | round wall (s) | cases/min | mean case (s) | sum of case times (s) |",
            "|---|---|---|---|---|---|"]
    for key, name in (("serial_1thread", "serial, 1 torch thread"), ("serial_2threads", "serial, 2 torch threads"),
                      ("cluster", f"LocalCluster, {res['workers']} workers x 1 thread")):
        r = res[key]
        rows.append(f"| {name} | {r['n_cases']} | {r['predict_s']:.1f} | {60 * r['n_cases'] / r['predict_s']:.1f} "
                    f"| {r['case_s_mean']:.3f} | {r['case_s_sum']:.1f} |")
    rows.append("")
    rows.append(f"throughput ratio, cluster / serial 1 thread: {s['throughput_ratio_vs_serial_1thread']:.2f}; "
                f"/ serial 2 threads: {s['throughput_ratio_vs_serial_2threads']:.2f}; identical labels: "
                f"{s['identical_labels_cluster_vs_serial1']} (serial 2 threads: {s['identical_labels_serial2_vs_serial1']})")
    rows.append(f"fixed cost of a serial round (imports, model load): {s['serial_fixed_s']:.1f} s; the distributed "
                f"round minus its summed case times / workers: {s['cluster_round_minus_ideal_s']:.1f} s, "
                f"{s['cluster_overhead_s_per_task'] * 1000:.0f} ms per task "
                f"({100 * s['cluster_overhead_share_of_case']:.1f} % of a case, start-up included); an empty Dask task: "
                + (f"{s['dask_noop_s_per_task'] * 1000:.2f} ms ({100 * s['dask_noop_share_of_case']:.2f} % of a case)"
                   if s["dask_noop_s_per_task"] is not None else "not measured"))
    mem = res["cluster"].get("memory_round")
    if mem:
        rows += ["", "| worker | cases | RSS after case 10 (MiB) | RSS after its last case (MiB) | max (MiB) |",
                 "|---|---|---|---|---|"]
        for w, m in sorted(mem["per_worker"].items()):
            rows.append(f"| {w} | {m['cases']} | {m['rss_mib_case10']:.0f} | {m['rss_mib_last']:.0f} "
                        f"| {m['rss_mib_max']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/flare_bench_distributed"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "distributed.json")
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--noop", type=int, default=200, help="empty tasks timed on the cluster (0: none)")
    ap.add_argument("--memory-cases", type=int, default=200, help="cases of the memory round (0: none)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--warmup", type=int, default=0,
                    help="first run a round of this many cases in the same process / on the same cluster (imports, "
                         "first-touch memory, the workers' cached model: the steady state of later rounds)")
    ap.add_argument("--train-epochs", type=int, default=2)
    ap.add_argument("--train-iterations", type=int, default=10)
    a = ap.parse_args()
    n_mem = 0 if a.skip_memory else a.memory_cases

    a.work.mkdir(parents=True, exist_ok=True)
    model = ensure_model(a.work, a.train_epochs, a.train_iterations)
    images, mem_images = ensure_cases(a.work, a.cases, n_mem)
    runs = a.work / "runs" / time.strftime("%Y%m%d-%H%M%S")
    res: dict = {"model": str(model), "cases": a.cases, "workers": a.workers, "machine": {
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"model {model}; {a.cases} cases in {images}", flush=True)
    w = str(a.warmup)
    res["warmup"] = a.warmup
    res["serial_1thread"] = _run_child(["serial", str(model), str(images), str(runs / "serial1"), "1", w], 1)
    print(f"serial, 1 thread: {res['serial_1thread']['predict_s']:.1f} s", flush=True)
    res["serial_2threads"] = _run_child(["serial", str(model), str(images), str(runs / "serial2"), "2", w], 2)
    print(f"serial, 2 threads: {res['serial_2threads']['predict_s']:.1f} s", flush=True)
    res["cluster"] = _run_child(["cluster", str(model), str(images), str(runs / "cluster"), str(a.workers),
                                 str(a.noop), str(mem_images or ""), str(runs / "memory"), w], 1)
    print(f"cluster: {res['cluster']['predict_s']:.1f} s", flush=True)
    res["summary"] = summarise(res)
    for key in ("serial_1thread", "serial_2threads", "cluster"):
        res[key]["labels"] = {"files": len(res[key]["labels"]),
                              "sha256_of_all": hashlib.sha256(json.dumps(res[key]["labels"], sort_keys=True)
                                                              .encode()).hexdigest()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1, default=float))
    print(markdown(res))


if __name__ == "__main__":
    main()
