"""Cross-validation splits (`splits_final.json`) for nnU-Net trainings.

nnU-Net uses `<nnUNet_preprocessed>/<dataset>/splits_final.json` when it exists and otherwise
makes its own seeded 5-fold split. `write_splits` writes that file from a `SplitSpec`: nnU-Net's
own split by default, or with cases always in training (`always_train`), left out (`exclude`) or
fully custom folds (`folds`). Every id is checked against the dataset's labelled cases.

Details: docs/reference/training.md
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from flare_utils.data.io import atomic_write_text
from flare_utils.errors import FlareInputError

SPLITS_FILE = "splits_final.json"


@dataclass
class SplitSpec:
    n_folds: int = 5
    seed: int = 12345                      # nnU-Net's
    always_train: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    folds: list[Any] | None = None         # custom: [[val ids], ...] or [{"train": [...], "val": [...]}, ...]

    @classmethod
    def coerce(cls, spec: "SplitSpec | Mapping | Sequence | None") -> "SplitSpec":
        if spec is None:
            return cls()
        if isinstance(spec, SplitSpec):
            return spec
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"n_folds", "seed", "always_train", "exclude", "folds"}
            if unknown:
                raise FlareInputError(None, f"unknown split option(s) {sorted(unknown)}")
            return cls(**{k: (list(v) if k in ("always_train", "exclude", "folds") and v is not None else v)
                          for k, v in spec.items()})
        if isinstance(spec, Sequence) and not isinstance(spec, str):
            return cls(folds=list(spec))
        raise FlareInputError(None, f"cannot read a split specification from {type(spec).__name__}")


def _dataset_dirs(dataset: int | str) -> tuple[Path, Path]:
    from flare_utils.layout import nnunet_folders
    folders = nnunet_folders()
    return folders.preprocessed_dataset(dataset), folders.raw_dataset(dataset)


def known_case_ids(dataset: int | str) -> list[str]:
    """Labelled training case ids of a dataset (preprocessed ground truth, else raw labelsTr)."""
    pre, raw = _dataset_dirs(dataset)
    dj_file = pre / "dataset.json" if (pre / "dataset.json").is_file() else raw / "dataset.json"
    if not dj_file.is_file():
        raise FlareInputError(dj_file, "dataset.json not found")
    ending = json.loads(dj_file.read_text())["file_ending"]
    for folder in (pre / "gt_segmentations", raw / "labelsTr"):
        if folder.is_dir():
            ids = sorted(f.name[:-len(ending)] for f in folder.iterdir() if f.name.endswith(ending))
            if ids:
                return ids
    raise FlareInputError(pre, "no labelled cases found (gt_segmentations / labelsTr)")


def _check_ids(ids, known: set[str], what: str) -> list[str]:
    ids = [str(i) for i in ids]
    unknown = sorted(set(ids) - known)
    if unknown:
        raise FlareInputError(None, f"{what}: unknown case id(s) {unknown[:10]}"
                                    f"{' ...' if len(unknown) > 10 else ''} (dataset has {len(known)} labelled cases)")
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise FlareInputError(None, f"{what}: case id(s) listed twice: {dup}")
    return ids


def make_splits(case_ids: Sequence[str], spec: SplitSpec | Mapping | Sequence | None = None) -> list[dict]:
    """The splits list for `case_ids` (see module docstring); validated."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    spec = SplitSpec.coerce(spec)
    known = set(map(str, case_ids))
    always = _check_ids(spec.always_train, known, "always_train")
    excl = _check_ids(spec.exclude, known, "exclude")
    clash = sorted(set(always) & set(excl))
    if clash:
        raise FlareInputError(None, f"case(s) both in always_train and exclude: {clash}")
    pool = sorted(known - set(excl))
    if spec.folds is not None:
        splits = []
        for i, f in enumerate(spec.folds):
            if isinstance(f, Mapping):
                if set(f) - {"train", "val"} or "val" not in f:
                    raise FlareInputError(None, f"fold {i}: expected keys 'train' and 'val', got {sorted(f)}")
                val = _check_ids(f["val"], known, f"fold {i} val")
                train = _check_ids(f["train"], known, f"fold {i} train") if "train" in f else \
                    [c for c in pool if c not in set(val)]
            else:
                val = _check_ids(f, known, f"fold {i} val")
                train = [c for c in pool if c not in set(val)]
            train = sorted(set(train) | set(always))
            both = sorted(set(train) & set(val))
            if both:
                raise FlareInputError(None, f"fold {i}: case(s) in both train and val: {both}")
            splits.append({"train": train, "val": sorted(val)})
    else:
        rest = [c for c in pool if c not in set(always)]
        if spec.n_folds < 2:
            raise FlareInputError(None, f"n_folds must be >= 2, got {spec.n_folds}")
        if len(rest) < spec.n_folds:
            raise FlareInputError(None, f"{len(rest)} cases left to validate cannot fill {spec.n_folds} folds")
        splits = [{"train": sorted(set(map(str, s["train"])) | set(always)), "val": [str(c) for c in s["val"]]}
                  for s in generate_crossval_split(rest, seed=spec.seed, n_splits=spec.n_folds)]
    if not splits:
        raise FlareInputError(None, "no folds defined")
    for i, s in enumerate(splits):
        if not s["train"] or not s["val"]:
            raise FlareInputError(None, f"fold {i} has an empty {'train' if not s['train'] else 'val'} set")
    return splits


def write_splits(dataset: int | str, spec: SplitSpec | Mapping | Sequence | None = None) -> Path:
    """Validate `spec` against the dataset's cases and write nnU-Net's splits_final.json."""
    pre, _ = _dataset_dirs(dataset)
    splits = make_splits(known_case_ids(dataset), spec)
    pre.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(pre / SPLITS_FILE, json.dumps(splits, indent=2))


def read_splits(dataset: int | str) -> list[dict] | None:
    pre, _ = _dataset_dirs(dataset)
    path = pre / SPLITS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
