"""Pseudo-label aware training: labelled + pseudo-labelled cases in one nnU-Net run.

`FlarePseudoLabelTrainer` (mirroring on, for the pseudo-labelling rounds) and
`FlarePseudoStudentTrainer` (mirroring off, the FLARE22 student) train on the fold's labelled cases
PLUS every case of a selection file (config `selection_file`), with a fixed share of pseudo cases
in every minibatch (`pseudo_share`, default 0.5; `MixedBatchDataLoader`). Pseudo cases are
preprocessed by the plan's own nnU-Net preprocessor into a cache keyed by their inputs, so an
unchanged selection is reused at once; they never enter `splits_final.json` or validation, and
their ids must differ from the labelled ones.

Details: docs/reference/pseudo_label_training.md
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from flare_utils.errors import FlareInputError
from flare_utils.semisup.selection_file import PseudoSelection, read_selection_file
from flare_utils.training.base import FlareTrainer
from flare_utils.training.config import TrainingConfig

__all__ = [
    "CombinedDataset",
    "FlarePseudoLabelTrainer",
    "FlarePseudoStudentTrainer",
    "MixedBatchDataLoader",
    "PseudoLabelConfig",
    "prepare_pseudo_cases",
    "preprocess_selection",
    "pseudo_cache_folders",
    "secondary_count",
]

PSEUDO_INFO_NAME = "flare_pseudo_cases.json"   # written into the fold folder
_CACHE_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Preprocessing with nnU-Net's preprocessor (cached)
# ----------------------------------------------------------------------------------------------

def _file_id(p: Path) -> list:
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def _cache_key(sel: PseudoSelection, plans: Mapping[str, Any], configuration_dict: Mapping[str, Any],
               dataset_json: Mapping[str, Any], with_labels: bool) -> str:
    ident = {
        "version": _CACHE_VERSION,
        "with_labels": with_labels,
        "plans": {k: plans.get(k) for k in ("plans_name", "transpose_forward", "image_reader_writer",
                                            "foreground_intensity_properties_per_channel")},
        "configuration": configuration_dict,
        "labels": dataset_json.get("labels"),
        "regions_class_order": dataset_json.get("regions_class_order"),
        "channels": dataset_json.get("channel_names"),
        "cases": [[c, [_file_id(f) for f in sel.image_files(c)],
                   _file_id(sel.label_file(c)) if with_labels else None] for c in sel.cases],
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pseudo_cache_folders(preprocessed_dataset_folder: str | Path, data_identifier: str,
                         kind: Literal["pseudo", "unlabelled"] = "pseudo") -> list[Path]:
    """All cached preprocessed selections of one data identifier (newest last)."""
    root = Path(preprocessed_dataset_folder) / f"{data_identifier}_{kind}"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.stat().st_mtime)


def _allowed_labels(dataset_json: Mapping[str, Any]) -> set[int]:
    vals: set[int] = set()
    for v in dataset_json["labels"].values():
        vals.update(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
    return vals


def _empty_class_locations(label_manager) -> dict:
    keys = list(label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels)
    keys = [tuple(k) if isinstance(k, list) else k for k in keys]
    if label_manager.has_ignore_label:
        keys.append(tuple([-1] + label_manager.all_labels))
    return {k: np.zeros((0, 4), dtype=np.int64) for k in keys}


def _preprocess_one(case: str, image_files: list[str], label_file: str | None, out_trunc: str,
                    plans: dict, configuration: str, dataset_json: dict) -> None:
    """One case through nnU-Net's preprocessor of the plan, saved as nnU-Net saves it
    (`DefaultPreprocessor.run_case_save`: blosc2 with patch-aware chunks)."""
    from nnunetv2.training.dataloading.nnunet_dataset import (
        comp_blosc2_params,
        nnUNetDatasetBlosc2,
    )
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    pp = cm.preprocessor_class(verbose=False)
    try:
        data, seg, props = pp.run_case(image_files, label_file, pm, cm, dataset_json)
    except AssertionError as e:   # nnU-Net asserts image/label shape agreement
        raise FlareInputError(label_file or image_files[0], f"case {case}: {e}") from None
    if label_file is not None:
        bad = sorted(set(np.unique(seg).tolist()) - _allowed_labels(dataset_json) - {-1})
        if bad:
            raise FlareInputError(label_file, f"case {case}: label value(s) {bad[:10]} are not labels of the dataset")
    else:
        props["class_locations"] = _empty_class_locations(pm.get_label_manager(dataset_json))
    data = data.astype(np.float32, copy=False)
    seg = seg.astype(np.int16, copy=False)
    patch = tuple(cm.patch_size)
    block_d, chunk_d = comp_blosc2_params(data.shape, patch, data.itemsize)
    block_s, chunk_s = comp_blosc2_params(seg.shape, patch, seg.itemsize)
    nnUNetDatasetBlosc2.save_case(data, seg, props, out_trunc, chunks=chunk_d, blocks=block_d,
                                  chunks_seg=chunk_s, blocks_seg=block_s)


def preprocess_selection(selection: PseudoSelection, plans: Mapping[str, Any], configuration: str,
                         dataset_json: Mapping[str, Any], preprocessed_dataset_folder: str | Path,
                         with_labels: bool = True, processes: int = 1) -> Path:
    """Preprocess the selected cases for `plans`/`configuration` (cached; see module docstring);
    returns the folder holding them (an nnU-Net preprocessed data folder)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = {k: v for k, v in dict(plans).items() if k != "continue_training"}
    cm = PlansManager(plans).get_configuration(configuration)
    if with_labels:
        selection.check_files(require_labels=True)
    kind = "pseudo" if with_labels else "unlabelled"
    key = _cache_key(selection, plans, cm.configuration, dataset_json, with_labels)
    root = Path(preprocessed_dataset_folder) / f"{cm.data_identifier}_{kind}"
    target = root / key
    if target.is_dir() and all((target / f"{c}.pkl").is_file() for c in selection.cases):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        jobs = [(c, [str(f) for f in selection.image_files(c)],
                 str(selection.label_file(c)) if with_labels else None, str(tmp / c),
                 plans, configuration, dict(dataset_json)) for c in selection.cases]
        processes = max(1, min(int(processes), len(jobs)))
        if processes == 1:
            for j in jobs:
                _preprocess_one(*j)
        else:
            with multiprocessing.get_context("spawn").Pool(processes) as pool:
                pool.starmap(_preprocess_one, jobs)
        info = {"kind": kind, "key": key, "plans": plans.get("plans_name"), "configuration": configuration,
                "data_identifier": cm.data_identifier, "cases": list(selection.cases),
                "selection_file": None if selection.path is None else str(selection.path),
                "images_folder": str(selection.images_folder),
                "labels_folder": str(selection.labels_folder) if with_labels else None}
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target.is_dir() and all((target / f"{c}.pkl").is_file() for c in selection.cases)):
                raise
        (root / f"{key}.json").write_text(json.dumps(info, indent=2))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def prepare_pseudo_cases(dataset: int | str, plans_identifier: str, selection_file: str | Path,
                         configuration: str = "3d_fullres", processes: int = 1,
                         run_dir: str | Path | None = None) -> Path:
    """Read/validate a selection file and preprocess its cases for a dataset's plans (cached):
    what the pseudo-label trainers do at training start, callable beforehand from a notebook."""
    from flare_utils.layout import nnunet_folders
    pre = nnunet_folders(run_dir).preprocessed_dataset(dataset)
    plans_file = pre / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise FlareInputError(plans_file, "plans file not found (run plan_and_preprocess first)")
    dj_file = pre / "dataset.json"
    if not dj_file.is_file():
        raise FlareInputError(dj_file, "dataset.json not found in the preprocessed dataset folder")
    plans, dj = json.loads(plans_file.read_text()), json.loads(dj_file.read_text())
    labelled = _labelled_ids(pre, plans, configuration)
    sel = read_selection_file(selection_file, labelled_cases=labelled)
    return preprocess_selection(sel, plans, configuration, dj, pre, True, processes)


def _labelled_ids(pre: Path, plans: Mapping[str, Any], configuration: str) -> list[str]:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    folder = pre / PlansManager(dict(plans)).get_configuration(configuration).data_identifier
    return sorted(f.name[:-4] for f in folder.glob("*.pkl")) if folder.is_dir() else []


# ----------------------------------------------------------------------------------------------
# Datasets and the mixed data loader
# ----------------------------------------------------------------------------------------------

class CombinedDataset:
    """Several nnU-Net datasets behind one `load_case` (case ids must be disjoint).

    `parts`: {kind: dataset}, e.g. {"labelled": fold training set, "pseudo": pseudo cases}; the
    first part is the primary (labelled) one. `identifiers` is the union (nnU-Net's loaders use it).
    """

    def __init__(self, parts: Mapping[str, Any]):
        self.parts = dict(parts)
        self._owner: dict[str, str] = {}
        for kind, ds in self.parts.items():
            for i in ds.identifiers:
                if i in self._owner:
                    raise FlareInputError(None, f"case id {i!r} is both a {self._owner[i]} and a {kind} case")
                self._owner[i] = kind
        self.identifiers = sorted(self._owner)

    def kind_of(self, identifier: str) -> str:
        return self._owner[identifier]

    def identifiers_of(self, kind: str) -> list[str]:
        return list(self.parts[kind].identifiers)

    def load_case(self, identifier: str):
        return self.parts[self._owner[identifier]].load_case(identifier)

    def __getitem__(self, identifier):
        return self.load_case(identifier)

    def __len__(self):
        return len(self.identifiers)


def secondary_count(batch_size: int, share: float) -> int:
    """Samples of the second kind (pseudo / unlabelled) per batch for a share (module docstring):
    round half up, then at least one of each kind when 0 < share < 1."""
    b = int(batch_size)
    if b < 1:
        raise FlareInputError(None, f"batch size must be >= 1, got {batch_size}")
    if not 0.0 <= float(share) <= 1.0:
        raise FlareInputError(None, f"share must be in [0, 1], got {share}")
    n = int(math.floor(float(share) * b + 0.5 + 1e-9))   # epsilon: 0.35 * 10 is 3.4999...
    if 0.0 < share < 1.0 and b >= 2:
        n = min(max(n, 1), b - 1)
    return n


class MixedBatchDataLoader(nnUNetDataLoader):
    """nnU-Net's data loader drawing two kinds of cases separately for every batch.

    Each batch holds exactly `n_secondary` samples of `secondary` (pseudo-labelled or unlabelled
    cases) and `batch_size - n_secondary` of `primary` (labelled cases), each drawn uniformly with
    replacement from its kind. `layout`: "shuffle" (positions of the kinds shuffled per batch) or
    "secondary_first" (secondary samples first; nnU-Net's foreground oversampling rule, which
    forces the last samples of a batch, is then applied to the primary samples as if they were the
    whole batch - used for CPS, whose unlabelled cases have no foreground). Cropping, oversampling and
    augmentation are `nnUNetDataLoader.generate_train_batch`'s; the batch gets a boolean
    `secondary` array (True = secondary kind) beside `keys`.
    """

    def __init__(self, primary, secondary, batch_size: int, n_secondary: int, patch_size, final_patch_size,
                 label_manager, oversample_foreground_percent: float = 0.0, transforms=None,
                 probabilistic_oversampling: bool = False,
                 layout: Literal["shuffle", "secondary_first"] = "shuffle"):
        if not 0 <= int(n_secondary) <= int(batch_size):
            raise FlareInputError(None, f"n_secondary={n_secondary} must be in [0, batch_size={batch_size}]")
        if layout not in ("shuffle", "secondary_first"):
            raise FlareInputError(None, f"unknown layout {layout!r}")
        self.primary_ids = list(primary.identifiers)
        self.secondary_ids = list(secondary.identifiers)
        if int(n_secondary) < int(batch_size) and not self.primary_ids:
            raise FlareInputError(None, "no primary (labelled) case to draw from")
        if int(n_secondary) > 0 and not self.secondary_ids:
            raise FlareInputError(None, "no secondary (pseudo-labelled / unlabelled) case to draw from")
        data = CombinedDataset({"primary": primary, "secondary": secondary})
        super().__init__(data, int(batch_size), patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=oversample_foreground_percent, sampling_probabilities=None,
                         pad_sides=None, probabilistic_oversampling=probabilistic_oversampling,
                         transforms=transforms)
        self.n_secondary = int(n_secondary)
        self.layout = layout
        self._pending = None

    def _oversample_last_XX_percent(self, sample_idx: int) -> bool:
        # "secondary_first": nnU-Net's rule applied to the primary samples only (as if they were
        # the whole batch); "shuffle": nnU-Net's rule over the whole batch.
        if self.layout == "secondary_first":
            j = sample_idx - self.n_secondary
            n = self.batch_size - self.n_secondary
            return j >= 0 and not j < round(n * (1 - self.oversample_foreground_percent))
        return super()._oversample_last_XX_percent(sample_idx)

    def draw(self) -> tuple[list[str], np.ndarray]:
        """(keys, secondary mask) of the next batch."""
        n_sec = self.n_secondary
        n_pri = self.batch_size - n_sec
        pri = list(np.random.choice(self.primary_ids, n_pri, replace=True)) if n_pri else []
        sec = list(np.random.choice(self.secondary_ids, n_sec, replace=True)) if n_sec else []
        mask = np.array([True] * n_sec + [False] * n_pri)
        if self.layout == "shuffle":
            mask = mask[np.random.permutation(self.batch_size)]
        it_p, it_s = iter(pri), iter(sec)
        keys = [str(next(it_s) if m else next(it_p)) for m in mask]
        return keys, mask

    def get_indices(self):
        if self._pending is not None:
            keys, self._pending = self._pending, None
            return keys
        return self.draw()[0]

    def generate_train_batch(self):
        keys, mask = self.draw()
        self._pending = keys
        batch = super().generate_train_batch()
        batch["secondary"] = mask
        return batch


# ----------------------------------------------------------------------------------------------
# Configuration and trainers
# ----------------------------------------------------------------------------------------------

@dataclass
class PseudoLabelConfig(TrainingConfig):
    """TrainingConfig + pseudo-label options (see module docstring)."""
    selection_file: str | None = None
    pseudo_share: float | None = 0.5
    batch_size: int | None = None
    preprocess_processes: int = 1

    def validate(self, where: str | Path | None = None):
        super().validate(where)
        if self.pseudo_share is not None and not 0.0 <= self.pseudo_share <= 1.0:
            raise FlareInputError(where, f"pseudo_share must be in [0, 1] or null, got {self.pseudo_share}")
        if self.batch_size is not None and self.batch_size < 1:
            raise FlareInputError(where, f"batch_size must be >= 1 or null, got {self.batch_size}")
        if self.preprocess_processes < 1:
            raise FlareInputError(where, "preprocess_processes must be >= 1")
        if self.selection_file is not None and not Path(self.selection_file).is_file():
            raise FlareInputError(self.selection_file, "selection_file not found")
        return self


class _BatchSizeMixin:
    """`batch_size` from the config (None: the plan's)."""

    def _set_batch_size_and_oversample(self):
        bs = getattr(self.flare_config, "batch_size", None)
        if bs is not None and self.is_ddp:
            # DDP: the configured batch size is the global one, split over the ranks by nnU-Net
            conf = self.configuration_manager.configuration
            old = conf["batch_size"]
            conf["batch_size"] = int(bs)
            try:
                super()._set_batch_size_and_oversample()
            finally:
                conf["batch_size"] = old
            return
        super()._set_batch_size_and_oversample()
        if bs is not None:
            self.batch_size = int(bs)

    @property
    def global_batch_size(self) -> int:
        """The batch size over all ranks (config `batch_size`, else the plan's; without DDP: `batch_size`)."""
        if not self.is_ddp:
            return int(self.batch_size)
        return int(getattr(self.flare_config, "batch_size", None) or self.configuration_manager.batch_size)

    @property
    def flare_batch_size(self) -> int:
        """The minibatch size (also before `initialize` has set `self.batch_size`)."""
        bs = getattr(self, "batch_size", None)
        if bs is None:
            bs = getattr(self.flare_config, "batch_size", None) or self.configuration_manager.batch_size
        return int(bs)


class FlarePseudoLabelTrainer(_BatchSizeMixin, FlareTrainer):
    """Labelled + selected pseudo-labelled cases, a fixed pseudo share per minibatch (teacher
    defaults: mirroring on). See the module docstring."""
    config_class = PseudoLabelConfig
    default_mirroring = True

    pseudo_selection: PseudoSelection | None = None
    pseudo_folder: Path | None = None
    pseudo_cases: list[str] | None = None

    def pseudo_per_batch(self) -> int | None:
        """Pseudo samples in this process's minibatch (None: uniform over all cases). In DDP the
        global batch's pseudo count (`secondary_count` of the global batch size) is split over the
        ranks (`ddp.rank_secondary_counts`), so the global share is the single-process one."""
        share = self.flare_config.pseudo_share
        if share is None:
            return None
        if not self.is_ddp:
            return secondary_count(self.flare_batch_size, share)
        from flare_utils.training.ddp import rank_secondary_counts
        gb = self.global_batch_size
        return rank_secondary_counts(gb, secondary_count(gb, share), self.world_size)[self.local_rank]

    def ddp_rank_info(self) -> dict[str, Any]:
        return {**super().ddp_rank_info(), "pseudo_cases": list(self.pseudo_cases or []),
                "pseudo_per_batch": self.pseudo_per_batch()}

    def load_pseudo_dataset(self):
        """Validate the selection, preprocess (cached) and return the pseudo cases' dataset."""
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        c = self.flare_config
        if not c.selection_file:
            raise FlareInputError(None, f"{type(self).__name__} needs `selection_file` in its training configuration "
                                        f"(FLARE_TRAINING_CONFIG)")
        labelled = self.dataset_class.get_identifiers(self.preprocessed_dataset_folder)
        sel = read_selection_file(c.selection_file, labelled_cases=labelled)
        with self.rank0_first():   # DDP: rank 0 fills the shared cache, the others then find it
            folder = preprocess_selection(sel, self.plans_manager.plans, self.configuration_name, self.dataset_json,
                                          self.preprocessed_dataset_folder_base, True, c.preprocess_processes)
            ds_cls = infer_dataset_class(str(folder))
            ds_cls.unpack_dataset(str(folder), overwrite_existing=False, num_processes=1, verify=True)
        self.pseudo_selection, self.pseudo_folder = sel, folder
        return ds_cls(str(folder), list(sel.cases))

    def get_tr_and_val_datasets(self):
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        pseudo = self.load_pseudo_dataset()
        overlap = sorted(set(pseudo.identifiers) & set(dataset_val.identifiers))
        if overlap:   # cannot happen after read_selection_file's check; kept as a guard
            raise FlareInputError(self.flare_config.selection_file, f"pseudo case(s) {overlap} in the validation set")
        combined = CombinedDataset({"labelled": dataset_tr, "pseudo": pseudo})
        self.pseudo_cases = list(pseudo.identifiers)
        share = self.flare_config.pseudo_share
        # over all ranks in DDP (the single-process numbers otherwise)
        gb = self.global_batch_size if getattr(self, "batch_size", None) is not None else self.flare_batch_size
        n_ps = None if share is None else secondary_count(gb, share)
        self.print_to_log_file(f"pseudo-label training: {len(dataset_tr.identifiers)} labelled + "
                               f"{len(pseudo.identifiers)} pseudo-labelled training cases "
                               f"({self.pseudo_folder}); {len(dataset_val.identifiers)} validation cases; "
                               f"pseudo samples per batch: "
                               f"{'uniform over all cases' if n_ps is None else f'{n_ps} of {gb}'}"
                               f"{f' over {self.world_size} DDP ranks' if self.is_ddp else ''}")
        if share is not None and abs(n_ps / gb - share) > 1e-9:
            self.print_to_log_file(f"WARNING: pseudo_share {share} cannot be realised exactly with batch size "
                                   f"{gb}; using {n_ps}/{gb}")
        info = {"selection_file": str(self.flare_config.selection_file), "preprocessed_folder": str(self.pseudo_folder),
                "pseudo_cases": list(pseudo.identifiers), "labelled_training_cases": list(dataset_tr.identifiers),
                "validation_cases": list(dataset_val.identifiers), "pseudo_share": share,
                "batch_size": int(gb), "pseudo_per_batch": n_ps}
        if self.is_ddp:
            info["ddp"] = {"world_size": self.world_size}
        if self.local_rank == 0:
            out = Path(self.output_folder) / PSEUDO_INFO_NAME
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(info, indent=2))
        return combined, dataset_val

    def make_dataloader(self, dataset, patch_size, final_patch_size, transforms, train: bool):
        share = self.flare_config.pseudo_share
        if train and isinstance(dataset, CombinedDataset) and share is not None:
            bs = self.flare_batch_size
            return MixedBatchDataLoader(dataset.parts["labelled"], dataset.parts["pseudo"], bs,
                                        self.pseudo_per_batch(), patch_size, final_patch_size,
                                        self.label_manager, self.oversample_foreground_percent, transforms,
                                        self.probabilistic_oversampling, layout="shuffle")
        return super().make_dataloader(dataset, patch_size, final_patch_size, transforms, train)


class FlarePseudoStudentTrainer(FlarePseudoLabelTrainer):
    """Student flavour: mirroring off in augmentation and at inference."""
    default_mirroring = False
