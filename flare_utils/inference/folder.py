"""Segmenting a folder of images: the network never waits on disk I/O, and a run can resume.

A reader thread reads and preprocesses the next case while the network runs, and a writer thread
resamples and writes the previous case's labels, so the phases of neighbouring cases overlap (each
case's ResourceMonitor covers its network phase). Cases whose output exists are skipped, so an
interrupted run resumes; outputs and reports appear atomically (temporary file, then rename), and
temporaries an interrupted run left are removed first.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from flare_utils.data.io import (atomic_write_json, atomic_write_text, case_id_from_path, list_nifti,
                                 remove_stale_temporaries)
from flare_utils.errors import FlareInputError
from flare_utils.utilities.memory import peak_rss_mib
from flare_utils.inference.case_report import (EFFICIENCY_DIR, RUN_JSON, SUMMARY_CSV, CaseReport,
                                               resource_monitor)
from flare_utils.utilities.progress import report as report_progress

if TYPE_CHECKING:
    import pandas as pd

    from flare_utils.inference.predictor import EfficientPredictor

__all__ = ["predict_folder", "done_report", "folder_jobs", "write_run_files"]


def done_report(report: Path, producer: str, image: Path, output: Path) -> CaseReport | None:
    """The case's report when its output is complete and was made by `producer` from this very input."""
    if not output.is_file() or not report.is_file():
        return None
    try:
        rep = CaseReport.from_dict(json.loads(report.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return rep if rep.made(producer, image, output) else None


def predict_folder(predictor: "EfficientPredictor", in_dir: str | Path, out_dir: str | Path, *,
                   overwrite: bool = False, prefetch: int = 1, on_error: str = "raise",
                   files: Sequence[str | Path] | None = None) -> "pd.DataFrame":
    """Segment every NIfTI of `in_dir` (or `files`) with `predictor` into `out_dir/<case>.nii.gz`
    (case id without _0000); see `EfficientPredictor.predict_folder`."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    jobs = folder_jobs(in_dir, out_dir, on_error, files)
    eff_dir = out_dir / EFFICIENCY_DIR
    producer = predictor.producer_key()
    reports: dict[str, CaseReport] = {}
    for f, cid, out in jobs:         # resume: a case is done when this model and these settings made its file
        rep = None if overwrite else done_report(eff_dir / f"{cid}.json", producer, f, out)
        if rep is not None:
            rep.skipped_existing = True
            reports[cid] = rep
    todo = [j for j in jobs if j[1] not in reports]

    t_run = time.perf_counter()
    errors: list[tuple[str, BaseException]] = []
    stop = threading.Event()
    q_in: queue.Queue = queue.Queue(maxsize=max(1, int(prefetch)))
    q_out: queue.Queue = queue.Queue(maxsize=1)
    _END = object()

    def fail(cid: str, e: BaseException) -> str:
        """Record a failed case ("raise": stop after the cases in flight); the report's error text."""
        errors.append((cid, e))
        if on_error == "raise":
            stop.set()
        return f"{type(e).__name__}: {e}"

    def reader():
        try:
            for f, cid, out in todo:
                if stop.is_set():
                    break
                try:
                    item = (f, cid, out, predictor.preprocess(f, case_id=cid), None)
                except Exception as e:  # reported by the main thread
                    item = (f, cid, out, None, e)
                q_in.put(item)
        finally:
            q_in.put(_END)

    def writer():
        while True:
            item = q_out.get()
            if item is _END:
                return
            f, cid, out, pre, labels, rep = item
            try:
                predictor.write_labels(labels, pre, out, rep)
                del labels
                rep.total_s = (rep.time_read_s + rep.time_preprocess_s + rep.time_network_s
                               + rep.time_resample_s + rep.time_write_s)
                atomic_write_json(eff_dir / f"{cid}.json", rep.to_dict())
            except Exception as e:
                rep.error = fail(cid, e)
            reports[cid] = rep
            report_progress(f"inference {out_dir.name}: cases", len(reports), len(jobs))

    t_r = threading.Thread(target=reader, name="flare-prefetch", daemon=True)
    t_w = threading.Thread(target=writer, name="flare-writer", daemon=True)
    t_r.start()
    t_w.start()
    try:
        while True:
            item = q_in.get()
            if item is _END:
                break
            f, cid, out, pre, err = item
            if err is not None:
                reports[cid] = CaseReport(cid, str(f), error=fail(cid, err))
            if err is not None or stop.is_set():
                continue
            try:
                with resource_monitor(predictor.monitor) as mon:
                    labels, rep = predictor.run_network(pre)
                rep.add_monitor(mon)
            except Exception as e:
                reports[cid] = CaseReport(cid, str(f), error=fail(cid, e))
                continue
            pre.data = None          # free the network-grid image before the write
            q_out.put((f, cid, out, pre, labels, rep))
    finally:
        if errors and on_error == "raise":
            stop.set()
        while t_r.is_alive():        # drain the reader so it can finish
            try:
                q_in.get(timeout=0.1)
            except queue.Empty:
                pass
        q_out.put(_END)
        t_w.join()
    wall = time.perf_counter() - t_run

    df = write_run_files(eff_dir, jobs, reports, {cid: str(e) for cid, e in errors}, wall, {
        "maxrss_mib": peak_rss_mib(), "mode": predictor.mode, "folds": list(predictor.folds), "tta": predictor.tta,
        "device": str(predictor.device)})
    if errors and on_error == "raise":
        cid, e = errors[0]
        if isinstance(e, FlareInputError):
            raise e
        raise RuntimeError(f"case {cid}: {type(e).__name__}: {e}") from e
    return df


def folder_jobs(in_dir: Path, out_dir: Path, on_error: str = "raise",
                files: Sequence[str | Path] | None = None) -> list[tuple[Path, str, Path]]:
    """(image, case id, output label file) of every case of a folder run (checked: the images exist,
    distinct case ids); creates `out_dir` and removes the temporaries an interrupted run left."""
    if on_error not in ("raise", "skip"):
        raise FlareInputError(None, f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if files is None:
        if not in_dir.is_dir():
            raise FlareInputError(in_dir, "input folder not found")
        files = list_nifti(in_dir)
        if not files:
            raise FlareInputError(in_dir, "no NIfTI images (.nii.gz, .nii) in the input folder")
    files = [Path(f) for f in files]
    ids = [case_id_from_path(f, channel_suffix=True) for f in files]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise FlareInputError(in_dir, f"several images map to the same case id: {dup}")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    remove_stale_temporaries(out_dir / EFFICIENCY_DIR)
    return [(f, cid, out_dir / f"{cid}.nii.gz") for f, cid in zip(files, ids)]


def write_run_files(eff_dir: Path, jobs, reports: dict[str, CaseReport], errors: dict[str, str], wall: float,
                    run_info: dict) -> "pd.DataFrame":
    """The folder run's table (`summary.csv`, one row per case in job order) and totals (`run.json`:
    counts, errors, wall and network time, then `run_info`: maxrss_mib, mode, folds, tta, device...)."""
    import pandas as pd
    rows = [reports[cid].to_row() for _, cid, _ in jobs if cid in reports]
    df = pd.DataFrame(rows)
    eff_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(eff_dir / SUMMARY_CSV, df.to_csv(index=False))
    done = [r for r in reports.values() if not r.skipped_existing and r.error is None]
    atomic_write_json(eff_dir / RUN_JSON, {
        "cases": len(jobs), "predicted": len(done),
        "skipped_existing": sum(r.skipped_existing for r in reports.values()),
        "errors": dict(errors), "wall_s": wall,
        "network_s": sum(r.time_network_s for r in done), **run_info})
    df.attrs["wall_s"] = wall
    return df
