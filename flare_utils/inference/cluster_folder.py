"""A folder's cases predicted on a Dask cluster, one task per case (`predict_folder_on_cluster`).

The same files as the serial `folder.predict_folder`: `<out>/<case>.nii.gz`, the case's report
`<out>/efficiency/<case>.json` (each written atomically by the worker that predicted the case), and
`efficiency/summary.csv` / `run.json` (written by the calling process alone, from the reports the
tasks return). Each worker builds the predictor of a model once (`distributed.cases.cached`) and
predicts a case exactly like the serial folder run does (preprocess, network under a
ResourceMonitor, labels written plane by plane), so the label files are the same.

Resume and exactly-once: the calling process first asks one worker for the predictor's producer
key (`_probe`: the key depends on the device the workers use), then sends only the cases whose
output is not complete (`folder.done_report`). A task that runs again (its worker died after
writing, before its result came back) finds its case complete and only returns the report
(`recovered`). With `overwrite`, the reports of the cases to redo are removed first, so that
a re-run task still sees what this run wrote.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from flare_utils.data.io import atomic_write_json, remove_stale_temporaries
from flare_utils.errors import FlareInputError
from flare_utils.inference.case_report import EFFICIENCY_DIR, CaseReport, resource_monitor
from flare_utils.inference.folder import done_report, folder_jobs, write_run_files
from flare_utils.utilities.progress import report as report_progress

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["predict_folder_on_cluster", "efficient_predictor", "predict_one"]


def efficient_predictor(model_dir: str | Path, folds, options: Mapping[str, Any]):
    """The default predictor factory on a worker: `EfficientPredictor.from_results_folder(model_dir,
    folds, **options)` (options: mode, device, tta, centre_threshold, inplane_step, spacing, checkpoint...)."""
    from flare_utils.inference.predictor import EfficientPredictor
    return EfficientPredictor.from_results_folder(model_dir, folds=folds, **dict(options))


def predict_one(predictor, image: Path, case_id: str, output: Path, eff_dir: Path) -> CaseReport:
    """One case as the serial folder run does it: preprocess, the network phase under a
    ResourceMonitor, labels written (atomically) to `output`, the report to `eff_dir/<case>.json`."""
    pre = predictor.preprocess(image, case_id=case_id)
    with resource_monitor(predictor.monitor) as mon:
        labels, rep = predictor.run_network(pre)
    rep.add_monitor(mon)
    pre.data = None
    predictor.write_labels(labels, pre, output, rep)
    del labels
    rep.total_s = (rep.time_read_s + rep.time_preprocess_s + rep.time_network_s
                   + rep.time_resample_s + rep.time_write_s)
    atomic_write_json(eff_dir / f"{case_id}.json", rep.to_dict())
    return rep


def _cache_key(job: Mapping[str, Any]) -> tuple:
    return ("inference-predictor", job["factory_token"], job["model_dir"], tuple(str(f) for f in job["folds"]),
            tuple(sorted((k, repr(v)) for k, v in job["options"].items())))


def _with_predictor(job: Mapping[str, Any], fn: Callable[[Any], Any]):
    from flare_utils.distributed.cases import cached
    factory = job["factory"]
    with cached(_cache_key(job), lambda: factory(job["model_dir"], job["folds"], job["options"])) as predictor:
        return fn(predictor)


def _probe(job: Mapping[str, Any]) -> dict[str, Any]:
    """On a worker: the predictor's producer key and settings (it stays in the worker's cache)."""
    def info(p) -> dict[str, Any]:
        return {"producer": p.producer_key(), "mode": p.mode, "folds": list(p.folds), "tta": p.tta,
                "device": str(p.device)}
    return _with_predictor(job, info)


def _case_task(job: Mapping[str, Any]) -> dict[str, Any]:
    """One case on a Dask worker: {"report": CaseReport dict, "recovered", "worker", "error_type"}.
    Idempotent: a case already complete (made by the same producer from this input) is only reported."""
    from flare_utils.distributed.cases import worker_name
    image, cid, out = Path(job["image"]), job["case_id"], Path(job["output"])
    eff_dir = out.parent / EFFICIENCY_DIR
    rep = done_report(eff_dir / f"{cid}.json", job["producer"], image, out)
    if rep is not None:
        return {"report": rep.to_dict(), "recovered": True, "worker": worker_name(), "error_type": None}
    try:
        rep = _with_predictor(job, lambda p: predict_one(p, image, cid, out, eff_dir))
        err_type = None
    except Exception as e:          # noqa: BLE001 - reported like the serial run's case errors
        rep, err_type = CaseReport(cid, str(image), error=f"{type(e).__name__}: {e}"), type(e).__name__
    return {"report": rep.to_dict(), "recovered": False, "worker": worker_name(), "error_type": err_type}


def predict_folder_on_cluster(client, model_dir: str | Path, in_dir: str | Path, out_dir: str | Path, *,
                              folds=(0,), options: Mapping[str, Any] | None = None, overwrite: bool = False,
                              on_error: str = "raise", files: Sequence[str | Path] | None = None,
                              factory: Callable[[Any, Any, Mapping[str, Any]], Any] | None = None,
                              log: Callable[[str], None] | None = None) -> "pd.DataFrame":
    """Segment every NIfTI of `in_dir` (or `files`) into `out_dir` with the model `model_dir` (`folds`,
    predictor `options`: `EfficientPredictor` keyword arguments) on the workers of `client` (a
    `distributed.Client`), one task per case; the same files and table as
    `EfficientPredictor.predict_folder` (see the module docstring). `factory(model_dir, folds,
    options)` builds the predictor on a worker (default `efficient_predictor`; another one must be
    picklable: a module-level function). on_error: "raise" (stop: the other tasks are cancelled, the
    cases written stay) or "skip"."""
    from flare_utils.distributed.cases import factory_token, map_cases
    say = log or (lambda s: None)
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    jobs = folder_jobs(in_dir, out_dir, on_error, files)
    eff_dir = out_dir / EFFICIENCY_DIR
    factory = factory or efficient_predictor
    base = {"model_dir": str(Path(model_dir).resolve()), "folds": list(folds) if isinstance(folds, (list, tuple))
            else folds, "options": dict(options or {}), "factory": factory, "factory_token": factory_token(factory)}
    t_run = time.perf_counter()
    probe = client.submit(_probe, base, pure=False, retries=1).result()      # the workers' producer key
    producer = probe["producer"]
    reports: dict[str, CaseReport] = {}
    if overwrite:
        for _, cid, _ in jobs:
            (eff_dir / f"{cid}.json").unlink(missing_ok=True)
    else:
        for f, cid, out in jobs:
            rep = done_report(eff_dir / f"{cid}.json", producer, f, out)
            if rep is not None:
                rep.skipped_existing = True
                reports[cid] = rep
    todo = [j for j in jobs if j[1] not in reports]
    n_workers = len(client.scheduler_info().get("workers", {}))
    say(f"{out_dir.name}: {len(todo)} case(s) sent to the Dask cluster ({n_workers} worker(s) now), "
        f"{len(reports)} already done")
    tasks = [(cid, {**base, "image": str(f), "case_id": cid, "output": str(out), "producer": producer})
             for f, cid, out in todo]
    errors: dict[str, str] = {}
    first_error: tuple[str, str | None, str] | None = None
    workers: set[str] = set()

    def tick(n: int, total: int, case: str) -> None:
        report_progress(f"inference {out_dir.name}: cases", len(reports) + 1, len(jobs))

    try:
        results = map_cases(client, _case_task, tasks, key_prefix=f"infer-{out_dir.name}", progress=tick)
        with contextlib.closing(results):        # leaving early: map_cases cancels the tasks not done yet
            for cid, res in results:
                rep = CaseReport.from_dict(res["report"])
                reports[cid] = rep
                if res.get("worker"):
                    workers.add(str(res["worker"]))
                if rep.error is not None:
                    errors[cid] = rep.error
                    if on_error == "raise":
                        first_error = (cid, res.get("error_type"), rep.error)
                        break
    finally:
        remove_stale_temporaries(out_dir)       # a killed worker's unfinished write
        remove_stale_temporaries(eff_dir)
        done = [r for r in reports.values() if not r.skipped_existing and r.error is None]
        maxrss = max((r.maxrss_mib for r in done if r.maxrss_mib), default=None)
        df = write_run_files(eff_dir, jobs, reports, errors, time.perf_counter() - t_run, {
            "maxrss_mib": maxrss, "mode": probe["mode"], "folds": probe["folds"], "tta": probe["tta"],
            "device": probe["device"], "dask_workers": sorted(workers)})
    if first_error is not None:
        cid, err_type, text = first_error
        if err_type == "FlareInputError":
            raise FlareInputError(None, f"case {cid}: {text}")
        raise RuntimeError(f"case {cid}: {text}")
    return df
