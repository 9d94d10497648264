"""Iterative pseudo labelling (FLARE22 winner): K rounds of labels for the unlabelled set.

Round 1: the teacher ensemble predicts every unlabelled case in the paper's *accurate* setting
(nnU-Net's full sliding window, softmax averaged over the folds). Rounds 2..K: a big model is
retrained on the labelled cases + ALL pseudo labels of the previous round, then predicts again.
The K label maps per case feed the stability selection (`flare_utils.semisup.selection`).
Each round is a folder `<run_dir>/pseudo_labels/round_NN/`. An interrupted run resumes: finished
rounds are skipped, finished cases kept (labels are written atomically). `predict_round` refuses a
round folder made with another model (its content), folds or tta; `run_rounds` makes such rounds,
and every later one, anew (a retrained teacher, changed retraining settings). With a Dask `client`
the cases are predicted on the cluster's workers (`flare_utils.distributed`), with the same files.

Details: docs/reference/pseudo_labels.md
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from flare_utils.utilities.progress import report as report_progress
from flare_utils.errors import FlareInputError
from flare_utils.data.io import (atomic_write_json, atomic_write_text, case_id_from_path, json_default, list_nifti,
                                 read_label_map, remove_stale_temporaries)
from flare_utils.inference.folds import available_folds, model_identity, normalise_folds
from flare_utils.data.labels import LABELS
from flare_utils.layout import RunLayout
from flare_utils.utilities.memory import current_rss_mib, peak_rss_mib
from flare_utils.study.models import snapshot_model

__all__ = ["PSEUDO_TRAINER", "RoundInfo", "round_dir", "unlabelled_images", "completed_rounds",
           "read_round", "round_request", "predict_round", "retrain_round", "run_rounds", "round_cases",
           "round_table", "round_volumes", "round_agreement", "pseudo_label_quality", "memory_summary",
           "default_predictor_factory"]

PSEUDO_TRAINER = "FlarePseudoLabelTrainer"
REQUEST_FILE = "request.json"
RECORDS_FILE = "cases.jsonl"
CASES_CSV = "cases.csv"
MANIFEST_FILE = "round.json"
SUMMARY_FILE = "rounds.json"
SELECTION_FILE = "training_selection.json"
MODEL_DIR = "model"
MODEL_MARKER = "flare_round_model.json"
MANIFEST_FORMAT = "flare_utils.pseudo_round/1"
_PSEUDO_TRAINER_MODULE = "flare_utils.training.with_pseudo_labels"


# ----------------------------------------------------------------------------------------------
# Small helpers

def round_dir(run_dir: str | Path, k: int) -> Path:
    """`<run_dir>/pseudo_labels/round_<k:02d>` (k >= 1)."""
    return RunLayout(run_dir).pseudo_round(k)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def unlabelled_images(unlabelled_dir: str | Path, cases: Iterable[str] | None = None) -> dict[str, Path]:
    """{case id: image} of a folder of unlabelled CT images `<case>_0000.nii.gz` (nnU-Net naming,
    as in `imagesUnlabelled` and the FLARE22 unlabelled folder); `cases` picks a subset."""
    folder = Path(unlabelled_dir)
    if not folder.is_dir():
        raise FlareInputError(folder, "unlabelled images folder not found")
    found = {case_id_from_path(p, channel_suffix=True): p
             for p in list_nifti(folder, suffixes=("_0000.nii.gz", "_0000.nii"))}
    if cases is not None:
        wanted = [str(c) for c in cases]
        missing = [c for c in wanted if c not in found]
        if missing:
            raise FlareInputError(folder, f"no image <case>_0000.nii.gz for case(s) {missing[:10]}")
        found = {c: found[c] for c in wanted}
    if not found:
        raise FlareInputError(folder, "no unlabelled image (<case>_0000.nii.gz) in the folder")
    return found



# ----------------------------------------------------------------------------------------------
# The predictor

def _ensure_pseudo_trainers_registered() -> None:
    """nnU-Net rebuilds a checkpoint's network through its trainer class, found by name: the
    pseudo-label trainers must be visible to that lookup (training.registry's extension point)."""
    try:
        from flare_utils.training import registry
        if _PSEUDO_TRAINER_MODULE not in registry.TRAINER_MODULES:
            registry.TRAINER_MODULES.append(_PSEUDO_TRAINER_MODULE)
        registry.register_with_nnunet()
    except FlareInputError:   # read-only nnunetv2: stock trainers still load
        pass


def default_predictor_factory(model_dir: str | Path, folds, tta: bool, device: str):
    """The project's predictor in nnU-Net's full sliding-window mode (the paper's accurate
    setting): folds' softmax averaged, optional mirroring TTA, argmax, original geometry."""
    _ensure_pseudo_trainers_registered()
    from flare_utils.inference.predictor import EfficientPredictor
    return EfficientPredictor.from_results_folder(model_dir, folds=tuple(folds) if folds is not None else None,
                                                  mode="full", tta=bool(tta), device=device, monitor=False)


PredictorFactory = Callable[[Path, Any, bool, str], Any]


# ----------------------------------------------------------------------------------------------
# Rounds

@dataclass
class RoundInfo:
    """One finished round (the content of its round.json)."""
    round: int
    folder: Path
    model: str
    folds: list
    tta: bool
    mode: str = "full"
    cases: list = field(default_factory=list)
    n_cases: int = 0
    n_predicted: int = 0           # predicted by the call that completed the round
    n_reused: int = 0              # found already written (resumed) by that call
    skipped: bool = False          # the whole round was complete already (this call did nothing)
    predict_s: float = 0.0
    training: dict | None = None
    memory: dict = field(default_factory=dict)
    device: str = ""
    created: str = ""
    format: str = MANIFEST_FORMAT

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["folder"] = str(self.folder)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RoundInfo":
        names = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in names}
        kw["folder"] = Path(kw["folder"])
        return cls(**kw)


def read_round(run_dir: str | Path, k: int) -> RoundInfo | None:
    """The manifest of round k, or None when the round is not complete."""
    d = _read_json(round_dir(run_dir, k) / MANIFEST_FILE)
    if not d or d.get("format") != MANIFEST_FORMAT:
        return None
    info = RoundInfo.from_dict(d)
    info.folder = round_dir(run_dir, k)
    info.model = str(RunLayout(run_dir).resolve(info.model))
    return info


def round_request(run_dir: str | Path, k: int) -> dict[str, Any]:
    """What round k was (or is being) made with: model, folds, tta, unlabelled_dir (request.json)."""
    d = _read_json(round_dir(run_dir, k) / REQUEST_FILE)
    if d is None:
        raise FlareInputError(round_dir(run_dir, k), f"round {k} has not been started (no {REQUEST_FILE})")
    run = RunLayout(run_dir)
    return {**d, **{key: str(run.resolve(d[key])) for key in ("model", "unlabelled_dir") if d.get(key)}}


def completed_rounds(run_dir: str | Path) -> list[int]:
    """Numbers of the rounds with a completion marker, ascending."""
    root = RunLayout(run_dir).pseudo_labels
    out = []
    if root.is_dir():
        for p in sorted(root.glob("round_*")):
            s = p.name[len("round_"):]
            if s.isdigit() and (p / MANIFEST_FILE).is_file() and read_round(run_dir, int(s)) is not None:
                out.append(int(s))
    return out


def _read_records(path: Path) -> dict[str, dict]:
    """Per-case records of cases.jsonl (last one per case wins; a torn last line is ignored)."""
    out: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and "case" in r:
                out[str(r["case"])] = r
    return out


def _append_record(path: Path, record: dict) -> None:
    line = json.dumps(record, default=json_default)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()


def _label_record(label: np.ndarray, voxel_ml: float) -> dict[str, Any]:
    counts = np.bincount(np.asarray(label).ravel().astype(np.int64), minlength=max(LABELS) + 1)
    rec: dict[str, Any] = {"fg_voxels": int(counts[1:].sum()), "voxel_ml": voxel_ml}
    for lab, organ in LABELS.items():
        rec[f"ml_{organ.name}"] = float(counts[lab]) * voxel_ml if lab < len(counts) else 0.0
    return rec


def _record_from_file(case: str, path: Path) -> dict[str, Any]:
    """A record for a label written by an earlier (interrupted) run whose record was lost."""
    label, geom = read_label_map(path)
    return {"case": case, "index": None, "pid": None, "seconds": None, "rss_mib": None, "peak_rss_mib": None,
            "recovered": True, **_label_record(label, float(np.prod(geom.spacing)) / 1000.0)}


def memory_summary(records: Sequence[Mapping[str, Any]], early: int = 10) -> dict[str, Any]:
    """RSS at the `early`-th and the last case predicted by the last process of a round (cases
    predicted by earlier, interrupted processes are not comparable). Growth in MiB and percent."""
    recs = [r for r in records if r.get("rss_mib") is not None and r.get("pid") is not None]
    if not recs:
        return {}
    pid = recs[-1]["pid"]
    session = sorted((r for r in recs if r["pid"] == pid), key=lambda r: r["index"])
    if not session:
        return {}
    e = session[min(early, len(session)) - 1]
    last = session[-1]
    out = {"cases_in_session": len(session), "early_case_index": min(early, len(session)),
           "rss_early_mib": e["rss_mib"], "rss_last_mib": last["rss_mib"],
           "rss_growth_mib": last["rss_mib"] - e["rss_mib"],
           "rss_growth_pct": 100.0 * (last["rss_mib"] - e["rss_mib"]) / e["rss_mib"] if e["rss_mib"] else None,
           "peak_rss_early_mib": e["peak_rss_mib"], "peak_rss_last_mib": last["peak_rss_mib"],
           "peak_rss_growth_mib": last["peak_rss_mib"] - e["peak_rss_mib"],
           "rss_max_mib": max(r["rss_mib"] for r in session)}
    return out


def predict_round(run_dir: str | Path, k: int, model_dir: str | Path, unlabelled_dir: str | Path, *,
                  folds: Sequence[int | str] | None = None, tta: bool = False, device: str = "auto",
                  cases: Iterable[str] | None = None, predictor_factory: PredictorFactory | None = None,
                  training: Mapping[str, Any] | None = None, progress: Callable[[str], None] | None = None,
                  client: Any = None) -> RoundInfo:
    """Predict every unlabelled case into round k's folder (resumable; see module docstring).

    model_dir: nnU-Net results folder (`Trainer__Plans__3d_fullres`); folds: the folds to ensemble
    (None: every fold_N with checkpoint_final.pth); tta: nnU-Net mirroring. `predictor_factory`
    (model_dir, folds, tta, device) -> object with `predict_case(image, output=..., case_id=...)`
    replaces the default predictor (tests). `training`: what made the model (stored in the manifest).
    `client`: a `distributed.Client` (`flare_utils.distributed.open_cluster`): the cases are predicted
    on its workers, one task each, every worker building the predictor once (the factory must then
    be picklable: a module-level function); this process still writes the records and the manifest.
    """
    say = progress or (lambda s: None)
    folder = round_dir(run_dir, k)
    model_dir = Path(model_dir).resolve()
    images = unlabelled_images(unlabelled_dir, cases)
    ids = list(images)
    folds_l = None if folds is None else list(normalise_folds(folds))
    if folds_l is None:
        if not model_dir.is_dir():
            raise FlareInputError(model_dir, "model folder not found")
        folds_l = available_folds(model_dir)
        if not folds_l:
            raise FlareInputError(model_dir, "no fold_N/checkpoint_final.pth in the model folder")
    run = RunLayout(run_dir)          # paths inside the run are recorded relative to it (a moved run keeps them)
    request = {"round": int(k), "model": run.stored(model_dir), "model_key": model_identity(model_dir, folds_l),
               "folds": [str(f) for f in folds_l], "tta": bool(tta), "mode": "full",
               "unlabelled_dir": run.stored(unlabelled_dir)}

    done = read_round(run_dir, k)
    if done is not None and sorted(done.cases) == sorted(ids) and \
            all((folder / f"{c}.nii.gz").is_file() for c in ids):
        _check_request(folder, request)
        done.skipped = True
        say(f"round {k}: complete ({len(ids)} cases), skipped")
        return done

    folder.mkdir(parents=True, exist_ok=True)
    _check_request(folder, request)
    if not (folder / REQUEST_FILE).is_file():
        atomic_write_json(folder / REQUEST_FILE, {**request, "created": _now()})
    remove_stale_temporaries(folder)
    (folder / MANIFEST_FILE).unlink(missing_ok=True)       # the case list changed: not complete any more
    records_path = folder / RECORDS_FILE
    records = _read_records(records_path)
    todo = [c for c in ids if not (folder / f"{c}.nii.gz").is_file()]
    n_reused = len(ids) - len(todo)
    say(f"round {k}: {len(todo)} case(s) to predict, {n_reused} already written")

    t_round = time.perf_counter()
    device_used = device
    if todo and client is not None:
        device_used = _predict_on_cluster(client, k, folder, todo, images, model_dir, folds_l, bool(tta), device,
                                          predictor_factory or default_predictor_factory, request["model_key"],
                                          records, records_path, say)
    elif todo:
        factory = predictor_factory or default_predictor_factory
        predictor = factory(model_dir, folds_l, bool(tta), device)
        device_used = str(getattr(predictor, "device", device))
        pid = os.getpid()
        for n, case in enumerate(todo, start=1):
            t0 = time.perf_counter()
            out = folder / f"{case}.nii.gz"
            label, _ = predictor.predict_case(images[case], output=out, case_id=case)
            seconds = time.perf_counter() - t0
            voxel_ml = _voxel_ml(images[case])
            rec = {"case": case, "index": n, "pid": pid, "seconds": round(seconds, 4),
                   "rss_mib": round(current_rss_mib(), 2), "peak_rss_mib": round(peak_rss_mib(), 2),
                   "recovered": False, **_label_record(label, voxel_ml)}
            del label
            _append_record(records_path, rec)
            records[case] = rec
            report_progress(f"pseudo labels round {k}: cases", n, len(todo))
            if n % 50 == 0 or n == len(todo):
                say(f"round {k}: {n}/{len(todo)} predicted (RSS {rec['rss_mib']:.0f} MiB)")
        del predictor
    predict_s = time.perf_counter() - t_round

    for c in ids:                                 # labels whose record an interrupted run lost
        if c not in records:
            records[c] = _record_from_file(c, folder / f"{c}.nii.gz")
    rows = [records[c] for c in ids]
    atomic_write_text(folder / CASES_CSV, pd.DataFrame(rows).to_csv(index=False))
    session = [records[c] for c in todo]
    info = RoundInfo(round=int(k), folder=folder, model=str(model_dir), folds=[str(f) for f in folds_l],
                     tta=bool(tta), cases=ids, n_cases=len(ids), n_predicted=len(todo), n_reused=n_reused,
                     predict_s=round(predict_s, 3), training=dict(training) if training else None,
                     memory=memory_summary(session), device=device_used, created=_now())
    atomic_write_json(folder / MANIFEST_FILE, {**info.to_dict(), "folder": run.stored(folder),
                                               "model": run.stored(model_dir)})
    _write_summary(run_dir)
    return info


def _written_by_round(folder: Path, case: str, model_key: str | None) -> bool:
    """Whether the case's label is in the round folder and the folder is this model's: labels are
    written atomically (a file there is whole) and a round folder holds one model's labels
    (request.json, checked before any case is predicted)."""
    if not (folder / f"{case}.nii.gz").is_file():
        return False
    return (_read_json(folder / REQUEST_FILE) or {}).get("model_key") == model_key


def _cluster_case(job: Mapping[str, Any]) -> dict[str, Any]:
    """One case of a round, on a Dask worker: the worker's cached predictor writes the label; the
    case's record is returned. Idempotent: a task run again (its worker died after writing, before
    its result came back) finds the label written and only reports it."""
    from flare_utils.distributed.cases import cached, next_index, worker_name
    folder, case = Path(job["folder"]), job["case"]
    out = folder / f"{case}.nii.gz"
    if _written_by_round(folder, case, job["model_key"]):
        return {**_record_from_file(case, out), "worker": worker_name(), "device": None}
    model_dir, folds, tta, device, factory = (Path(job["model_dir"]), list(job["folds"]), job["tta"],
                                              job["device"], job["factory"])
    key = ("pseudo-round-predictor", job["factory_token"], str(model_dir), tuple(folds), tta, device)
    with cached(key, lambda: factory(model_dir, folds, tta, device)) as predictor:
        t0 = time.perf_counter()
        label, _ = predictor.predict_case(Path(job["image"]), output=out, case_id=case)
        seconds = time.perf_counter() - t0
        device_used = str(getattr(predictor, "device", device))
    rec = {"case": case, "index": next_index(str(folder)), "pid": os.getpid(), "seconds": round(seconds, 4),
           "rss_mib": round(current_rss_mib(), 2), "peak_rss_mib": round(peak_rss_mib(), 2), "recovered": False,
           **_label_record(label, _voxel_ml(Path(job["image"]))), "worker": worker_name(), "device": device_used}
    del label
    return rec


def _predict_on_cluster(client, k: int, folder: Path, todo: list[str], images: Mapping[str, Path], model_dir: Path,
                        folds: list, tta: bool, device: str, factory: PredictorFactory, model_key: str | None,
                        records: dict[str, dict], records_path: Path, say: Callable[[str], None]) -> str:
    """The cases of `todo` as Dask tasks (`_cluster_case`); records appended here, in the order the
    cases finish. Returns the device the workers used."""
    from flare_utils.distributed.cases import factory_token, map_cases
    token = factory_token(factory, "predictor_factory")
    jobs = [(c, {"folder": str(folder), "case": c, "image": str(images[c]), "model_dir": str(model_dir),
                 "folds": list(folds), "tta": tta, "device": device, "factory": factory, "factory_token": token,
                 "model_key": model_key}) for c in todo]
    n_workers = len(client.scheduler_info().get("workers", {}))
    say(f"round {k}: {len(todo)} case(s) sent to the Dask cluster ({n_workers} worker(s) now)")
    devices = []

    def tick(n: int, total: int, case: str) -> None:
        report_progress(f"pseudo labels round {k}: cases", n, total)

    for n, (case, rec) in enumerate(map_cases(client, _cluster_case, jobs, key_prefix=f"pseudo-round{k:02d}",
                                              progress=tick), start=1):
        _append_record(records_path, rec)
        records[case] = rec
        if rec.get("device"):
            devices.append(rec["device"])
        if n % 50 == 0 or n == len(todo):
            rss = f"RSS {rec['rss_mib']:.0f} MiB on worker {rec.get('worker')}" if rec.get("rss_mib") else \
                f"case {case} found written"
            say(f"round {k}: {n}/{len(todo)} predicted ({rss})")
    remove_stale_temporaries(folder)          # a killed worker's unfinished write (no task runs any more)
    return devices[0] if devices else device


def _voxel_ml(image: Path) -> float:
    import nibabel as nib
    zooms = nib.load(str(image)).header.get_zooms()[:3]
    return float(np.prod([float(z) for z in zooms])) / 1000.0


def _request_changes(folder: Path, request: Mapping[str, Any]) -> list[str]:
    """What differs between the round folder's request and `request`: the model (its content when
    both record it, else its folder), folds, tta, mode."""
    old = _read_json(folder / REQUEST_FILE)
    if not old:
        return []
    model = "model_key" if old.get("model_key") and request.get("model_key") else "model"
    return [k for k in (model, "folds", "tta", "mode") if old.get(k) != request.get(k)]


def _check_request(folder: Path, request: Mapping[str, Any]) -> None:
    diff = _request_changes(folder, request)
    if diff:
        old = _read_json(folder / REQUEST_FILE)
        raise FlareInputError(folder, f"this round was started with another {', '.join(diff)} "
                                      f"({ {k: old.get(k) for k in diff} } vs { {k: request.get(k) for k in diff} }); "
                                      f"rounds are never overwritten: use another run_dir or delete the folder")


def _write_summary(run_dir: str | Path) -> None:
    run = RunLayout(run_dir)
    rounds = [read_round(run_dir, k) for k in completed_rounds(run_dir)]
    atomic_write_json(run.pseudo_labels / SUMMARY_FILE, {"rounds": [
        {**{k: v for k, v in r.to_dict().items() if k != "cases"}, "folder": run.stored(r.folder),
         "model": run.stored(r.model)} for r in rounds if r]})


# ----------------------------------------------------------------------------------------------
# Retraining

TrainFn = Callable[..., Path]


def _default_train_fn(dataset_id, plans_identifier, fold, trainer, config, run_dir, num_gpus: int = 1) -> Path:
    import matplotlib

    _ensure_pseudo_trainers_registered()
    from flare_utils.training.api import train
    # nnU-Net's progress plot calls seaborn.set(font_scale=2.5), which changes matplotlib's global
    # style for every later figure of the calling process (notebook): keep it inside
    with matplotlib.rc_context():
        return train(dataset_id, plans_identifier, fold, trainer=trainer, config=config, run_dir=run_dir,
                     num_gpus=num_gpus)


def retrain_round(run_dir: str | Path, k: int, dataset_id: int | str, plans_identifier: str,
                  unlabelled_dir: str | Path, *, training_config: Mapping[str, Any] | Any | None = None,
                  trainer: str = PSEUDO_TRAINER, folds: Sequence[int | str] = ("all",), device: str = "auto",
                  seed: int | None = 0, train_fn: TrainFn | None = None,
                  progress: Callable[[str], None] | None = None, num_gpus: int = 1) -> tuple[Path, dict]:
    """Train round k's big model on labelled + ALL pseudo-labelled cases of round k-1.

    Writes `round_<k>/training_selection.json` (every case of round k-1; the pseudo-label trainer's
    format), trains each fold of `folds` with `trainer` through `flare_utils.training.train` into
    the run's nnU-Net results folder, and copies the model (plans, dataset.json, each fold's
    checkpoint_final.pth and logs) into `round_<k>/model` (atomically; its marker makes a rerun
    reuse it). `training_config`: a TrainingConfig / dict (budget, lr, ...); `selection_file` is
    set here, `device` and `seed` default to the arguments, `final_validation` to False.
    `num_gpus` > 1: nnU-Net's multi-GPU DDP per fold (passed to `train_fn` as keyword `num_gpus`).
    Returns (model folder, training record).
    """
    say = progress or (lambda s: None)
    if int(k) < 2:
        raise FlareInputError(None, "round 1 is predicted by the teacher; retraining starts at round 2")
    prev = read_round(run_dir, k - 1)
    if prev is None:
        raise FlareInputError(round_dir(run_dir, k - 1), f"round {k - 1} is not complete; it must be before "
                                                         f"round {k} can be trained")
    folder = round_dir(run_dir, k)
    model_dir = folder / MODEL_DIR
    marker = _read_json(model_dir / MODEL_MARKER)
    request = _retrain_request(plans_identifier, training_config, trainer, folds, seed, num_gpus)
    if marker is not None and marker.get("request", request) == request:
        say(f"round {k}: model already trained ({model_dir}), reused")
        return model_dir, marker
    folder.mkdir(parents=True, exist_ok=True)
    from flare_utils.semisup.selection import write_trainer_selection
    selection = write_trainer_selection(folder / SELECTION_FILE, prev.cases, prev.folder, unlabelled_dir,
                                        {"source": "flare_utils.semisup.rounds", "round": int(k),
                                         "pseudo_labels_of_round": int(k - 1), "rule": "all cases"},
                                        within=RunLayout(run_dir).root)
    if training_config is None:
        cfg: dict[str, Any] = {}
    elif hasattr(training_config, "to_dict"):
        cfg = dict(training_config.to_dict())
    else:
        cfg = dict(training_config)
    cfg["selection_file"] = str(selection.resolve())
    cfg.setdefault("device", device)
    if seed is not None:
        cfg.setdefault("seed", int(seed))
    cfg.setdefault("final_validation", False)
    fn = train_fn or _default_train_fn
    t0 = time.perf_counter()
    results = None
    folds_l = list(normalise_folds(folds) or ("all",))
    for f in folds_l:
        say(f"round {k}: training {trainer} fold {f} on labelled + {len(prev.cases)} pseudo-labelled cases")
        results = Path(fn(dataset_id, plans_identifier, f, trainer, cfg, run_dir,
                          **({"num_gpus": int(num_gpus)} if num_gpus != 1 else {})))
    train_s = time.perf_counter() - t0
    record = {"request": request, "trainer": trainer, "plans": plans_identifier, "dataset": str(dataset_id),
              "folds": [str(f) for f in folds_l], "selection_file": str(selection), "n_pseudo": len(prev.cases),
              "pseudo_labels_of_round": int(k - 1), "results_folder": str(results), "train_s": round(train_s, 2),
              "config": cfg, "created": _now()}
    snapshot_model(results, model_dir, folds_l, marker=(MODEL_MARKER, record))
    return model_dir, record


def _retrain_request(plans_identifier: str, training_config, trainer: str, folds, seed,
                     num_gpus: int = 1) -> dict[str, Any]:
    """What a round's retrained model depends on besides the previous round's labels (num_gpus only
    when > 1: the ranks draw other batches; one-GPU requests stay as they were)."""
    cfg = training_config.to_dict() if hasattr(training_config, "to_dict") else dict(training_config or {})
    return json.loads(json.dumps({"plans": plans_identifier, "trainer": trainer, "seed": seed,
                                  "folds": [str(f) for f in normalise_folds(folds) or ("all",)],
                                  "config": {k: v for k, v in sorted(cfg.items()) if k != "selection_file"},
                                  **({"num_gpus": int(num_gpus)} if num_gpus != 1 else {})},
                                 default=str))


def _discard_rounds(run_dir: str | Path, first: int, why: str, say: Callable[[str], None]) -> None:
    """Delete the round folders from `first` on: derived outputs that no longer match what made them."""
    import shutil
    gone = [d for d in sorted(RunLayout(run_dir).pseudo_labels.glob("round_*"))
            if d.is_dir() and d.name[len("round_"):].isdigit() and int(d.name[len("round_"):]) >= first]
    for d in gone:
        shutil.rmtree(d)
    if gone:
        say(f"rounds {', '.join(d.name[len('round_'):] for d in gone)} made anew: {why}")
        _write_summary(run_dir)


def _teacher_plans_identifier(teacher_results: Path) -> str:
    d = _read_json(teacher_results / "plans.json")
    if not d or "plans_name" not in d:
        raise FlareInputError(teacher_results / "plans.json", "cannot read the plans name of the teacher model; "
                                                               "pass plans=<plans identifier>")
    return str(d["plans_name"])


def run_rounds(run_dir: str | Path, dataset_id: int | str, teacher_results: str | Path, unlabelled_dir: str | Path,
               rounds: int = 3, *, plans: str | None = None, training_config: Mapping[str, Any] | Any | None = None,
               folds: Sequence[int | str] | None = None, tta: bool = False, device: str = "auto",
               seed: int | None = 0, trainer: str = PSEUDO_TRAINER, retrain_folds: Sequence[int | str] = ("all",),
               cases: Iterable[str] | None = None, predictor_factory: PredictorFactory | None = None,
               train_fn: TrainFn | None = None, progress: Callable[[str], None] | None = print,
               client: Any = None, num_gpus: int = 1) -> list[RoundInfo]:
    """K rounds of pseudo labels (module docstring). Round 1: `teacher_results` (folds `folds`, None =
    all trained folds) predicts; round k >= 2: a `trainer` model (plans `plans`, default the
    teacher's plans) is trained on labelled + round k-1's pseudo labels (`retrain_folds`, default
    one model on all labelled cases, fold "all") and predicts. Completed rounds/models are reused.
    `client`: predict the cases on a Dask cluster (`predict_round`); training stays in this process
    (`num_gpus` > 1: in its nnU-Net DDP ranks, one per GPU).
    Returns the RoundInfo of every round, in order."""
    if int(rounds) < 1:
        raise FlareInputError(None, f"rounds must be >= 1, got {rounds}")
    say = progress or (lambda s: None)
    teacher_results = Path(teacher_results)
    case_list = list(unlabelled_images(unlabelled_dir, cases))
    first = round_dir(run_dir, 1)
    if first.is_dir():               # the teacher (or its folds / tta) changed: every round is stale
        folds_now = list(normalise_folds(folds) or available_folds(teacher_results))
        changed = _request_changes(first, {"model": RunLayout(run_dir).stored(teacher_results),
                                           "model_key": model_identity(teacher_results, folds_now),
                                           "folds": [str(f) for f in folds_now], "tta": bool(tta), "mode": "full"})
        if changed:
            _discard_rounds(run_dir, 1, f"the teacher's {', '.join(changed)} changed", say)
    infos = [predict_round(run_dir, 1, teacher_results, unlabelled_dir, folds=folds, tta=tta, device=device,
                           cases=case_list, predictor_factory=predictor_factory, client=client,
                           training={"teacher": str(teacher_results)}, progress=progress)]
    if int(rounds) >= 2:
        plans = plans or _teacher_plans_identifier(teacher_results)
    for k in range(2, int(rounds) + 1):
        marker = _read_json(round_dir(run_dir, k) / MODEL_DIR / MODEL_MARKER) or {}
        if round_dir(run_dir, k).is_dir() and not infos[-1].skipped:
            _discard_rounds(run_dir, k, f"round {k - 1} was made anew", say)
        elif marker.get("request", None) not in (None, _retrain_request(plans, training_config, trainer,
                                                                        retrain_folds, seed, num_gpus)):
            _discard_rounds(run_dir, k, "the retraining settings changed", say)
        done = read_round(run_dir, k)
        if done is not None and sorted(done.cases) == sorted(case_list):
            infos.append(predict_round(run_dir, k, done.model, unlabelled_dir, folds=done.folds, tta=done.tta,
                                       device=device, cases=case_list, predictor_factory=predictor_factory,
                                       progress=progress, client=client))
            continue
        model_dir, record = retrain_round(run_dir, k, dataset_id, plans, unlabelled_dir,
                                          training_config=training_config, trainer=trainer, folds=retrain_folds,
                                          device=device, seed=seed, train_fn=train_fn, progress=progress,
                                          num_gpus=num_gpus)
        infos.append(predict_round(run_dir, k, model_dir, unlabelled_dir, folds=record["folds"], tta=tta,
                                   device=device, cases=case_list, predictor_factory=predictor_factory,
                                   training=record, progress=progress, client=client))
    return infos


# ----------------------------------------------------------------------------------------------
# Tables for the notebooks

def _rounds_or_all(run_dir, rounds) -> list[int]:
    ks = completed_rounds(run_dir) if rounds is None else [int(k) for k in rounds]
    for k in ks:
        if read_round(run_dir, k) is None:
            raise FlareInputError(round_dir(run_dir, k), f"round {k} is not complete")
    return ks


def round_cases(run_dir: str | Path, k: int) -> pd.DataFrame:
    """cases.csv of a completed round: one row per case (time, RSS, organ volumes)."""
    if read_round(run_dir, k) is None:
        raise FlareInputError(round_dir(run_dir, k), f"round {k} is not complete")
    return pd.read_csv(round_dir(run_dir, k) / CASES_CSV, dtype={"case": str})


def round_table(run_dir: str | Path, rounds: Iterable[int] | None = None) -> pd.DataFrame:
    """One row per completed round: model, folds, cases, prediction time, memory figures."""
    rows = []
    for k in _rounds_or_all(run_dir, rounds):
        r = read_round(run_dir, k)
        rows.append({"round": k, "model": Path(r.model).name if Path(r.model).name != MODEL_DIR
                     else f"round_{k:02d}/model", "folds": ",".join(r.folds), "tta": r.tta, "cases": r.n_cases,
                     "predicted": r.n_predicted, "reused": r.n_reused, "predict_s": r.predict_s,
                     "train_s": (r.training or {}).get("train_s"),
                     "rss_early_mib": r.memory.get("rss_early_mib"), "rss_last_mib": r.memory.get("rss_last_mib")})
    return pd.DataFrame(rows).set_index("round") if rows else pd.DataFrame()


def round_volumes(run_dir: str | Path, rounds: Iterable[int] | None = None) -> pd.DataFrame:
    """Organ volumes (ml) per case and round, long format: round, case, organ, ml."""
    frames = []
    for k in _rounds_or_all(run_dir, rounds):
        df = round_cases(run_dir, k)
        cols = [c for c in df.columns if c.startswith("ml_")]
        long = df.melt(id_vars=["case"], value_vars=cols, var_name="organ", value_name="ml")
        long["organ"] = long["organ"].str[len("ml_"):]
        long.insert(0, "round", k)
        frames.append(long)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["round", "case", "organ", "ml"])


def _read_label_pair(path, reference, what: str):
    """Two label maps of the same geometry (else an error naming `path`): (labels, reference labels,
    reference geometry)."""
    labels, g = read_label_map(path)
    ref, g_ref = read_label_map(reference)
    problem = g_ref.mismatch(g)
    if problem is not None:
        raise FlareInputError(path, f"geometry differs from {what}{reference}: {problem}")
    return labels, ref, g_ref


def _agreement_job(job: tuple) -> dict[str, Any]:
    from flare_utils.semisup.selection import compare_labels
    k, case, prev_path, cur_path = job
    cur, prev, _ = _read_label_pair(cur_path, prev_path, "")
    c = compare_labels(prev, cur)
    row = {"round": k, "case": case, "changed_voxels": c["changed"], "changed_fraction": c["changed_fraction"],
           "changed_vs_foreground": c["term"], "fg_prev": c["fg_prev"], "fg_cur": c["fg_cur"]}
    row.update({f"dsc_{LABELS[lab].name}": v for lab, v in c["dsc"].items()})
    return row


def round_agreement(run_dir: str | Path, rounds: Iterable[int] | None = None, processes: int = 1,
                    client: Any = None) -> pd.DataFrame:
    """Agreement of each round with the previous one, one row per (round k >= 2, case): changed
    voxels, their fraction of the volume, their ratio to round k's foreground (equation (1)'s
    term), and the Dice between the rounds per organ (`dsc_<organ>`; both empty = 1). One task per
    case on a Dask `client`'s cluster when given, else in `processes` local processes."""
    from flare_utils.distributed.cases import map_ordered
    ks = _rounds_or_all(run_dir, rounds)
    jobs = []
    for a, b in zip(ks, ks[1:]):
        ra, rb = read_round(run_dir, a), read_round(run_dir, b)
        for c in rb.cases:
            if c in set(ra.cases):
                jobs.append((b, c, str(ra.folder / f"{c}.nii.gz"), str(rb.folder / f"{c}.nii.gz")))
    rows = map_ordered(_agreement_job, jobs, client=client, processes=processes, key_prefix="pseudo-agreement") \
        if jobs else []
    return pd.DataFrame(rows)


def _quality_job(job: tuple) -> dict[str, Any]:
    from flare_utils.evaluation.metrics import evaluate_case
    k, case, pred_path, truth_path = job
    pred, gt, gg = _read_label_pair(pred_path, truth_path, "the ground truth ")
    present = sorted((set(np.unique(gt).tolist()) | set(np.unique(pred).tolist())) & set(LABELS))
    row: dict[str, Any] = {"round": k, "case": case}
    scores = evaluate_case(pred, gt, gg.spacing, labels=present) if present else {}
    for lab in LABELS:
        row[f"dsc_{LABELS[lab].name}"] = float(scores[lab].dsc) if lab in scores else 1.0
    vals = [float(s.dsc) for s in scores.values() if s.dsc is not None and not math.isnan(float(s.dsc))]
    row["mean_dsc"] = float(np.mean(vals)) if vals else float("nan")   # NaN: official z-cut left nothing
    row["organs_in_truth"] = int(len(set(np.unique(gt).tolist()) & set(LABELS)))
    return row


def pseudo_label_quality(run_dir: str | Path, truth_dir: str | Path, rounds: Iterable[int] | None = None,
                         processes: int = 1, client: Any = None) -> pd.DataFrame:
    """FLARE22 DSC of each round's pseudo labels against ground truth (e.g. the synthetic cohort's
    `SyntheticTruth/unlabelled_labels/<case>.nii.gz`), one row per (round, case): `dsc_<organ>`
    (1 when the organ is absent from both; NaN where the official z-range cut of aorta/IVC/esophagus
    leaves nothing) and `mean_dsc`, the mean over the organs present in the truth or the pseudo label
    (NaNs skipped; NaN when both maps are empty). Cases without truth are left out. `client`,
    `processes`: as in `round_agreement`."""
    from flare_utils.distributed.cases import map_ordered
    truth_dir = Path(truth_dir)
    if not truth_dir.is_dir():
        raise FlareInputError(truth_dir, "ground-truth folder not found")
    jobs = []
    for k in _rounds_or_all(run_dir, rounds):
        r = read_round(run_dir, k)
        for c in r.cases:
            t = truth_dir / f"{c}.nii.gz"
            if t.is_file():
                jobs.append((k, c, str(r.folder / f"{c}.nii.gz"), str(t)))
    rows = map_ordered(_quality_job, jobs, client=client, processes=processes, key_prefix="pseudo-quality") \
        if jobs else []
    return pd.DataFrame(rows)
