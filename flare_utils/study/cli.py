"""`flare-study` command line (also `python -m flare_utils`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flare_utils.errors import FlareInputError
from flare_utils.inference.defaults import (DEFAULT_CENTRE_THRESHOLD, DEFAULT_INPLANE_GRID, DEFAULT_INPLANE_STEP,
                                            INPLANE_GRIDS)


def _cmd_phantom(a: argparse.Namespace) -> int:
    from flare_utils.synthetic.phantom import write_cohort
    info = write_cohort(a.out, a.labelled, a.unlabelled, a.validation, seed=a.seed, preset=a.preset,
                        processes=a.processes, overwrite=a.overwrite)
    print(f"synthetic cohort in {a.out}: {info}")
    return 0


def _cmd_convert_flare22(a: argparse.Namespace) -> int:
    from flare_utils.data.convert import convert_flare22, dataset_summary, write_summary
    res = convert_flare22(a.root, a.raw_root, a.id, a.name, overwrite=a.overwrite, link=a.link,
                          processes=a.processes)
    print(f"nnU-Net dataset written: {res}")
    if a.summary:
        write_summary(dataset_summary(res.dataset_dir, processes=a.processes), a.summary)
    return 0


def _cmd_convert_masks(a: argparse.Namespace) -> int:
    from flare_utils.data.multimask import convert_mask_folder
    raters = int(a.raters) if a.raters.isdigit() else a.raters
    report = convert_mask_folder(a.mask_dir, a.out, overlap=a.overlap, raters=raters,
                                 threshold=a.threshold, overwrite=a.overwrite)
    print(report)
    return 0


def _cmd_convert_dicom(a: argparse.Namespace) -> int:
    from flare_utils.data.dicom import dicom_series_to_nifti
    print(dicom_series_to_nifti(a.series_dir, a.out, series_uid=a.series_uid, overwrite=a.overwrite))
    return 0


def _cmd_run(a: argparse.Namespace) -> int:
    from flare_utils.study.runner import StageFailed, main_progress_stream, run_study
    try:
        results = run_study(a.params, run_dir=a.run_dir, start_from=a.start_from, only=a.only,
                            progress_stream=main_progress_stream(), command=" ".join(["flare-study", *sys.argv[1:]]))
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(f"  {r.status:>8}  {r.name:<24} {'' if r.seconds is None else f'{r.seconds:7.1f} s'}"
                    + ("" if r.peak_ram_mib is None else f"  {r.peak_ram_mib / 1024:6.2f} GiB")
                    for r in results))
    return 0


def _cmd_status(a: argparse.Namespace) -> int:
    from flare_utils.study.runner import study_status
    rows = study_status(a.params, run_dir=a.run_dir)
    for unit, done, why in rows:
        print(f"  {'complete' if done else 'to run':>8}  {unit:<24} {why}")
    return 0


def _cmd_repeat(a: argparse.Namespace) -> int:
    from flare_utils.study.repeat import markdown_comparisons, repeat_study
    from flare_utils.study.runner import StageFailed, main_progress_stream
    try:
        aggregate = repeat_study(a.params, a.seeds, run_dir=a.run_dir, vary=a.vary,
                                 progress_stream=main_progress_stream(),
                                 command=" ".join(["flare-study", *sys.argv[1:]]))
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(markdown_comparisons(aggregate))
    return 0


def cluster_params_from_args(a: argparse.Namespace):
    """The `ClusterParams` of the cluster options: `--cluster-config` (a YAML with a `cluster:` block,
    or the block itself), then `--cluster`, `--workers`, `--address` over it; without `--cluster`,
    `--address` means type address and `--workers` type local_cluster. Checked like the params'
    `cluster:` section (`FlareInputError`)."""
    from flare_utils.distributed.cluster import as_cluster_params
    section: dict = {}
    if a.cluster_config is not None:
        import yaml
        path = Path(a.cluster_config)
        if not path.is_file():
            raise FlareInputError(path, "cluster config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise FlareInputError(path, f"not valid YAML ({e})".replace("\n", " ")) from e
        if isinstance(data, dict) and isinstance(data.get("cluster"), dict):
            data = data["cluster"]
        if not isinstance(data, dict):
            raise FlareInputError(path, "expected a cluster: block (a mapping such as "
                                        "{type: local_cluster, workers: 2})")
        section = dict(data)
    if a.cluster is not None:
        section["type"] = a.cluster
    elif a.cluster_config is None and (a.address is not None or a.workers is not None):
        section["type"] = "address" if a.address is not None else "local_cluster"
    if a.workers is not None:
        section["workers"] = a.workers
    if a.address is not None:
        section["address"] = a.address
    return as_cluster_params(section)


def _add_cluster_options(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("Dask cluster", f"{what} on a Dask cluster, one task per case "
                                             "(docs/reference/distributed.md)")
    g.add_argument("--cluster", choices=["local", "local_cluster", "address", "slurm"], default=None,
                   help="local: in this process (default); local_cluster: worker processes on this machine; "
                        "address: a running Dask scheduler (--address); slurm: SLURM jobs (--cluster-config)")
    g.add_argument("--workers", type=int, default=None, metavar="N", help="local_cluster: worker processes")
    g.add_argument("--address", default=None, metavar="tcp://HOST:PORT", help="address: the scheduler's address")
    g.add_argument("--cluster-config", type=Path, default=None, metavar="FILE.yaml",
                   help="a YAML with a cluster: block (as in a params file) or the block itself; "
                        "the options above override it")


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from flare_utils.api import evaluate
    from flare_utils.distributed.cluster import open_cluster
    cluster = cluster_params_from_args(a)
    with open_cluster(cluster, device="cpu", say=lambda s: print(s, file=sys.stderr)) as client:
        res = evaluate(a.pred_dir, a.gt_dir, a.out, revision=a.revision, hd95=a.hd95, processes=a.processes,
                       allow_missing=a.allow_missing, strict=a.strict, client=client)
    s = res.summary
    print(json.dumps({k: s[k] for k in ("revision", "n_cases", "mean_dsc", "mean_nsd") if k in s},
                     indent=2))
    return 0


def _cmd_predict(a: argparse.Namespace) -> int:
    from flare_utils.api import segment
    from flare_utils.distributed.cluster import ClusterParams, open_cluster
    from flare_utils.inference.case_report import EFFICIENCY_DIR, SUMMARY_CSV
    cluster = cluster_params_from_args(a)
    if cluster.type != "local" and not Path(a.input).is_dir():
        print("note: the cluster options apply to a folder of images; one image is predicted in this process",
              file=sys.stderr)
        cluster = ClusterParams()
    with open_cluster(cluster, device=a.device, say=lambda s: print(s, file=sys.stderr)) as client:
        seg = segment(a.input, a.output, a.model_dir, folds=a.folds, mode=a.mode, tta=a.tta, device=a.device,
                      spacing=a.spacing, centre_threshold=a.centre_threshold, inplane_step=a.inplane_step,
                      inplane_grid=a.inplane_grid, backend=a.backend,
                      overwrite=a.overwrite, keep_going=a.keep_going, checkpoint=a.checkpoint, client=client)
    if Path(a.input).is_dir():
        out = Path(a.output)
        n_done = len(seg.report) - len(seg.skipped) - len(seg.failed)
        print(f"{n_done} case(s) predicted, {len(seg.skipped)} already done, {len(seg.failed)} failed -> {out} "
              f"(reports: {out / EFFICIENCY_DIR / SUMMARY_CSV}; {seg.report.attrs.get('wall_s', 0):.1f} s)")
        return 1 if seg.failed else 0
    (case, target), = seg.paths.items()
    if seg.skipped:
        print(f"{target} exists, made by this model with these settings from this input: skipped "
              f"(use --overwrite to redo it)")
        return 0
    r = seg.report.iloc[0]
    ram = r.get("peak_rss_mib") or r.get("maxrss_mib") or 0
    print(f"{target}: {r['windows_evaluated']}/{r['windows_grid']} windows ({r['windows_nnunet_full']} in nnU-Net's "
          f"full sliding window), {r['total_s']:.2f} s, peak RAM {ram:.0f} MiB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flare-study", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    ph = sub.add_parser("phantom", help="generate the synthetic abdominal CT cohort (FLARE22 layout)")
    ph.add_argument("out", type=Path)
    ph.add_argument("--labelled", type=int, default=8)
    ph.add_argument("--unlabelled", type=int, default=16)
    ph.add_argument("--validation", type=int, default=4)
    ph.add_argument("--preset", default="demo", help="tiny | demo | realistic")
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--processes", type=int, default=1)
    ph.add_argument("--overwrite", action="store_true")
    ph.set_defaults(func=_cmd_phantom)

    cv = sub.add_parser("convert", help="convert data to nnU-Net v2 / NIfTI")
    cvs = cv.add_subparsers(dest="kind", required=True)
    f = cvs.add_parser("flare22", help="FLARE22 folder layout -> nnU-Net v2 raw dataset")
    f.add_argument("root", type=Path)
    f.add_argument("raw_root", type=Path, help="nnUNet_raw folder")
    f.add_argument("--id", type=int, required=True)
    f.add_argument("--name", default="FLARE22")
    f.add_argument("--link", choices=["copy", "hardlink", "symlink"], default="copy")
    f.add_argument("--processes", type=int, default=1)
    f.add_argument("--summary", type=Path, help="also write summary.csv/json into this folder")
    f.add_argument("--overwrite", action="store_true")
    f.set_defaults(func=_cmd_convert_flare22)
    m = cvs.add_parser("masks", help="one mask per structure -> one FLARE22 label map")
    m.add_argument("mask_dir", type=Path)
    m.add_argument("out", type=Path)
    m.add_argument("--overlap", default="smallest_wins", choices=["smallest_wins", "label_order"])
    m.add_argument("--raters", default="majority", help="majority | union | intersection | N (one rater)")
    m.add_argument("--threshold", type=float, default=None, help="binarise float masks at this value")
    m.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")
    m.set_defaults(func=_cmd_convert_masks)
    d = cvs.add_parser("dicom", help="DICOM CT series -> NIfTI")
    d.add_argument("series_dir", type=Path)
    d.add_argument("out", type=Path)
    d.add_argument("--series-uid", default=None)
    d.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")
    d.set_defaults(func=_cmd_convert_dicom)

    r = sub.add_parser("run", help="run the study stages of a params YAML with papermill (complete stages are "
                                   "skipped; log in <run_dir>/logs/run.log, report in <run_dir>/index.html)")
    r.add_argument("params", type=Path)
    r.add_argument("--run-dir", type=Path, default=None, help="overrides params.run_dir")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--from", dest="start_from", metavar="STAGE", default=None,
                   help="re-run this stage and every later one (earlier stages must be complete)")
    g.add_argument("--only", nargs="+", metavar="STAGE", default=None,
                   help="re-run just these stages (later stages become stale and re-run next time)")
    r.set_defaults(func=_cmd_run)

    rp = sub.add_parser("repeat", help="run the study once per seed (each a run folder <run_dir>/seed_<s>) and "
                                       "write the comparisons over seeds with confidence intervals "
                                       "(<run_dir>/seeds.json, <run_dir>/index.html)")
    rp.add_argument("params", type=Path)
    rp.add_argument("--seeds", nargs="+", type=int, required=True, metavar="S", help="e.g. --seeds 0 1 2 3 4")
    rp.add_argument("--vary", nargs="+", choices=["cohort", "training"], default=["cohort", "training"],
                    help="which seeds take the value S (default both; the cohort seed only for the synthetic cohort)")
    rp.add_argument("--run-dir", type=Path, default=None, help="overrides params.run_dir (the seeds' parent folder)")
    rp.set_defaults(func=_cmd_repeat)

    st = sub.add_parser("status", help="which stages of a study are complete and which would run (runs nothing)")
    st.add_argument("params", type=Path)
    st.add_argument("--run-dir", type=Path, default=None, help="overrides params.run_dir")
    st.set_defaults(func=_cmd_status)

    e = sub.add_parser("evaluate", help="FLARE22 DSC/NSD of a prediction folder against ground truth")
    e.add_argument("pred_dir", type=Path)
    e.add_argument("gt_dir", type=Path)
    e.add_argument("--out", type=Path, default=None, help="folder for metrics_per_case.csv + summary.json")
    e.add_argument("--revision", choices=["2022", "2024"], default="2022")
    e.add_argument("--hd95", action="store_true")
    e.add_argument("--processes", type=int, default=2)
    e.add_argument("--allow-missing", action="store_true", help="score a missing prediction as an empty label map")
    e.add_argument("--strict", action="store_true",
                   help="refuse label values outside 0-13 (by default: background, with a warning)")
    _add_cluster_options(e, "Score the cases")
    e.set_defaults(func=_cmd_evaluate)

    pr = sub.add_parser("predict", help="efficient nnU-Net v2 inference (FLARE22 winner's sliding window)")
    pr.add_argument("model_dir", type=Path, help="nnU-Net v2 results folder (Trainer__Plans__configuration)")
    pr.add_argument("input", type=Path, help="a NIfTI image or a folder of them")
    pr.add_argument("output", type=Path, help="output .nii.gz (for a file) or folder")
    pr.add_argument("--folds", nargs="+", default=["0"], help="fold(s) to ensemble, or 'all'")
    pr.add_argument("--mode", choices=["efficient", "full"], default="efficient")
    pr.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (off by default)")
    pr.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    pr.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"), default=None,
                    help="predict at this spacing instead of the plans' (SimpleITK order)")
    pr.add_argument("--centre-threshold", type=int, default=DEFAULT_CENTRE_THRESHOLD,
                    help="neighbour windows run when the centre window has at least this many foreground voxels")
    pr.add_argument("--inplane-step", type=float, default=DEFAULT_INPLANE_STEP,
                    help="efficient mode: spacing of the 3x3 in-plane grid in patches (0.5: the paper's 50%% "
                         "overlap; 0.33: each voxel nearer a window centre, same window count)")
    pr.add_argument("--inplane-grid", choices=INPLANE_GRIDS, default=DEFAULT_INPLANE_GRID,
                    help="efficient mode's in-plane windows: 'paper' (the 3x3 grid) or 'adaptive' (the same "
                         "on a body that fits the paper's band, spread to the edges of a wider one)")
    pr.add_argument("--backend", choices=["torch", "openvino", "onnx"], default="torch",
                    help="CPU only: run the network in OpenVINO or ONNX Runtime (optional packages: pip install "
                         "openvino / onnxruntime onnx) instead of torch; docs/benchmarks.md")
    pr.add_argument("--checkpoint", default="checkpoint_final.pth")
    pr.add_argument("--overwrite", action="store_true", help="predict cases whose output exists again")
    pr.add_argument("--keep-going", action="store_true", help="go on after a bad case (exit status 1)")
    _add_cluster_options(pr, "Predict a folder's cases")
    pr.set_defaults(func=_cmd_predict)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FlareInputError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        unit = getattr(e, "flare_unit", None)
        where = f"during stage '{unit}'" if unit else ""
        print(f"interrupted {where}; run the same command again to resume (complete stages are skipped)"
              .replace("interrupted ;", "interrupted;"), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
