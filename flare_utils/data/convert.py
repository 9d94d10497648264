"""FLARE22 folders -> an nnU-Net v2 raw dataset, with the unlabelled images registered beside it.

`convert_flare22(root, raw_root, dataset_id)` finds the FLARE22 folders (`Flare22Layout.discover`,
or a `Flare22Layout` with explicit folders) and writes `DatasetNNN_Name/` with imagesTr/labelsTr,
imagesTs/labelsTs, imagesUnlabelled, dataset.json and a manifest, checking every file on the way
(ids, image/label pairs and geometry, label values), so bad data fails here, not during training.
The source folders are only read; the dataset is built in a temporary sibling and renamed into
place, and a re-run with unchanged inputs reuses it. With hard links (`link`) the dataset shares
the source's files: never edit dataset files in place.

Details: docs/reference/data_conversion.md
"""
from __future__ import annotations

import datetime as _dt
import fnmatch
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import nibabel as nib
import numpy as np

from flare_utils import __version__
from flare_utils.data import labels as _labels
from flare_utils.errors import FlareInputError
from flare_utils.data.io import (
    Geometry,
    atomic_directory,
    atomic_write_text,
    list_nifti,
    load_nifti,
    read_label_map,
    save_nifti_like,
)
from flare_utils.utilities.parallel import map_processes

__all__ = [
    "Flare22Layout", "ConvertResult", "convert_flare22", "dataset_summary", "write_summary",
    "verify_with_nnunet",
    "SPLIT_FOLDERS", "MANIFEST_NAME",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "flare_utils.convert/1"
FILE_ENDING = ".nii.gz"
CHANNEL_SUFFIX = "_0000"
VALID_LABELS = frozenset(range(_labels.NUM_CLASSES))
LINK_MODES = ("copy", "hardlink", "symlink")
# split -> (images folder, labels folder or None)
SPLIT_FOLDERS: dict[str, tuple[str, str | None]] = {
    "train": ("imagesTr", "labelsTr"),
    "test": ("imagesTs", "labelsTs"),
    "unlabelled": ("imagesUnlabelled", None),
}
_VALID_ID = re.compile(r"^[A-Za-z0-9_-]+$")
_VALID_DATASET_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


# ----------------------------------------------------------------------------- layout discovery

def _as_path(p) -> Path | None:
    return None if p is None else Path(p)


@dataclass
class Flare22Layout:
    """Where the FLARE22 folders are. `unlabelled_images` may be one folder or several."""

    labelled_images: Path
    labelled_labels: Path
    unlabelled_images: Path | tuple[Path, ...] | None = None
    validation_images: Path | None = None
    validation_labels: Path | None = None

    def __post_init__(self):
        self.labelled_images = Path(self.labelled_images)
        self.labelled_labels = Path(self.labelled_labels)
        if isinstance(self.unlabelled_images, (list, tuple)):
            dirs = tuple(Path(p) for p in self.unlabelled_images)
            self.unlabelled_images = dirs[0] if len(dirs) == 1 else (dirs or None)
        else:
            self.unlabelled_images = _as_path(self.unlabelled_images)
        self.validation_images = _as_path(self.validation_images)
        self.validation_labels = _as_path(self.validation_labels)

    @property
    def unlabelled_dirs(self) -> tuple[Path, ...]:
        u = self.unlabelled_images
        if u is None:
            return ()
        return u if isinstance(u, tuple) else (u,)

    def to_dict(self) -> dict[str, Any]:
        return {
            "labelled_images": str(self.labelled_images),
            "labelled_labels": str(self.labelled_labels),
            "unlabelled_images": [str(p) for p in self.unlabelled_dirs],
            "validation_images": None if self.validation_images is None else str(self.validation_images),
            "validation_labels": None if self.validation_labels is None else str(self.validation_labels),
        }

    @classmethod
    def discover(cls, root: str | Path) -> "Flare22Layout":
        """Find the conventional FLARE22 folders under `root`.

        Labelled set: the first of `Training/FLARE22_Label*Case*`, `FLARE22_Label*Case*`,
        `Training`, `root` itself that holds an `images` (or `imagesTr`) and a `labels` (or
        `labelsTr`) folder. Unlabelled set: every `FLARE22_Unlabel*Case*` or `Unlabel*` folder in
        `Training/` or `root` (its images directly inside or in `images/`). Validation set:
        `Validation/` (preferred) or `Tuning/`, images in `images/` or directly inside, labels in
        `labels/` when present. Folder names match case-insensitively. Optional (unlabelled and
        validation) folders that hold no NIfTI file are treated as absent; an empty folder passed
        explicitly to `Flare22Layout(...)` is still an error.
        """
        root = Path(root)
        if not root.is_dir():
            raise FlareInputError(root, "FLARE22 root folder is missing or not a folder")
        patterns = ("Training/FLARE22_Label*Case*", "FLARE22_Label*Case*", "Training", ".")
        labelled = None
        for pattern in patterns:
            for cand in _match_dirs(root, pattern):
                img = _first_child_dir(cand, ("images", "imagesTr"))
                lab = _first_child_dir(cand, ("labels", "labelsTr"))
                if img is not None and lab is not None:
                    labelled = (img, lab)
                    break
            if labelled is not None:
                break
        if labelled is None:
            raise FlareInputError(
                root, "no FLARE22 labelled folders found: looked (case-insensitively) for an images/ "
                      "(or imagesTr/) folder beside a labels/ (or labelsTr/) folder in "
                      + ", ".join(f"<root>/{p}" for p in patterns))

        unlabelled: list[Path] = []
        for pattern in ("Training/FLARE22_Unlabel*Case*", "FLARE22_Unlabel*Case*",
                        "Training/Unlabel*", "Unlabel*"):
            for cand in _match_dirs(root, pattern):
                img = _first_child_dir(cand, ("images",)) or cand
                if img not in unlabelled and _holds_nifti(img):
                    unlabelled.append(img)

        val_img = val_lab = None
        for pattern in ("Validation", "Tuning"):
            cands = _match_dirs(root, pattern)
            if cands:
                cand = cands[0]
                val_img = _first_child_dir(cand, ("images", "imagesTs")) or cand
                val_lab = _first_child_dir(cand, ("labels", "labelsTs"))
                if not _holds_nifti(val_img):
                    val_img = val_lab = None
                break
        return cls(labelled[0], labelled[1], tuple(unlabelled) or None, val_img, val_lab)


def _match_dirs(root: Path, pattern: str) -> list[Path]:
    """Folders matching a '/'-separated, case-insensitive glob pattern below root (sorted)."""
    current = [root]
    for part in pattern.split("/"):
        if part == ".":
            continue
        nxt = []
        for d in current:
            try:
                children = sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
            except OSError:
                continue
            nxt.extend(c for c in children if fnmatch.fnmatch(c.name.lower(), part.lower()))
        current = nxt
    return current


def _holds_nifti(folder: Path) -> bool:
    return any(_strip_ext(f.name) is not None for f in folder.iterdir() if f.is_file())


def _first_child_dir(folder: Path, names: Sequence[str]) -> Path | None:
    try:
        children = {c.name.lower(): c for c in folder.iterdir() if c.is_dir()}
    except OSError:
        return None
    for n in names:
        if n.lower() in children:
            return children[n.lower()]
    return None


# ----------------------------------------------------------------------------- planning

def _strip_ext(name: str) -> str | None:
    low = name.lower()
    for ext in (".nii.gz", ".nii"):
        if low.endswith(ext):
            return name[: -len(ext)]
    return None


def _nifti_files(folder: Path, what: str) -> list[Path]:
    """NIfTI files directly in `folder` (hidden files and other files are ignored; a dangling
    symbolic link with a NIfTI name is a FlareInputError naming it, not a case left out)."""
    if not folder.is_dir():
        raise FlareInputError(folder, f"{what} folder is missing")
    files = list_nifti(folder, ignore_case=True)
    if not files:
        raise FlareInputError(folder, f"{what} folder holds no NIfTI files (.nii.gz or .nii)")
    return files


def _image_id(path: Path) -> str:
    stem = _strip_ext(path.name)
    if stem.endswith(CHANNEL_SUFFIX) and len(stem) > len(CHANNEL_SUFFIX):
        stem = stem[: -len(CHANNEL_SUFFIX)]
    return stem


def _label_id(path: Path) -> str:
    return _strip_ext(path.name)


def _safe_id(raw: str) -> str:
    if _VALID_ID.match(raw):
        return raw
    return re.sub(r"[^A-Za-z0-9_-]+", "_", raw).strip("_") or "case"


def _index(files: Iterable[Path], id_of: Callable[[Path], str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in files:
        cid = id_of(f)
        if cid in out:
            raise FlareInputError(f, f"duplicate case id {cid!r}: {out[cid].name} in the same folder "
                                     f"has the same id")
        out[cid] = f
    return out


@dataclass(frozen=True)
class _Case:
    case_id: str
    source_id: str
    split: str
    image: Path
    label: Path | None

    def dest_image(self) -> str:
        return f"{SPLIT_FOLDERS[self.split][0]}/{self.case_id}{CHANNEL_SUFFIX}{FILE_ENDING}"

    def dest_label(self) -> str | None:
        if self.label is None:
            return None
        return f"{SPLIT_FOLDERS[self.split][1]}/{self.case_id}{FILE_ENDING}"


def _pair(images_dir: Path, labels_dir: Path, split: str, labels_required: bool) -> list[tuple[str, Path, Path | None]]:
    images = _index(_nifti_files(images_dir, f"{split} images"), _image_id)
    labs = _index(_nifti_files(labels_dir, f"{split} labels"), _label_id) if labels_required else {}
    out = []
    for cid, img in images.items():
        lab = labs.get(cid)
        if labels_required and lab is None:
            raise FlareInputError(img, f"no label found for this image: expected {labels_dir / (cid + FILE_ENDING)}")
        out.append((cid, img, lab))
    for cid, lab in labs.items():
        if cid not in images:
            raise FlareInputError(lab, "no image found for this label: expected "
                                       f"{images_dir / (cid + CHANNEL_SUFFIX + FILE_ENDING)}")
    return out


def _plan(layout: Flare22Layout) -> list[_Case]:
    raw: list[tuple[str, Path, Path | None, str]] = []
    for cid, img, lab in _pair(layout.labelled_images, layout.labelled_labels, "train", True):
        raw.append((cid, img, lab, "train"))
    if layout.validation_images is not None:
        if layout.validation_labels is not None:
            pairs = _pair(layout.validation_images, layout.validation_labels, "test", True)
        else:
            pairs = [(cid, img, None) for cid, img in
                     _index(_nifti_files(layout.validation_images, "validation images"), _image_id).items()]
        raw.extend((cid, img, lab, "test") for cid, img, lab in pairs)
    for d in layout.unlabelled_dirs:
        for cid, img in _index(_nifti_files(d, "unlabelled images"), _image_id).items():
            raw.append((cid, img, None, "unlabelled"))

    cases: list[_Case] = []
    seen: dict[str, Path] = {}
    for cid, img, lab, split in raw:
        safe = _safe_id(cid)
        if safe in seen:
            raise FlareInputError(img, f"duplicate case id {safe!r}: already used by {seen[safe]}")
        seen[safe] = img
        cases.append(_Case(safe, cid, split, img, lab))
    return cases


def _fingerprint(cases: Sequence[_Case], target_name: str) -> str:
    """Hash of what the dataset is built from: ids, splits, source paths, sizes, mtimes."""
    rows = []
    for c in cases:
        row = [c.split, c.case_id]
        for p in (c.image, c.label):
            if p is None:
                row.append(None)
            else:
                st = p.stat()
                row.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
        rows.append(row)
    blob = json.dumps({"target": target_name, "cases": rows}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


# ----------------------------------------------------------------------------- per-case work


def _place_image(src: Path, dst: Path, img: nib.Nifti1Image, link: str) -> str:
    if not src.name.lower().endswith(".nii.gz") or len(img.shape) != 3:
        data = np.asanyarray(img.dataobj)
        save_nifti_like(data.reshape(data.shape[:3]), img, dst)
        return "reencoded"
    if link == "symlink":
        os.symlink(src.resolve(), dst)
        return "symlink"
    if link == "hardlink":
        try:
            os.link(src, dst)
            return "hardlink"
        except OSError:
            pass  # other file system or links not allowed: fall back to a copy
    shutil.copyfile(src, dst)
    return "copy"


def _convert_case(args) -> dict:
    case, tmp, link = args
    tmp = Path(tmp)
    img = load_nifti(case.image)
    data = np.asanyarray(img.dataobj)
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise FlareInputError(case.image, "image holds NaN or infinite values")
    geom = Geometry.of(img)
    labels_present = None
    if case.label is not None:
        lab, lgeom = read_label_map(case.label, valid_labels=set(VALID_LABELS))
        problem = geom.mismatch(lgeom)
        if problem:
            raise FlareInputError(case.label, f"label does not match its image {case.image}: {problem}")
        lab = lab.reshape(lab.shape[:3]).astype(np.uint8, copy=False)
        save_nifti_like(lab, img, tmp / case.dest_label())
        labels_present = [int(v) for v in np.flatnonzero(np.bincount(lab.ravel(), minlength=1))]
    mode = _place_image(case.image, tmp / case.dest_image(), img, link)
    return {
        "case_id": case.case_id,
        "split": case.split,
        "image": case.dest_image(),
        "label": case.dest_label(),
        "source_id": case.source_id,
        "source_image": str(case.image.resolve()),
        "source_label": None if case.label is None else str(case.label.resolve()),
        "image_mode": mode,
        "shape": list(geom.shape),
        "spacing": [round(s, 6) for s in geom.spacing],
        "dtype": str(data.dtype),
        "labels_present": labels_present,
    }


# ----------------------------------------------------------------------------- conversion

@dataclass
class ConvertResult:
    dataset_dir: Path
    dataset_json: dict
    manifest: dict
    reused: bool = False

    @property
    def dataset_name(self) -> str:
        return self.dataset_dir.name

    def case_ids(self, split: str | None = None) -> list[str]:
        return [c["case_id"] for c in self.manifest["cases"] if split is None or c["split"] == split]

    @property
    def num_training(self) -> int:
        return len(self.case_ids("train"))

    @property
    def num_test(self) -> int:
        return len(self.case_ids("test"))

    @property
    def num_unlabelled(self) -> int:
        return len(self.case_ids("unlabelled"))

    def __str__(self) -> str:
        return (f"{self.dataset_dir} ({self.num_training} training, {self.num_test} test, "
                f"{self.num_unlabelled} unlabelled cases{'; reused, inputs unchanged' if self.reused else ''})")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _is_complete(target: Path, manifest: dict) -> bool:
    if not (target / "dataset.json").is_file():
        return False
    for c in manifest.get("cases", []):
        for key in ("image", "label"):
            if c.get(key) and not (target / c[key]).exists():
                return False
    return True


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _check_apart(layout_or_root, layout: Flare22Layout, raw_root: Path) -> None:
    """The raw root must not lie inside the FLARE22 source (its root, or each source folder of an
    explicit layout) nor hold it: the sources are only read, never written or moved."""
    if isinstance(layout_or_root, Flare22Layout):
        sources = [d for d in [layout.labelled_images, layout.labelled_labels, *layout.unlabelled_dirs,
                               layout.validation_images, layout.validation_labels] if d is not None]
    else:
        sources = [Path(layout_or_root)]
    raw = raw_root.resolve()
    for src in sources:
        s = src.resolve()
        if raw == s or s in raw.parents:
            raise FlareInputError(raw_root, f"the nnU-Net raw root lies inside the FLARE22 source {src}, or is "
                                            "it: the sources are never modified; choose a raw root elsewhere")
        if raw in s.parents:
            raise FlareInputError(raw_root, f"the FLARE22 source {src} lies inside this nnU-Net raw root: the "
                                            "sources are never modified; choose a raw root elsewhere")


def convert_flare22(layout_or_root: Flare22Layout | str | Path, raw_root: str | Path, dataset_id: int,
                    dataset_name: str = "FLARE22", *, overwrite: bool = False, link: str = "copy",
                    processes: int = 1) -> ConvertResult:
    """Build `raw_root/DatasetNNN_<dataset_name>` from FLARE22 folders (see the module docstring).

    Every input problem raises FlareInputError naming the file; nothing is written then.
    """
    layout = layout_or_root if isinstance(layout_or_root, Flare22Layout) else Flare22Layout.discover(layout_or_root)
    _check_apart(layout_or_root, layout, Path(raw_root))
    if link not in LINK_MODES:
        raise FlareInputError(None, f"link={link!r} is not one of {LINK_MODES}")
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, (int, np.integer)) or not 1 <= int(dataset_id) <= 999:
        raise FlareInputError(None, f"dataset_id={dataset_id!r} must be an integer in 1..999")
    if not _VALID_DATASET_NAME.match(dataset_name):
        raise FlareInputError(None, f"dataset_name={dataset_name!r} may hold only letters, digits, '_' and '-'")
    processes = max(1, int(processes))
    raw_root = Path(raw_root)
    target = raw_root / f"Dataset{int(dataset_id):03d}_{dataset_name}"

    if raw_root.is_dir():
        clash = [p.name for p in raw_root.glob(f"Dataset{int(dataset_id):03d}_*")
                 if p.is_dir() and p.name != target.name]
        if clash:
            raise FlareInputError(raw_root, f"already holds {', '.join(sorted(clash))} with the same dataset id "
                                            f"{int(dataset_id)}; nnU-Net needs unique ids")

    cases = _plan(layout)
    resolved_target = target.resolve()
    for d in [layout.labelled_images, layout.labelled_labels, *layout.unlabelled_dirs,
              layout.validation_images, layout.validation_labels]:
        if d is not None and (resolved_target == d.resolve() or resolved_target in d.resolve().parents):
            raise FlareInputError(d, f"source folder lies inside the target {target}")
    fingerprint = _fingerprint(cases, target.name)

    if target.exists() and not overwrite:
        manifest = _read_json(target / MANIFEST_NAME)
        if manifest and manifest.get("inputs_fingerprint") == fingerprint and _is_complete(target, manifest):
            return ConvertResult(target, _read_json(target / "dataset.json") or {}, manifest, reused=True)
        if not manifest:
            why = "is not a dataset made by flare_utils.data.convert"
        elif manifest.get("inputs_fingerprint") == fingerprint:
            why = "is incomplete (files listed in its manifest.json are missing)"
        else:
            why = "was built from different inputs"
        raise FlareInputError(target, f"already exists and {why}; pass overwrite=True (command line: "
                                      f"--overwrite) to replace it or choose another dataset id")

    created_root = not raw_root.exists()
    n_train = sum(c.split == "train" for c in cases)
    n_test = sum(c.split == "test" for c in cases)
    n_unl = sum(c.split == "unlabelled" for c in cases)
    try:
        with atomic_directory(target, overwrite=True) as tmp:
            for split, (img_dir, lab_dir) in SPLIT_FOLDERS.items():
                if split == "train" or any(c.split == split for c in cases):
                    (tmp / img_dir).mkdir()
                if lab_dir and any(c.split == split and c.label is not None for c in cases):
                    (tmp / lab_dir).mkdir()
            if n_test == 0:
                (tmp / "imagesTs").mkdir(exist_ok=True)  # nnU-Net tools expect the folder
            records = map_processes(_convert_case, [(c, str(tmp), link) for c in cases], processes)
            dataset_json = {
                "name": dataset_name,
                "description": ("FLARE22 abdominal organ CT segmentation (13 organs), converted by "
                                "flare_utils.data.convert. imagesTs holds the validation/tuning cases "
                                "(labelsTs their labels when given); imagesUnlabelled holds the unlabelled "
                                "cases for pseudo labelling and is not read by nnU-Net itself."),
                "reference": "https://flare22.grand-challenge.org/",
                "channel_names": {"0": "CT"},
                "labels": _labels.dataset_json_labels(),
                "numTraining": n_train,
                "numTest": n_test,
                "numUnlabelled": n_unl,
                "file_ending": FILE_ENDING,
                "unlabelled_folder": "imagesUnlabelled",
            }
            manifest = {
                "format": MANIFEST_FORMAT,
                "flare_utils_version": __version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "dataset": target.name,
                "dataset_id": int(dataset_id),
                "dataset_name": dataset_name,
                "link": link,
                "layout": layout.to_dict(),
                "inputs_fingerprint": fingerprint,
                "renamed": {c.source_id: c.case_id for c in cases if c.source_id != c.case_id},
                "unlabelled": [c.case_id for c in cases if c.split == "unlabelled"],
                "cases": records,
            }
            _write_json(tmp / "dataset.json", dataset_json)
            _write_json(tmp / MANIFEST_NAME, manifest)
    except BaseException:
        if created_root:
            try:
                raw_root.rmdir()
            except OSError:
                pass
        raise
    return ConvertResult(target, dataset_json, manifest, reused=False)


def verify_with_nnunet(dataset_dir: str | Path, processes: int = 1) -> None:
    """Run nnU-Net v2's own `verify_dataset_integrity` on a raw dataset folder.

    Raises FlareInputError naming the folder when the check fails (nnU-Net prints the details).
    nnU-Net reads nnUNet_raw/_preprocessed/_results when first imported: set them beforehand
    (e.g. `flare_utils.layout`) to avoid its warning; the check itself only uses `dataset_dir`.
    """
    from nnunetv2.experiment_planning.verify_dataset_integrity import (
        verify_dataset_integrity,
    )

    try:
        verify_dataset_integrity(str(dataset_dir), num_processes=max(1, int(processes)))
    except (AssertionError, RuntimeError, FileNotFoundError) as e:
        raise FlareInputError(dataset_dir, f"nnU-Net's dataset integrity check failed: {e}") from e


# ----------------------------------------------------------------------------- summary

def _dataset_cases(dataset_dir: Path) -> list[dict]:
    manifest = _read_json(dataset_dir / MANIFEST_NAME)
    if manifest and "cases" in manifest:
        return [{"case_id": c["case_id"], "split": c["split"], "image": c["image"], "label": c.get("label")}
                for c in manifest["cases"]]
    cases = []
    for split, (img_dir, lab_dir) in SPLIT_FOLDERS.items():
        d = dataset_dir / img_dir
        if not d.is_dir():
            continue
        for p in sorted(d.glob(f"*{CHANNEL_SUFFIX}{FILE_ENDING}")):
            cid = p.name[: -len(CHANNEL_SUFFIX + FILE_ENDING)]
            lab = f"{lab_dir}/{cid}{FILE_ENDING}" if lab_dir else None
            if lab and not (dataset_dir / lab).is_file():
                lab = None
            cases.append({"case_id": cid, "split": split, "image": f"{img_dir}/{p.name}", "label": lab})
    return cases


def _summarise_case(args) -> dict:
    dataset_dir, case = args
    dataset_dir = Path(dataset_dir)
    img_path = dataset_dir / case["image"]
    try:
        img = nib.load(str(img_path))
    except Exception as e:  # noqa: BLE001 - every read failure becomes a named-file error
        raise FlareInputError(img_path, f"unreadable NIfTI ({type(e).__name__}: {e})") from e
    row: dict[str, Any] = {
        "case": case["case_id"],
        "split": case["split"],
        "shape": tuple(int(s) for s in img.shape[:3]),
        "spacing": tuple(round(float(z), 6) for z in img.header.get_zooms()[:3]),
    }
    names = [o.name for o in _labels.ORGANS]
    if case.get("label"):
        lab, geom = read_label_map(dataset_dir / case["label"])
        counts = np.bincount(lab.ravel().astype(np.int64), minlength=_labels.NUM_CLASSES)
        voxel_ml = float(np.prod(geom.spacing)) / 1000.0
        for o in _labels.ORGANS:
            row[o.name] = float(counts[o.label]) * voxel_ml
    else:
        row.update({n: float("nan") for n in names})
    return row


def dataset_summary(dataset_dir: str | Path, processes: int = 1):
    """One row per case: case, split, shape, spacing and, for labelled cases, each organ's volume
    in ml (columns named by `labels.ORGANS[*].name`; NaN for cases without a label)."""
    import pandas as pd

    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FlareInputError(dataset_dir, "dataset folder is missing")
    cases = _dataset_cases(dataset_dir)
    rows = map_processes(_summarise_case, [(str(dataset_dir), c) for c in cases], max(1, int(processes)))
    columns = ["case", "split", "shape", "spacing", *[o.name for o in _labels.ORGANS]]
    return pd.DataFrame(rows, columns=columns)



def write_summary(df, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `summary.csv` (shape/spacing as 'AxBxC') and `summary.json` (records, lists, null for
    NaN) into out_dir, each atomically. Returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = df.copy()
    for col in ("shape", "spacing"):
        if col in flat:
            flat[col] = flat[col].map(lambda v: "x".join(f"{x:g}" for x in v) if isinstance(v, (tuple, list)) else v)
    csv_path, json_path = out_dir / "summary.csv", out_dir / "summary.json"
    atomic_write_text(csv_path, flat.to_csv(index=False))
    records = []
    for rec in df.to_dict(orient="records"):
        clean = {}
        for k, v in rec.items():
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, (float, np.floating)) and not np.isfinite(v):
                v = None
            elif isinstance(v, np.generic):
                v = v.item()
            clean[k] = v
        records.append(clean)
    atomic_write_text(json_path, json.dumps(records, indent=1) + "\n")
    return csv_path, json_path
