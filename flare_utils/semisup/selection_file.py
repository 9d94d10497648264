"""The selection file: which pseudo-labelled (or unlabelled) cases a trainer adds, and where they are.

The selection stage writes it (`write_selection_file`) and the trainers read it
(`read_selection_file`): a JSON file with the case ids, the images folder, the labels folder
(null: images only, for CPS) and free-form meta. Relative folders are relative to the selection
file's folder. Reading checks everything before any training: unknown case ids, missing pseudo
label files and ids that are also labelled training cases are errors naming them.

Details: docs/reference/selection.md
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flare_utils.data.io import atomic_write_text, read_json_object
from flare_utils.errors import FlareInputError

__all__ = ["SELECTION_FORMAT", "PseudoSelection", "read_selection_file", "unlabelled_selection", "write_selection_file"]

SELECTION_FORMAT = "flare_utils.pseudo_selection/1"
_SELECTION_KEYS = {"format", "cases", "images_folder", "labels_folder", "file_ending", "num_channels", "meta"}


@dataclass(frozen=True)
class PseudoSelection:
    """Pseudo-labelled (or unlabelled) cases: ids, where their images and label maps are."""
    cases: tuple[str, ...]
    images_folder: Path
    labels_folder: Path | None
    file_ending: str = ".nii.gz"
    num_channels: int = 1
    meta: dict = field(default_factory=dict)
    path: Path | None = None          # the selection file it was read from

    def image_files(self, case: str) -> list[Path]:
        return [self.images_folder / f"{case}_{c:04d}{self.file_ending}" for c in range(self.num_channels)]

    def label_file(self, case: str) -> Path | None:
        return None if self.labels_folder is None else self.labels_folder / f"{case}{self.file_ending}"

    def without_labels(self) -> PseudoSelection:
        return PseudoSelection(self.cases, self.images_folder, None, self.file_ending, self.num_channels,
                               dict(self.meta), self.path)

    def to_dict(self) -> dict[str, Any]:
        return {"format": SELECTION_FORMAT, "cases": list(self.cases), "images_folder": str(self.images_folder),
                "labels_folder": None if self.labels_folder is None else str(self.labels_folder),
                "file_ending": self.file_ending, "num_channels": self.num_channels, "meta": self.meta}

    def check_files(self, require_labels: bool = True) -> PseudoSelection:
        """FlareInputError naming the case ids without images and those without label files."""
        where = self.path
        if not self.images_folder.is_dir():
            raise FlareInputError(where, f"images_folder {self.images_folder} does not exist")
        unknown = [c for c in self.cases if not all(f.is_file() for f in self.image_files(c))]
        if unknown:
            raise FlareInputError(where, f"unknown case id(s) {_short(unknown)}: no image "
                                         f"<case>_0000{self.file_ending} in {self.images_folder}")
        if require_labels:
            if self.labels_folder is None:
                raise FlareInputError(where, "labels_folder is null: pseudo-label training needs label maps")
            if not self.labels_folder.is_dir():
                raise FlareInputError(where, f"labels_folder {self.labels_folder} does not exist")
            missing = [c for c in self.cases if not self.label_file(c).is_file()]
            if missing:
                raise FlareInputError(where, f"missing pseudo label file(s) for case(s) {_short(missing)} "
                                             f"in {self.labels_folder} (expected <case>{self.file_ending})")
        return self


def _short(ids: Sequence[str], n: int = 20) -> str:
    ids = list(ids)
    return str(ids[:n]) + (f" ... ({len(ids)} in all)" if len(ids) > n else "")


def _check_case_list(cases, where) -> tuple[str, ...]:
    if isinstance(cases, str) or not isinstance(cases, (list, tuple)):
        raise FlareInputError(where, "'cases' must be a list of case ids")
    bad = [c for c in cases if not isinstance(c, str) or not c or "/" in c or "\\" in c]
    if bad:
        raise FlareInputError(where, f"invalid case id(s) {_short([repr(b) for b in bad])}")
    dup = sorted({c for c in cases if cases.count(c) > 1})
    if dup:
        raise FlareInputError(where, f"case id(s) listed twice: {_short(dup)}")
    if not cases:
        raise FlareInputError(where, "the selection holds no case")
    return tuple(cases)


def write_selection_file(path: str | Path, cases: Iterable[str], labels_folder: str | Path | None,
                         images_folder: str | Path, *, file_ending: str = ".nii.gz", num_channels: int = 1,
                         meta: Mapping[str, Any] | None = None, check: bool = True,
                         within: str | Path | None = None) -> Path:
    """Write a selection file (format in the module docstring). Folders are stored as absolute
    paths, or, when they lie inside `within` (e.g. the run folder that also holds the file),
    relative to the file's folder, so that the whole folder can be moved. With `check` every image
    and label file must exist (FlareInputError otherwise). Written atomically."""
    path = Path(path)
    sel = PseudoSelection(_check_case_list(list(cases), path), Path(images_folder).resolve(),
                          None if labels_folder is None else Path(labels_folder).resolve(),
                          file_ending, int(num_channels), dict(meta or {}), path)
    if check:
        sel.check_files(require_labels=labels_folder is not None)
    d = sel.to_dict()
    if within is not None:
        root = Path(within).resolve()
        for key in ("images_folder", "labels_folder"):
            if d[key] and Path(d[key]).is_relative_to(root) and path.resolve().is_relative_to(root):
                d[key] = os.path.relpath(d[key], path.resolve().parent)
    return atomic_write_text(path, json.dumps(d, indent=2, default=str))


def read_selection_file(path: str | Path, *, check_files: bool = True, require_labels: bool = True,
                        labelled_cases: Iterable[str] | None = None) -> PseudoSelection:
    """Read and validate a selection file.

    check_files: every case needs its image(s) (else "unknown case id(s)") and, with
    `require_labels`, its pseudo label file (else "missing pseudo label file(s)").
    labelled_cases: the dataset's labelled ids; a selected id among them is an error.
    """
    path = Path(path)
    d = read_json_object(path, "selection file")
    unknown_keys = sorted(set(d) - _SELECTION_KEYS)
    if unknown_keys:
        raise FlareInputError(path, f"unknown key(s) {unknown_keys}; allowed: {sorted(_SELECTION_KEYS)}")
    if d.get("format", SELECTION_FORMAT) != SELECTION_FORMAT:
        raise FlareInputError(path, f"format {d.get('format')!r} is not {SELECTION_FORMAT!r}")
    for k in ("cases", "images_folder"):
        if k not in d:
            raise FlareInputError(path, f"missing key {k!r}")
    cases = _check_case_list(d["cases"], path)

    def folder(v):
        if v is None:
            return None
        if not isinstance(v, str) or not v:
            raise FlareInputError(path, f"folders must be strings, got {v!r}")
        p = Path(v).expanduser()
        return p if p.is_absolute() else (path.parent / p).resolve()

    file_ending = d.get("file_ending", ".nii.gz")
    num_channels = d.get("num_channels", 1)
    if not isinstance(file_ending, str) or not file_ending.startswith("."):
        raise FlareInputError(path, f"file_ending must start with '.', got {file_ending!r}")
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
        raise FlareInputError(path, f"num_channels must be a positive integer, got {num_channels!r}")
    meta = d.get("meta") or {}
    if not isinstance(meta, dict):
        raise FlareInputError(path, "meta must be a JSON object")
    sel = PseudoSelection(cases, folder(d["images_folder"]), folder(d.get("labels_folder")), file_ending,
                          num_channels, meta, path)
    if labelled_cases is not None:
        clash = sorted(set(cases) & set(map(str, labelled_cases)))
        if clash:
            raise FlareInputError(path, f"case id(s) {_short(clash)} are labelled training cases of the dataset; "
                                        f"pseudo-labelled cases must come from the unlabelled set")
    if check_files:
        sel.check_files(require_labels)
    elif require_labels and sel.labels_folder is None:
        raise FlareInputError(path, "labels_folder is null: pseudo-label training needs label maps")
    return sel


def unlabelled_selection(raw_dataset_folder: str | Path, cases: Iterable[str] | None = None,
                         max_cases: int | None = None, images_folder: str | Path | None = None,
                         dataset_json: Mapping[str, Any] | None = None) -> PseudoSelection:
    """The unlabelled images of a raw nnU-Net dataset (no labels) as a selection.

    `images_folder` default: `<raw dataset>/<dataset.json "unlabelled_folder" or imagesUnlabelled>`.
    `cases`: a subset (ids checked); `max_cases`: the first N ids (sorted)."""
    raw = Path(raw_dataset_folder)
    dj = dict(dataset_json) if dataset_json is not None else (
        json.loads((raw / "dataset.json").read_text()) if (raw / "dataset.json").is_file() else {})
    ending = dj.get("file_ending", ".nii.gz")
    n_ch = len(dj.get("channel_names", {"0": "CT"}))
    folder = Path(images_folder) if images_folder else raw / dj.get("unlabelled_folder", "imagesUnlabelled")
    if not folder.is_dir():
        raise FlareInputError(folder, "unlabelled images folder not found")
    suffix = f"_0000{ending}"
    available = sorted(f.name[:-len(suffix)] for f in folder.iterdir() if f.name.endswith(suffix))
    if cases is not None:
        wanted = _check_case_list(list(cases), folder)
        unknown = [c for c in wanted if c not in set(available)]
        if unknown:
            raise FlareInputError(folder, f"unknown case id(s) {_short(unknown)}: not among the unlabelled images")
        available = list(wanted)
    if max_cases is not None:
        available = available[:int(max_cases)]
    if not available:
        raise FlareInputError(folder, f"no unlabelled image (*{suffix}) found")
    return PseudoSelection(tuple(available), folder, None, ending, n_ch, {}, None).check_files(False)
