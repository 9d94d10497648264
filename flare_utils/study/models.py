"""The models a study trained, by name: `<run_dir>/models.json`.

Several stages produce nnU-Net results folders that later stages compare (the teacher, the
teacher retrained with pseudo labels, students on different training data). nnU-Net names a
results folder after trainer, plans and configuration only, so two students of the same trainer
trained on different pseudo-labelled cases would share one folder: each such model is therefore
snapshotted into its own complete results folder (`snapshot_model`) before the next one trains.
The registry maps a model name to its folder, folds and a human description; inference,
evaluation and the index report read it.

Canonical names (the comparison of the FLARE22 winner's Table 5):
teacher, teacher_pseudo, student_labelled_only, student_selected, student_all.
Folders inside the run are stored relative to it, so a copied or moved run folder keeps its models.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flare_utils.errors import FlareInputError
from flare_utils.data.io import atomic_directory, atomic_write_text
from flare_utils.layout import RunLayout

CANONICAL_ORDER = ("teacher", "teacher_pseudo", "student_labelled_only", "student_selected", "student_all")

_MODEL_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json")
_FOLD_FILES = ("checkpoint_final.pth", "flare_training_config.json", "flare_pseudo_cases.json", "debug.json",
               "progress.png")


def snapshot_model(results: str | Path, dest: str | Path, folds: Iterable[int | str],
                   marker: tuple[str, Mapping[str, Any]] | None = None) -> Path:
    """Copy an nnU-Net results folder's model (plans, dataset.json, each fold's final checkpoint,
    config and logs) into `dest`, atomically; `dest` is then a results folder of its own that
    `nnUNetv2_predict_from_modelfolder` and flare_utils.inference.predictor load. `marker`: (file name,
    JSON content) written beside the model."""
    results, dest = Path(results), Path(dest)
    folds = [str(f) for f in folds]
    with atomic_directory(dest, overwrite=True) as tmp:
        for name in _MODEL_FILES:
            if (results / name).is_file():
                shutil.copy2(results / name, tmp / name)
        for f in folds:
            src = results / f"fold_{f}"
            if not (src / "checkpoint_final.pth").is_file():
                raise FlareInputError(src, "training finished without checkpoint_final.pth")
            (tmp / f"fold_{f}").mkdir()
            for p in src.iterdir():
                if p.is_file() and (p.name in _FOLD_FILES or p.name.startswith("training_log")):
                    shutil.copy2(p, tmp / f"fold_{f}" / p.name)
        if marker is not None:
            (tmp / marker[0]).write_text(json.dumps(marker[1], indent=1, default=str))
    return dest


def read_models(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """name -> {path (absolute), folds, title, role, training_data, ...}, canonical names first."""
    run = RunLayout(run_dir)
    if not run.models_file.is_file():
        return {}
    try:
        models = json.loads(run.models_file.read_text())
    except json.JSONDecodeError as e:
        raise FlareInputError(run.models_file, f"not valid JSON: {e}") from None
    for m in models.values():
        if isinstance(m, dict) and m.get("path"):
            m["path"] = str(run.resolve(m["path"]))
    order = {n: i for i, n in enumerate(CANONICAL_ORDER)}
    return dict(sorted(models.items(), key=lambda kv: order.get(kv[0], len(order))))


def register_model(run_dir: str | Path, name: str, path: str | Path, *, folds: Iterable[int | str], title: str,
                   role: str, training_data: str, **extra: Any) -> dict[str, Any]:
    """Add or replace one entry of `<run_dir>/models.json` (written atomically)."""
    path = Path(path).resolve()
    folds = [str(f) for f in folds]
    missing = [f for f in folds if not (path / f"fold_{f}" / "checkpoint_final.pth").is_file()]
    if missing:
        raise FlareInputError(path, f"no checkpoint_final.pth for fold(s) {missing}")
    run = RunLayout(run_dir)
    entry = {"path": str(path), "folds": folds, "title": title, "role": role, "training_data": training_data,
             **extra}
    models = {**read_models(run.root), name: entry}
    stored = {n: ({**m, "path": run.stored(m["path"])} if isinstance(m, dict) and m.get("path") else m)
              for n, m in models.items()}
    atomic_write_text(run.models_file, json.dumps(stored, indent=1, default=str))
    return entry



def select_models(run_dir: str | Path, names: Iterable[str] | str = "all") -> dict[str, dict[str, Any]]:
    """The registered models named (all of them for "all"); an unknown name is an error."""
    models = read_models(run_dir)
    if names == "all":
        return models
    names = list(names)
    unknown = [n for n in names if n not in models]
    if unknown:
        raise FlareInputError(RunLayout(run_dir).models_file,
                              f"unknown model(s) {unknown}; this run has {sorted(models) or 'none'}")
    return {n: models[n] for n in names}
