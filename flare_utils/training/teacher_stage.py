"""The teacher stage (notebook 02): plan the run's plan variants, then train the big teacher.

`train_teacher` plans and preprocesses every plan variant of the study (the student's plan too,
reused when complete), writes the cross-validation split, trains the teacher fold by fold with
nnU-Net's own training loop and registers it in `models.json` as `teacher`. Its outputs, all in
`RunLayout(run_dir).teacher`:

    summary.json           plans, trainer, folds, results folder, mean cross-validation Dice per organ
                           (written last: present only after a complete stage)
    plans.csv              every plan's geometry and parameter count (+ the papers' full-size networks)
    splits.csv             the cross-validation folds
    learning_curves.csv    one row per epoch and fold (and learning_curves.png)
    cv_dice.csv            Dice per organ and fold of nnU-Net's final validation (with final_validation)
    training_console.log   nnU-Net's console output (unless verbose)

`load_teacher_result` reads the same `TeacherResult` back from those files (a finished run, shown
without retraining).
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from flare_utils.errors import FlareInputError
from flare_utils.layout import CONFIGURATION, RunLayout, nnunet_folders
from flare_utils.planning.plans import PlanVariant

MODEL_NAME = "teacher"                   # the teacher's name in models.json
SUMMARY = "summary.json"
PLANS_TABLE, SPLITS_TABLE, CURVES_TABLE, CV_TABLE = "plans.csv", "splits.csv", "learning_curves.csv", "cv_dice.csv"
CURVES_FIGURE = "learning_curves.png"
CONSOLE_LOG = "training_console.log"
LAST_EPOCH_COLUMNS = ["epoch", "train_loss", "val_loss", "pseudo_dice", "ema_pseudo_dice", "lr", "epoch_time_s"]


@dataclass
class TeacherResult:
    """The teacher stage's summary and tables (as written in `RunLayout(run_dir).teacher`)."""
    run: RunLayout
    summary: dict[str, Any]              # summary.json
    plans: pd.DataFrame                  # one row per plans identifier (role "teacher", "paper", "")
    splits: pd.DataFrame                 # one row per fold: n_train, n_val, validation cases
    learning_curves: pd.DataFrame        # one row per fold and epoch (read_learning_curves + "fold")
    last_epoch: pd.DataFrame             # the last epoch of each fold
    cv_dice: pd.DataFrame | None         # organs x folds (+ mean); None without final validation

    @property
    def out_dir(self) -> Path: return self.run.teacher
    @property
    def results_folder(self) -> Path: return Path(self.summary["results_folder"])
    @property
    def figure(self) -> Path: return self.out_dir / CURVES_FIGURE
    @property
    def console_log(self) -> Path: return self.out_dir / CONSOLE_LOG


def train_teacher(run_dir: str | Path, dataset_id: int, *,
                  plan_variants: Sequence[str | Mapping[str, Any] | PlanVariant] = ("accurate_demo", "efficient_demo"),
                  plans: str = "accurate_demo", trainer: str = "FlareTeacherTrainer",
                  folds: Sequence[int | str] | int | str = (0, 1, 2, 3, 4), epochs: int = 50,
                  iterations_per_epoch: int = 50, val_iterations: int = 10, device: str = "auto", seed: int = 0,
                  loss: str = "dice_ce", optimizer: str = "sgd", initial_lr: float | None = None,
                  oversample_foreground: float | None = None, mirroring: bool | None = None,
                  init_checkpoint: str | None = "", freeze_encoder_stages: int = 0,
                  splits: Mapping[str, Any] | None = None, batch_size: int | None = None,
                  num_threads: int | None = None, n_proc_da: int | None = None, final_validation: bool = True,
                  processes: int = 1, verify: bool = True, verbose: bool = False, num_gpus: int = 1) -> TeacherResult:
    """Plan + preprocess `plan_variants` (and the teacher's `plans`), write the split, train `folds`
    of `trainer` on `plans` and write the stage's files (module docstring).

    `plan_variants`: PLAN_VARIANTS names or dicts of PlanVariant fields; `plans`: a variant name or a
    plans identifier; `folds`: fold numbers or "all"; `splits`: None (nnU-Net's 5-fold split; an
    existing one is kept) or a SplitSpec dict; `batch_size`: other than the plan's, training uses a
    copy of the plans `<plans>_bs<N>` (same preprocessed data); `num_gpus` > 1: each fold is trained
    with nnU-Net's multi-GPU DDP (`flare_utils.training.ddp`). The other options are TrainingConfig's.
    nnU-Net's console output goes to `training_console.log` unless `verbose`."""
    from flare_utils.planning.plans import PLAN_VARIANTS, get_variant, resolve_plans_identifier
    from flare_utils.training.config import LOSSES, TrainingConfig
    from flare_utils.training.registry import find_trainer

    if loss not in LOSSES:
        raise FlareInputError(None, f"loss must be one of {LOSSES}, got {loss!r}")
    find_trainer(trainer)                       # an unknown trainer fails here, before any work
    run = RunLayout(run_dir).activate()
    folders = nnunet_folders()
    dataset_name = folders.dataset_name(dataset_id)
    variants = [_plan_variant(v) for v in (plan_variants or [])]
    if plans in PLAN_VARIANTS and plans not in {v.name for v in variants}:   # the teacher's plan is always prepared
        variants.append(get_variant(plans))
    plans_id = resolve_plans_identifier(plans, variants)
    folds = [f if f == "all" else int(f) for f in ([folds] if isinstance(folds, (int, str)) else list(folds))]
    if not folds:
        raise FlareInputError(None, "no folds to train")
    config = TrainingConfig.from_dict({k: v for k, v in {
        "num_epochs": int(epochs), "num_iterations_per_epoch": int(iterations_per_epoch),
        "num_val_iterations_per_epoch": int(val_iterations), "device": device, "seed": seed, "loss": loss,
        "optimizer": optimizer, "initial_lr": initial_lr, "oversample_foreground_percent": oversample_foreground,
        "mirroring": mirroring, "init_checkpoint": init_checkpoint or None,
        "freeze_encoder_stages": int(freeze_encoder_stages), "num_threads": num_threads, "n_proc_da": n_proc_da,
        "final_validation": bool(final_validation)}.items() if v is not None})
    out = run.teacher
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY).unlink(missing_ok=True)     # written last: present only after a complete stage
    print(f"dataset {dataset_name}, teacher plans {plans_id}, trainer {trainer}, folds {folds}")

    planned = _plan(dataset_id, variants, processes, verify, verbose)
    plans_table = _plans_table(dataset_id, planned, plans_id, variants)
    _save_table(plans_table, out / PLANS_TABLE)
    split_list, splits_table = _write_splits(dataset_id, splits, folds)
    _save_table(splits_table, out / SPLITS_TABLE)

    train_plans = _plans_for_batch_size(dataset_id, plans_id, batch_size)
    results = _train(dataset_id, train_plans, folds, trainer, config, out / CONSOLE_LOG, verbose, num_gpus)

    curves = learning_curves(results, folds)
    _save_table(curves, out / CURVES_TABLE, index=False)
    save_curves_figure(curves, "fold", f"{trainer} · {train_plans}", out / CURVES_FIGURE)
    cv = _cv_dice(results, folds, final_validation, out / CV_TABLE)

    summary = {
        "stage": "teacher", "dataset_id": dataset_id, "dataset": dataset_name,
        "plans": train_plans, "preprocessed_plans": plans_id, "planned": planned,
        "trainer": trainer, "configuration": CONFIGURATION, "folds": [str(f) for f in folds],
        "results_folder": str(results),
        "checkpoints": {str(f): str(results / f"fold_{f}" / "checkpoint_final.pth") for f in folds},
        "splits": {"n_folds": len(split_list), "file": str(folders.preprocessed_dataset(dataset_id) /
                                                          "splits_final.json"), "spec": splits},
        "parameters": int(plans_table.loc[plans_id, "parameters"]),
        "config": config.to_dict(), "num_gpus": int(num_gpus),
        "cv_dice": None if cv is None else {k: _number(v) for k, v in cv["mean"].items() if k != "mean"},
        "cv_mean_dice": None if cv is None else _number(cv.loc["mean", "mean"]),
        "tables": {n: str(out / n) for n in (PLANS_TABLE, SPLITS_TABLE, CURVES_TABLE, CV_TABLE) if (out / n).is_file()},
    }
    _write_json(out / SUMMARY, summary)
    from flare_utils.study.models import register_model
    register_model(run.root, MODEL_NAME, results, folds=folds, title="Teacher, labelled only", role="teacher",
                   training_data="labelled cases", plans=train_plans, trainer=trainer)
    return TeacherResult(run, summary, plans_table, splits_table, curves, last_epoch_table(curves, "fold"), cv)


def load_teacher_result(run_dir: str | Path) -> TeacherResult:
    """The result of a finished teacher stage, read from its files (nothing is rewritten)."""
    run = RunLayout(run_dir)
    out = run.teacher
    if not (out / SUMMARY).is_file():
        raise FlareInputError(out / SUMMARY, "the teacher stage of this run has not finished (no summary)")
    summary = json.loads((out / SUMMARY).read_text())
    plans = pd.read_csv(out / PLANS_TABLE, index_col=0)
    plans["role"] = plans["role"].fillna("")
    curves = pd.read_csv(out / CURVES_TABLE, dtype={"fold": str})
    cv = pd.read_csv(out / CV_TABLE, index_col=0) if (out / CV_TABLE).is_file() else None
    return TeacherResult(run, summary, plans, pd.read_csv(out / SPLITS_TABLE, index_col=0), curves,
                         last_epoch_table(curves, "fold"), cv)


def last_epoch_table(curves: pd.DataFrame, by: str | list[str]) -> pd.DataFrame:
    """The last epoch of each run (`by`: "fold", or ["stage", "fold"]) of a learning-curves table."""
    return curves.groupby(by, sort=False).tail(1).set_index(by)[LAST_EPOCH_COLUMNS]


# ------------------------------------------------------------------------------------ the steps

def _plan_variant(v: str | Mapping[str, Any] | PlanVariant) -> PlanVariant:
    """A plan variant from its PLAN_VARIANTS name or a dict of PlanVariant fields."""
    from flare_utils.planning.plans import get_variant
    if isinstance(v, (str, PlanVariant)):
        return get_variant(v)
    try:
        d = dict(v)
        for k in ("patch_size_zyx", "spacing_zyx"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return PlanVariant(**d)
    except (TypeError, ValueError) as e:
        raise FlareInputError(None, f"plan variant {v!r}: {e}") from None


def _plan(dataset_id: int, variants: list[PlanVariant], processes: int, verify: bool, verbose: bool) -> dict[str, str]:
    """nnU-Net's fingerprint and planner, one plans file per variant, preprocessed (complete data reused)."""
    from flare_utils.planning.plans import plan_and_preprocess
    planned = plan_and_preprocess(dataset_id, variants, processes=int(processes), verify=bool(verify),
                                  quiet=not verbose)
    for name, pid in planned.items():
        print(f"{name:>16} -> {pid}")
    if not verbose:
        log = nnunet_folders().preprocessed_dataset(dataset_id) / "flare_plan_and_preprocess.log"
        print(f"nnU-Net's planning output: {log}")
    return planned


def _plans_table(dataset_id: int, planned: Mapping[str, str], plans_id: str,
                 variants: list[PlanVariant]) -> pd.DataFrame:
    """Every planned plans file (the teacher's marked), then the papers' full-size accurate and efficient
    networks derived from a FLARE22-shaped base plan with the FLARE22 organ set."""
    from flare_utils.planning.plans import (describe_plans, flare22_dataset_json, get_variant, make_plan_variant,
                                            skeleton_base_plans)
    dataset_json = json.loads((nnunet_folders().preprocessed_dataset(dataset_id) / "dataset.json").read_text())
    rows = []
    for pid in dict.fromkeys([*planned.values(), plans_id]):
        d = describe_plans(pid, dataset=dataset_id, dataset_json=dataset_json)
        variant = next((v for v in variants if v.plans_identifier == pid), None)
        rows.append((pid, "teacher" if pid == plans_id else "", d, variant))
    for name in ("accurate", "efficient"):
        v = get_variant(name)
        d = describe_plans(make_plan_variant(skeleton_base_plans(), v), dataset_json=flare22_dataset_json())
        rows.append((f"{name} (full size)", "paper", d, v))
    return pd.DataFrame([{
        "plans": label, "role": role,
        "patch (z,y,x)": "x".join(map(str, d["patch_size"])),
        "spacing (mm)": "x".join(f"{s:g}" for s in d["spacing"]),
        "stages": d["n_stages"],
        "features": "-".join(map(str, d["features_per_stage"])),
        "convs/stage": d["n_conv_per_stage"][0],
        "batch": d["batch_size"],
        "parameters": d["parameters"],
        "parameters (M)": round(d["parameters"] / 1e6, 2),
        "reported (M)": (v.reported_parameters / 1e6 if v is not None and v.reported_parameters else None),
    } for label, role, d, v in rows]).set_index("plans")


def _write_splits(dataset_id: int, splits: Mapping[str, Any] | None,
                  folds: list[int | str]) -> tuple[list[dict], pd.DataFrame]:
    """`splits_final.json`: from `splits` when given, else nnU-Net's seeded 5-fold split unless one exists."""
    from flare_utils.training.splits import read_splits, write_splits
    file = nnunet_folders().preprocessed_dataset(dataset_id) / "splits_final.json"
    if splits is not None:
        print("custom split written:", write_splits(dataset_id, splits))
    elif read_splits(dataset_id) is None:
        print("nnU-Net's 5-fold split written:", write_splits(dataset_id, None))
    else:
        print("existing split kept:", file)
    split_list = read_splits(dataset_id)
    bad = [f for f in folds if f != "all" and not 0 <= f < len(split_list)]
    if bad:
        raise FlareInputError(file, f"fold(s) {bad} not in the split ({len(split_list)} folds)")
    table = pd.DataFrame([{"fold": i, "n_train": len(s["train"]), "n_val": len(s["val"]),
                           "validation cases": " ".join(s["val"])} for i, s in enumerate(split_list)]).set_index("fold")
    return split_list, table


def _plans_for_batch_size(dataset_id: int, plans_id: str, batch_size: int | None) -> str:
    """`plans_id`, or for another batch size than the plan's a copy `<plans_id>_bs<N>` of its plans
    (same preprocessed data: nnU-Net's way of changing the batch size)."""
    from flare_utils.planning.plans import load_plans
    if batch_size is None:
        return plans_id
    p = load_plans(plans_id, dataset_id)
    if int(batch_size) == int(p["configurations"][CONFIGURATION]["batch_size"]):
        return plans_id
    copy = f"{plans_id}_bs{int(batch_size)}"
    p["plans_name"] = copy
    p["configurations"][CONFIGURATION]["batch_size"] = int(batch_size)
    _write_json(nnunet_folders().preprocessed_dataset(dataset_id) / f"{copy}.json", p, indent=2)
    print(f"batch size {int(batch_size)}: plans copy {copy}")
    return copy


def _train(dataset_id: int, plans_id: str, folds: list[int | str], trainer: str, config, console_log: Path,
           verbose: bool, num_gpus: int = 1) -> Path:
    """Each fold in turn, in this process (or its `num_gpus` DDP ranks), through nnU-Net's own entry
    path (`train_folds`)."""
    from flare_utils.training.api import train_folds
    with nnunet_console(console_log, verbose):
        results = train_folds(dataset_id, plans_id, folds, trainer, config, num_gpus=num_gpus)
    print(f"{trainer} -> {results}")
    for f in folds:
        print(f"  fold_{f}:", ", ".join(sorted(p.name for p in (results / f"fold_{f}").glob("checkpoint_*.pth"))))
    return results


@contextlib.contextmanager
def nnunet_console(log_file: Path, verbose: bool):
    """nnU-Net's console output (printed) to `log_file`, unless `verbose` (then it stays on screen)."""
    if verbose:
        yield
        return
    with open(log_file, "a") as log, contextlib.redirect_stdout(log):
        yield
    print(f"nnU-Net's console output: {log_file}")


def learning_curves(results: str | Path, folds: Sequence[int | str]) -> pd.DataFrame:
    """`read_learning_curves` of each fold of a results folder, stacked, with a "fold" column first."""
    from flare_utils.training.api import read_learning_curves
    curves = []
    for f in folds:
        df = read_learning_curves(results, f)
        df.insert(0, "fold", str(f))
        curves.append(df)
    return pd.concat(curves, ignore_index=True)


def save_curves_figure(curves: pd.DataFrame, by: str | list[str], title: str, path: Path) -> Path:
    """The learning-curves figure of the study's reports (`report.learning_curves_figure`), as a PNG."""
    from flare_utils.study import report
    return report.save_figure(report.learning_curves_figure(curves, by, title=title), path)


def _cv_dice(results: Path, folds: list[int | str], final_validation: bool, path: Path) -> pd.DataFrame | None:
    """Organs x numbered folds of nnU-Net's final validation, with a `mean` column (over folds) and
    nnU-Net's foreground `mean` row; None (and no file) without final validation or numbered folds."""
    from flare_utils.training.api import read_validation_dice
    cv_folds = [f for f in folds if f != "all"]
    if not (final_validation and cv_folds):
        path.unlink(missing_ok=True)
        print("no cross-validation Dice:",
              "final_validation is off" if not final_validation else "no numbered fold trained")
        return None
    cv = read_validation_dice(results, cv_folds).T           # organs x folds
    cv.columns = [f"fold {c}" for c in cv.columns]
    cv["mean"] = cv.mean(axis=1)
    cv.index.name = "organ"
    _save_table(cv, path)
    return cv


def _number(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _save_table(df: pd.DataFrame, path: Path, index: bool = True) -> None:
    from flare_utils.study import report
    report.save_table(df, path, index=index)


def _write_json(path: Path, content: Any, indent: int = 2) -> None:
    from flare_utils.data.io import atomic_write_text
    atomic_write_text(path, json.dumps(content, indent=indent, default=str))
