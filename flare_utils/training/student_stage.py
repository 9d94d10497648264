"""The student stage (notebook 05): one student of the study's comparison, trained with one recipe.

A recipe is one or two nnU-Net v2 trainers of `flare_utils.training` (`RECIPES`):

    plain           FlarePseudoStudentTrainer (FlareStudentTrainer on the labelled cases alone)
    noisy_student   FlareNoisyStudentTrainer, then FlareFineTuneTrainer (labelled only, from its checkpoint)
    cps             FlareCPSTrainer (cross-pseudo supervision; the selected cases' images only)

The student's `variant` names its training data ("labelled_only", "selected", "all"). nnU-Net names
results folders by trainer and plans only, so the final model is copied to
`RunLayout(run_dir).models_dir / "student_<variant>"` and registered in `models.json` under that name.
Outputs, in `RunLayout(run_dir).student(variant)`:

    summary.json           recipe, trainers, results folders, configuration (written last)
    learning_curves.csv    one row per trainer stage, fold and epoch (and learning_curves.png)
    cv_dice.csv            Dice per organ, fold and trainer stage of nnU-Net's final validation
    training_console.log   nnU-Net's console output (unless verbose)

`load_student_result` reads the same `StudentResult` back from those files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from flare_utils.errors import FlareInputError
from flare_utils.layout import RunLayout
from flare_utils.training.teacher_stage import (CONSOLE_LOG, CURVES_FIGURE, CURVES_TABLE, CV_TABLE, SUMMARY,
                                                last_epoch_table, learning_curves, nnunet_console,
                                                save_curves_figure)

# recipe -> trainer of its (first) stage; the labelled-only student of the plain recipe is FlareStudentTrainer
RECIPES = {"plain": "FlarePseudoStudentTrainer", "noisy_student": "FlareNoisyStudentTrainer", "cps": "FlareCPSTrainer"}
LABELLED_ONLY_TRAINER = "FlareStudentTrainer"
FINETUNE_TRAINER = "FlareFineTuneTrainer"
TITLES = {"labelled_only": "Student, labelled only", "selected": "Student + selected pseudo labels",
          "all": "Student + all pseudo labels"}


def model_name(variant: str) -> str:
    """The student's name in models.json (and its folder in `models/`)."""
    return f"student_{variant}"


@dataclass
class StudentResult:
    """The student stage's summary and tables (as written in `RunLayout(run_dir).student(variant)`)."""
    run: RunLayout
    variant: str
    summary: dict[str, Any]              # summary.json
    learning_curves: pd.DataFrame        # one row per trainer stage, fold and epoch
    last_epoch: pd.DataFrame             # the last epoch of each trainer stage and fold
    cv_dice: pd.DataFrame | None         # rows: folds + "mean" per trainer stage; None without final validation

    @property
    def out_dir(self) -> Path: return self.run.student(self.variant)
    @property
    def model_name(self) -> str: return model_name(self.variant)
    @property
    def model_folder(self) -> Path: return Path(self.summary["model_folder"])
    @property
    def stages(self) -> dict[str, tuple[str, Path]]:
        """Trainer stage ("student", "finetune", "cps") -> (trainer, results folder), in training order."""
        return {k: (v["trainer"], Path(v["results_folder"])) for k, v in self.summary["stages"].items()}
    @property
    def figure(self) -> Path: return self.out_dir / CURVES_FIGURE
    @property
    def console_log(self) -> Path: return self.out_dir / CONSOLE_LOG


def train_student(run_dir: str | Path, dataset_id: int, *, plans: str = "efficient_demo", recipe: str = "plain",
                  selection_file: str | Path | None = "", variant: str | None = "",
                  folds: Sequence[int | str] | int | str = (0, 1, 2, 3, 4), epochs: int = 50,
                  iterations_per_epoch: int = 50, val_iterations: int = 10, device: str = "auto", seed: int = 0,
                  optimizer: str = "sgd", initial_lr: float | None = None, oversample_foreground: float | None = None,
                  pseudo_share: float | None = None, finetune_epochs: int = 10, batch_size: int | None = None,
                  cps_rampup_epochs: int = 20, cps_lambda_max: float = 0.5, num_threads: int | None = None,
                  n_proc_da: int | None = None, final_validation: bool = True, verbose: bool = False,
                  num_gpus: int = 1) -> StudentResult:
    """Train the student of `recipe` on the labelled cases plus the cases of `selection_file` (none:
    the labelled-only baseline, plain recipe only) and write the stage's files (module docstring).

    `plans`: a plan variant name or a plans identifier; `variant`: the student's name in the study
    ("" -> from selection_file); `pseudo_share`: pseudo-labelled share of each minibatch (None: the
    recipe's 0.5 / 0.75); `finetune_epochs`: noisy_student's labelled-only fine-tune (0: none);
    `cps_*`: the CPS weight's ramp; `num_gpus` > 1: nnU-Net's multi-GPU DDP per fold (not cps). The
    other options are TrainingConfig's. nnU-Net's console output
    goes to `training_console.log` unless `verbose`."""
    from flare_utils.planning.plans import resolve_plans_identifier

    if recipe not in RECIPES:
        raise FlareInputError(None, f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
    selection_file = str(selection_file or "")
    labelled_only = not selection_file
    if labelled_only and recipe != "plain":
        raise FlareInputError(None, f"recipe {recipe!r} needs selection_file (the selection stage's JSON); "
                                    "only the plain recipe trains on labelled cases alone")
    run = RunLayout(run_dir).activate()
    plans_id = resolve_plans_identifier(plans)
    folds = [folds] if isinstance(folds, (int, str)) else list(folds)
    variant = variant or ("labelled_only" if labelled_only else "selected")
    if labelled_only != (variant == "labelled_only"):
        raise FlareInputError(None, f"variant {variant!r} does not match selection_file {selection_file!r}")
    out = run.student(variant)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY).unlink(missing_ok=True)     # written last: present only after a complete stage
    print(f"dataset {dataset_id}, plans {plans_id}, recipe {recipe}, folds {folds}, student '{variant}'")

    selection = _prepare_selection(dataset_id, plans_id, selection_file, recipe)
    common = {k: v for k, v in {
        "num_epochs": int(epochs), "num_iterations_per_epoch": int(iterations_per_epoch),
        "num_val_iterations_per_epoch": int(val_iterations), "device": device, "seed": seed,
        "num_threads": num_threads, "n_proc_da": n_proc_da, "final_validation": bool(final_validation),
        "batch_size": batch_size, "optimizer": optimizer, "initial_lr": initial_lr,
        "oversample_foreground_percent": oversample_foreground}.items() if v is not None}
    config, finetune = _configs(recipe, labelled_only, common, selection_file, pseudo_share, finetune_epochs,
                                batch_size, cps_rampup_epochs, cps_lambda_max)
    with nnunet_console(out / CONSOLE_LOG, verbose):
        stages = _train(recipe, labelled_only, dataset_id, plans_id, folds, config, finetune, num_gpus)
    for name, (trainer, folder) in stages.items():
        print(f"{name}: {trainer} -> {folder}")
    final_stage = list(stages)[-1]

    curves = _learning_curves(stages, folds)
    from flare_utils.study import report
    report.save_table(curves, out / CURVES_TABLE, index=False)
    save_curves_figure(curves, ["stage", "fold"], f"{model_name(variant)} · {recipe} · {plans_id}", out / CURVES_FIGURE)
    cv = _cv_dice(stages, folds, final_validation, out / CV_TABLE)

    # nnU-Net names results folders by trainer and plans only: the next student of the same trainer (another
    # variant) would overwrite this one, so the study keeps a complete copy under <run_dir>/models/<name>
    from flare_utils.study.models import register_model, snapshot_model
    name = model_name(variant)
    final_trainer, final_folder = stages[final_stage]
    model_copy = snapshot_model(final_folder, run.models_dir / name, folds)
    n_pseudo = len(selection.cases) if selection else 0
    register_model(run.root, name, model_copy, folds=folds, title=TITLES.get(variant, f"Student ({variant})"),
                   role="student", training_data=("labelled cases" if labelled_only else
                                                  f"labelled + {n_pseudo} pseudo-labelled cases ({variant})"),
                   plans=plans_id, trainer=final_trainer, recipe=recipe)
    summary = {
        "variant": variant, "model_name": name, "model_folder": str(model_copy),
        "recipe": recipe, "dataset_id": dataset_id, "plans": plans_id, "folds": [str(f) for f in folds],
        "selection_file": selection_file, "n_selected": n_pseudo,
        "stages": {k: {"trainer": t, "results_folder": str(p)} for k, (t, p) in stages.items()},
        "final_stage": final_stage, "final_results_folder": str(final_folder),
        "config": config.to_dict(),
        "cv_mean_dice": None if cv is None else float(cv[cv["stage"] == final_stage].loc["mean", "mean"]),
    }
    from flare_utils.data.io import atomic_write_text
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2, default=str))
    return StudentResult(run, variant, summary, curves, last_epoch_table(curves, ["stage", "fold"]), cv)


def load_student_result(run_dir: str | Path, variant: str) -> StudentResult:
    """The result of a finished student stage of `variant`, read from its files (nothing is rewritten)."""
    run = RunLayout(run_dir)
    out = run.student(variant)
    if not (out / SUMMARY).is_file():
        raise FlareInputError(out / SUMMARY, f"the student stage '{variant}' of this run has not finished (no summary)")
    summary = json.loads((out / SUMMARY).read_text())
    curves = pd.read_csv(out / CURVES_TABLE, dtype={"stage": str, "fold": str})
    cv = pd.read_csv(out / CV_TABLE, index_col=0) if (out / CV_TABLE).is_file() else None
    return StudentResult(run, variant, summary, curves, last_epoch_table(curves, ["stage", "fold"]), cv)


# ------------------------------------------------------------------------------------ the steps

def _prepare_selection(dataset_id: int, plans_id: str, selection_file: str, recipe: str):
    """The selection file checked (every case needs its image and, except for CPS, its pseudo label) and
    its cases preprocessed once for these plans (cached; CPS reads the images only). None: labelled only."""
    if not selection_file:
        print("no selection file: the student trains on the labelled cases only (the 'labelled only' baseline)")
        return None
    from flare_utils.semisup.selection_file import read_selection_file
    selection = read_selection_file(selection_file, require_labels=(recipe != "cps"))
    print(f"{len(selection.cases)} selected cases; images {selection.images_folder}; labels {selection.labels_folder}")
    if selection.meta:
        print("selection meta:", json.dumps(selection.meta)[:500])
    if recipe != "cps":
        from flare_utils.training.with_pseudo_labels import prepare_pseudo_cases
        print("preprocessed pseudo-labelled cases:", prepare_pseudo_cases(dataset_id, plans_id, selection_file))
    return selection


def _configs(recipe: str, labelled_only: bool, common: dict[str, Any], selection_file: str,
             pseudo_share: float | None, finetune_epochs: int, batch_size: int | None, cps_rampup_epochs: int,
             cps_lambda_max: float):
    """(the config of the recipe's trainer, the fine-tune's config or None)."""
    share = {} if pseudo_share is None else {"pseudo_share": float(pseudo_share)}
    if labelled_only:
        if batch_size is not None:
            raise FlareInputError(None, "batch_size applies to mixed (pseudo-labelled) batches; the labelled-only "
                                        "student uses the plan's batch size")
        from flare_utils.training.config import TrainingConfig
        return TrainingConfig.from_dict(common), None
    if recipe == "plain":
        from flare_utils.training.with_pseudo_labels import PseudoLabelConfig
        return PseudoLabelConfig.from_dict({**common, "selection_file": selection_file, **share}), None
    if recipe == "noisy_student":
        from flare_utils.training.noisy_student import FineTuneConfig, NoisyStudentConfig
        finetune = FineTuneConfig.from_dict({**common, "num_epochs": int(finetune_epochs)}) if finetune_epochs else None
        return NoisyStudentConfig.from_dict({**common, "selection_file": selection_file, **share}), finetune
    from flare_utils.training.cps import CPSConfig
    return CPSConfig.from_dict({**common, "selection_file": selection_file,
                                "cps_rampup_epochs": int(cps_rampup_epochs),
                                "cps_lambda_max": float(cps_lambda_max)}), None


def _train(recipe: str, labelled_only: bool, dataset_id: int, plans_id: str, folds: list[int | str], config,
           finetune, num_gpus: int = 1) -> dict[str, tuple[str, Path]]:
    """The recipe's trainers fold by fold: trainer stage name -> (trainer, results folder)."""
    from flare_utils.training.api import train_folds
    if recipe == "noisy_student":
        from flare_utils.training.noisy_student import train_noisy_student
        res = train_noisy_student(dataset_id, plans_id, folds, config, finetune, num_gpus=num_gpus)
        stages = {"student": (RECIPES[recipe], res["student"])}
        if res["finetune"] is not None:
            stages["finetune"] = (FINETUNE_TRAINER, res["finetune"])
        return stages
    trainer = LABELLED_ONLY_TRAINER if labelled_only else RECIPES[recipe]
    stage = "student" if recipe == "plain" else "cps"
    return {stage: (trainer, train_folds(dataset_id, plans_id, folds, trainer, config, num_gpus=num_gpus))}


def _learning_curves(stages: dict[str, tuple[str, Path]], folds: list[int | str]) -> pd.DataFrame:
    """Every trainer stage's learning curves, stacked, with "stage" and "fold" columns first."""
    curves = []
    for name, (_, folder) in stages.items():
        df = learning_curves(folder, folds)
        df.insert(0, "stage", name)
        curves.append(df)
    return pd.concat(curves, ignore_index=True)


def _cv_dice(stages: dict[str, tuple[str, Path]], folds: list[int | str], final_validation: bool,
             path: Path) -> pd.DataFrame | None:
    """One row per fold plus a `mean` row for each trainer stage (column `stage`), one column per organ
    plus nnU-Net's foreground `mean`; None (and no file) without final validation."""
    if not final_validation:
        path.unlink(missing_ok=True)
        print("final_validation is off: no cross-validation Dice")
        return None
    from flare_utils.study import report
    from flare_utils.training.api import read_validation_dice
    cv = []
    for name, (_, folder) in stages.items():
        df = read_validation_dice(folder, folds)
        df.loc["mean"] = df.mean(numeric_only=True)
        df.insert(0, "stage", name)
        cv.append(df)
    cv = pd.concat(cv)
    report.save_table(cv, path)
    return cv
