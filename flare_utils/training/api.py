"""Python API for the notebooks: train nnU-Net models with the FLARE trainers, read their curves.

`train(...)` goes through nnU-Net's own entry path (`get_trainer_from_args`, trainer lookup by
name, `run_training`, `perform_actual_validation`), so its result is exactly what
`nnUNetv2_train DATASET 3d_fullres FOLD -p PLANS -tr TRAINER` would produce with the same
`FLARE_TRAINING_CONFIG`::

    nnUNet_results/DatasetXXX_Name/<Trainer>__<plans>__3d_fullres/
        dataset.json  plans.json  dataset_fingerprint.json
        fold_N/checkpoint_final.pth  progress.png  training_log_*.txt  debug.json
               flare_training_config.json  validation/summary.json (with final validation)

Training runs in the calling process (one at a time); the nnU-Net folders are the ones in force,
or `run_dir`'s (`flare_utils.layout.nnunet_folders`). With `num_gpus > 1` it runs as nnU-Net's
multi-GPU DDP training, one spawned process per GPU (`flare_utils.training.ddp`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from flare_utils.errors import FlareInputError
from flare_utils.layout import CONFIGURATION, nnunet_folders
from flare_utils.utilities.environment import environment
from flare_utils.training.config import CONFIG_FILE_NAME, ENV_VAR, TrainingConfig

def results_folder(dataset: int | str, plans_identifier: str, trainer: str = "FlareTeacherTrainer",
                   configuration: str = CONFIGURATION) -> Path:
    """`<nnUNet_results>/<dataset>/<trainer>__<plans>__<configuration>` (nnU-Net's naming)."""
    return nnunet_folders().results_folder(dataset, plans_identifier, trainer, configuration)


def _as_config(config: TrainingConfig | Mapping | str | Path | None, trainer_cls) -> TrainingConfig:
    cls = getattr(trainer_cls, "config_class", TrainingConfig)
    if config is None:
        return cls().validate()
    if isinstance(config, TrainingConfig):
        if not isinstance(config, cls):
            return cls.from_dict(config.to_dict())
        return config.validate()
    if isinstance(config, Mapping):
        return cls.from_dict(dict(config))
    return cls.from_json(config)


def train(dataset_id: int | str, plans_identifier: str, fold: int | str = 0,
          trainer: str = "FlareTeacherTrainer", config: TrainingConfig | Mapping | str | Path | None = None,
          run_dir: str | Path | None = None, configuration: str = CONFIGURATION,
          continue_training: bool = False, num_gpus: int = 1) -> Path:
    """Train one fold with a FLARE trainer (or any nnU-Net trainer name); returns the model's
    results folder `<Trainer>__<plans>__<configuration>` (the fold is in `fold_<fold>`).

    `config`: TrainingConfig, dict, or JSON path (default: TrainingConfig()). It is written to
    `<results>/.flare_configs/` and handed to the trainer through FLARE_TRAINING_CONFIG.
    The final validation (nnU-Net's `perform_actual_validation`, writing
    `fold_N/validation/summary.json`) runs when `config.final_validation`.

    `num_gpus > 1`: nnU-Net's DDP training with one spawned process per GPU (nccl, cuda:<rank>;
    the plan's or config's batch size is the global one, split over the GPUs); a config with
    `device: "cpu"` runs that many CPU ranks over gloo instead (tests). See
    `flare_utils.training.ddp` and docs/reference/training.md.
    """
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    from flare_utils.training.base import resolve_device
    from flare_utils.training.registry import find_trainer

    nnunet_folders(run_dir)
    trainer_cls = find_trainer(trainer)
    cfg = _as_config(config, trainer_cls)
    folder = results_folder(dataset_id, plans_identifier, trainer, configuration)
    cfg_file = cfg.save(folder.parent / ".flare_configs" / f"{folder.name}__fold_{fold}.json")
    fold_arg: int | str = fold if fold == "all" else int(fold)
    from flare_utils.training.ddp import check_num_gpus
    if check_num_gpus(num_gpus) > 1:
        from flare_utils.training.ddp import check_launch, launch
        backend = check_launch(num_gpus, cfg.device, _global_batch_size(dataset_id, plans_identifier, configuration,
                                                                        cfg), trainer_cls)
        launch(dataset_id, configuration, fold_arg, trainer, plans_identifier, cfg_file, num_gpus, backend,
               continue_training, cfg.final_validation)
        return folder
    device = resolve_device(cfg.device, None)
    with environment(**{ENV_VAR: str(cfg_file)}):
        t = get_trainer_from_args(str(dataset_id), configuration, fold_arg, trainer, plans_identifier,
                                  continue_training, device=device)
        maybe_load_checkpoint(t, continue_training, False, None)
        t.run_training()
        if cfg.final_validation:
            t.perform_actual_validation(False)
    out = Path(t.output_folder_base)
    del t
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def _global_batch_size(dataset_id, plans_identifier: str, configuration: str, cfg: TrainingConfig) -> int:
    """The batch size one training step sees over all processes: config `batch_size`, else the plan's."""
    bs = getattr(cfg, "batch_size", None)
    if bs is not None:
        return int(bs)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans_file = nnunet_folders().preprocessed_dataset(dataset_id) / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise FlareInputError(plans_file, "plans file not found (run plan_and_preprocess first)")
    return int(PlansManager(json.loads(plans_file.read_text())).get_configuration(configuration).batch_size)


def train_folds(dataset_id: int | str, plans_identifier: str, folds: Iterable[int | str] = (0, 1, 2, 3, 4),
                trainer: str = "FlareTeacherTrainer", config: TrainingConfig | Mapping | str | Path | None = None,
                run_dir: str | Path | None = None, configuration: str = CONFIGURATION, num_gpus: int = 1) -> Path:
    """Cross-validation: `train` each fold in turn (splits from splits_final.json, see
    `flare_utils.training.write_splits`), each with `num_gpus` GPUs (DDP when > 1); returns the
    results folder. Folds can also run in parallel, one task per GPU (docs/reference/distributed.md)."""
    out = None
    for f in folds:
        out = train(dataset_id, plans_identifier, f, trainer, config, run_dir, configuration, num_gpus=num_gpus)
    if out is None:
        raise FlareInputError(None, "no folds given")
    return out


# ------------------------------------------------------------------------------ reading results

def _fold_dir(results: str | Path, fold: int | str | None) -> Path:
    results = Path(results)
    if fold is not None:
        return results / f"fold_{fold}"
    if results.name.startswith("fold_"):
        return results
    folds = sorted(p for p in results.glob("fold_*") if p.is_dir())
    if len(folds) != 1:
        raise FlareInputError(results, f"{len(folds)} fold folders; say which fold")
    return folds[0]


def _labels(results_or_fold: Path) -> dict[int, str]:
    for d in (results_or_fold, results_or_fold.parent):
        f = d / "dataset.json"
        if f.is_file():
            labels = json.loads(f.read_text())["labels"]
            return {int(v): k for k, v in labels.items() if isinstance(v, int) and v > 0}
    from flare_utils.data.labels import LABELS
    return {k: o.name for k, o in LABELS.items()}


def read_training_log(results: str | Path, fold: int | str | None = None) -> dict[str, list]:
    """nnU-Net's logger content (`my_fantastic_logging`) from the newest checkpoint of a fold:
    train_losses, val_losses, mean_fg_dice, ema_fg_dice, dice_per_class_or_region, lrs,
    epoch_start_timestamps, epoch_end_timestamps (one entry per epoch)."""
    import torch
    fd = _fold_dir(results, fold)
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"):
        f = fd / name
        if f.is_file():
            ck = torch.load(f, map_location="cpu", weights_only=False)
            return {k: list(v) for k, v in ck["logging"].items()}
    raise FlareInputError(fd, "no checkpoint (checkpoint_final/latest/best.pth) to read the training log from")


def read_learning_curves(results: str | Path, fold: int | str | None = None):
    """One row per epoch: train_loss, val_loss, pseudo_dice, ema_pseudo_dice, lr, epoch_time_s and
    the pseudo Dice of each organ (`dice_<organ>`), as a pandas DataFrame (the data of progress.png)."""
    import numpy as np
    import pandas as pd
    log = read_training_log(results, fold)
    n = min(len(v) for v in log.values()) if log else 0
    df = pd.DataFrame({
        "epoch": np.arange(n),
        "train_loss": [float(x) for x in log["train_losses"][:n]],
        "val_loss": [float(x) for x in log["val_losses"][:n]],
        "pseudo_dice": [float(x) for x in log["mean_fg_dice"][:n]],
        "ema_pseudo_dice": [float(x) for x in log["ema_fg_dice"][:n]],
        "lr": [float(x) for x in log["lrs"][:n]],
        "epoch_time_s": [float(e - s) for s, e in zip(log["epoch_start_timestamps"][:n],
                                                      log["epoch_end_timestamps"][:n])],
    })
    names = _labels(_fold_dir(results, fold))
    per_class = log["dice_per_class_or_region"][:n]
    if per_class:
        labels = sorted(names)
        for j, lab in enumerate(labels[:len(per_class[0])]):
            df[f"dice_{names[lab]}"] = [float(row[j]) for row in per_class]
    return df


def read_validation_dice(results: str | Path, folds: Iterable[int | str] | None = None):
    """Dice per organ of nnU-Net's final validation (`fold_N/validation/summary.json`): one row per
    fold (index `fold`), one column per organ plus `mean` (nnU-Net's foreground mean). Rows of all
    folds together are the cross-validation result (`df.mean()`)."""
    import pandas as pd
    results = Path(results)
    if folds is None:
        fold_dirs = sorted(p for p in results.glob("fold_*") if (p / "validation" / "summary.json").is_file())
    else:
        fold_dirs = [results / f"fold_{f}" for f in folds]
    if not fold_dirs:
        raise FlareInputError(results, "no fold with validation/summary.json")
    names = _labels(results)
    rows = []
    for fd in fold_dirs:
        f = fd / "validation" / "summary.json"
        if not f.is_file():
            raise FlareInputError(f, "validation summary not found (final validation not run?)")
        s = json.loads(f.read_text())
        row: dict[str, Any] = {"fold": fd.name[len("fold_"):]}
        for lab, metrics in sorted(s["mean"].items(), key=lambda kv: _label_sort_key(kv[0])):
            try:
                key = names.get(int(lab), f"label_{lab}")
            except ValueError:
                key = str(lab)
            row[key] = float(metrics["Dice"])
        row["mean"] = float(s["foreground_mean"]["Dice"])
        rows.append(row)
    return pd.DataFrame(rows).set_index("fold")


def _label_sort_key(lab: str):
    try:
        return (0, int(lab), "")
    except ValueError:
        return (1, 0, str(lab))


def read_validation_cases(results: str | Path, fold: int | str):
    """Per-case Dice of one fold's final validation (rows: cases, columns: organs)."""
    import pandas as pd
    f = Path(results) / f"fold_{fold}" / "validation" / "summary.json"
    if not f.is_file():
        raise FlareInputError(f, "validation summary not found")
    s = json.loads(f.read_text())
    names = _labels(Path(results))
    rows = []
    for c in s["metric_per_case"]:
        case = Path(c["reference_file"]).name
        row = {"case": case.split(".")[0]}
        for lab, m in sorted(c["metrics"].items(), key=lambda kv: _label_sort_key(kv[0])):
            row[names.get(int(lab), f"label_{lab}")] = m["Dice"]
        rows.append(row)
    return pd.DataFrame(rows).set_index("case")


def training_config_of(results: str | Path, fold: int | str | None = None) -> dict[str, Any]:
    """The FLARE training configuration a fold was trained with."""
    f = _fold_dir(results, fold) / CONFIG_FILE_NAME
    if not f.is_file():
        raise FlareInputError(f, "no FLARE training configuration in this fold folder")
    return json.loads(f.read_text())
