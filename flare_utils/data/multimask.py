"""A folder of one binary mask per structure (e.g. TotalSegmentator output) -> one FLARE22 label map.

`convert_mask_folder(mask_dir, out_path)` (or `masks_to_label_map`) names each mask's organ from
its file name (FLARE, TotalSegmentator, BTCV/AMOS spellings; other structures are ignored),
combines several raters of one structure (`raters=`, majority by default), requires 0/1 masks
(`threshold=` for others) on one shared geometry, and resolves voxels claimed by several organs
(`overlap=`, the smallest organ wins by default). The `MultiMaskReport` says what was ignored and
which voxels moved between organs. One boolean array per used organ is held in memory at once.

Details: docs/reference/data_conversion.md
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from flare_utils.data import labels as _labels
from flare_utils.errors import FlareInputError
from flare_utils.data.io import (Geometry, check_nifti_name, check_output_outside, check_overwrite, list_nifti,
                                 read_array, save_nifti_like)

__all__ = ["masks_to_label_map", "convert_mask_folder", "MultiMaskReport", "RATER_PATTERN",
           "OVERLAP_RULES", "RATER_RULES", "parse_structure_name"]

OVERLAP_RULES = ("smallest_wins", "label_order", "error")
RATER_RULES = ("majority", "union", "intersection")
RATER_PATTERN = re.compile(
    r"^(?P<base>.+?)(?:_?(?:rater|reader|annotator|vis)_?|_r)(?P<rater>\d+)$")


def parse_structure_name(file_name: str) -> tuple[str, int | None]:
    """('structure', rater number or None) of a mask file name, after normalize_name."""
    norm = _labels.normalize_name(file_name)
    m = RATER_PATTERN.match(norm)
    if m:
        return m.group("base").strip("_"), int(m.group("rater"))
    return norm, None


@dataclass
class MultiMaskReport:
    mask_dir: Path
    overlap_rule: str
    raters_rule: str | int
    threshold: float | None
    shape: tuple[int, ...] = ()
    reference: str = ""                                             # mask file giving the grid
    files: dict[str, list[str]] = field(default_factory=dict)      # organ -> mask files used
    raters: dict[str, list[int]] = field(default_factory=dict)     # organ -> rater numbers found
    ignored: list[str] = field(default_factory=list)               # non-FLARE structure names
    ignored_files: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)               # FLARE organs without a mask
    empty: list[str] = field(default_factory=list)                 # organs whose mask is empty
    mask_voxels: dict[str, int] = field(default_factory=dict)      # organ -> voxels in its mask
    label_voxels: dict[str, int] = field(default_factory=dict)     # organ -> voxels in the map
    overlaps: dict[tuple[str, str], int] = field(default_factory=dict)  # organ pair -> shared voxels
    moved: dict[tuple[str, str], int] = field(default_factory=dict)     # (loser, winner) -> voxels

    def lost(self, organ: str) -> int:
        """Voxels of `organ`'s mask that the overlap rule gave to other organs."""
        return sum(v for (loser, _), v in self.moved.items() if loser == organ)

    def __str__(self) -> str:
        lines = [f"{len(self.files)} FLARE22 organs from {self.mask_dir} (overlap={self.overlap_rule}, "
                 f"raters={self.raters_rule}, threshold={self.threshold})"]
        lines += [f"  {o}: {self.mask_voxels[o]} mask voxels -> {self.label_voxels[o]} in the map"
                  for o in self.mask_voxels]
        if self.overlaps:
            lines.append("  overlaps: " + ", ".join(f"{a}/{b} {v}" for (a, b), v in self.overlaps.items()))
        if self.moved:
            lines.append("  moved: " + ", ".join(f"{a}->{b} {v}" for (a, b), v in self.moved.items()))
        for title, items in (("ignored", self.ignored), ("missing", self.missing), ("empty", self.empty)):
            if items:
                lines.append(f"  {title}: {', '.join(items)}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mask_dir": str(self.mask_dir),
            "overlap_rule": self.overlap_rule,
            "raters_rule": self.raters_rule,
            "threshold": self.threshold,
            "shape": list(self.shape),
            "reference": self.reference,
            "files": self.files,
            "raters": self.raters,
            "ignored": self.ignored,
            "ignored_files": self.ignored_files,
            "missing": self.missing,
            "empty": self.empty,
            "mask_voxels": self.mask_voxels,
            "label_voxels": self.label_voxels,
            "overlaps": [{"a": a, "b": b, "voxels": v} for (a, b), v in self.overlaps.items()],
            "moved": [{"from": a, "to": b, "voxels": v} for (a, b), v in self.moved.items()],
        }


def _mask_files(mask_dir: Path) -> list[Path]:
    if not mask_dir.is_dir():
        raise FlareInputError(mask_dir, "mask folder is missing or not a folder")
    files = list_nifti(mask_dir, ignore_case=True)
    if not files:
        raise FlareInputError(mask_dir, "mask folder holds no NIfTI files (.nii.gz or .nii)")
    return files


def _binarize(path: Path, data: np.ndarray, threshold: float | None) -> np.ndarray:
    if data.dtype == bool:
        return data
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise FlareInputError(path, "mask holds NaN or infinite values")
    if threshold is not None:
        return data >= threshold
    on = data == 1
    if not np.all(on | (data == 0)):
        bad = np.unique(data[~(on | (data == 0))])
        shown = ", ".join(f"{v:g}" for v in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise FlareInputError(path, f"mask is not binary: holds values {shown} besides 0 and 1 "
                                    "(pass threshold=, on the command line --threshold, to binarise a soft or 0/255 mask)")
    return on


def _check_options(overlap, raters, threshold):
    if overlap not in OVERLAP_RULES:
        raise FlareInputError(None, f"overlap={overlap!r} is not one of {OVERLAP_RULES}")
    if isinstance(raters, bool) or not (raters in RATER_RULES or (isinstance(raters, (int, np.integer)) and raters >= 0)):
        raise FlareInputError(None, f"raters={raters!r} (--raters) must be one of {RATER_RULES} or a rater number")
    if threshold is not None and not np.isfinite(float(threshold)):
        raise FlareInputError(None, f"threshold={threshold!r} must be a finite number")


def masks_to_label_map(mask_dir: str | Path, *, overlap: str = "smallest_wins", raters: str | int = "majority",
                       threshold: float | None = None) -> tuple[np.ndarray, Geometry, MultiMaskReport]:
    """Combine a folder of per-structure masks into one uint8 FLARE22 label map (module docstring)."""
    _check_options(overlap, raters, threshold)
    mask_dir = Path(mask_dir)
    report = MultiMaskReport(mask_dir, overlap, raters if isinstance(raters, str) else int(raters),
                             None if threshold is None else float(threshold))

    # group files by organ: organ label -> {"plain": [paths], "raters": {n: path}}
    groups: dict[int, dict[str, Any]] = {}
    for path in _mask_files(mask_dir):
        base, rater = parse_structure_name(path.name)
        lab = _labels.label_for(base)
        if lab is None and rater is not None:
            # a structure whose own name ends like a rater suffix (e.g. 'x_r1') but is a FLARE name
            lab_full = _labels.label_for(path.name)
            if lab_full is not None:
                lab, rater = lab_full, None
        if lab is None:
            if base not in report.ignored:
                report.ignored.append(base)
            report.ignored_files.append(path.name)
            continue
        g = groups.setdefault(lab, {"plain": [], "raters": {}})
        if rater is None:
            if g["plain"]:
                raise FlareInputError(path, f"{_labels.LABELS[lab].name} is already given by {g['plain'][0].name}")
            g["plain"].append(path)
        else:
            if rater in g["raters"]:
                raise FlareInputError(path, f"rater {rater} of {_labels.LABELS[lab].name} is already given by "
                                            f"{g['raters'][rater].name}")
            g["raters"][rater] = path
        if g["plain"] and g["raters"]:
            others = [p.name for p in g["raters"].values()]
            raise FlareInputError(path, f"{_labels.LABELS[lab].name} is given both without a rater suffix "
                                        f"({g['plain'][0].name}) and per rater ({', '.join(others)})")
    if not groups:
        raise FlareInputError(mask_dir, "no mask in this folder is a FLARE22 organ "
                                        f"(found: {', '.join(report.ignored)})")

    ref_geom: Geometry | None = None
    ref_path: Path | None = None
    masks: dict[int, np.ndarray] = {}

    def load(path: Path) -> np.ndarray:
        nonlocal ref_geom, ref_path
        data, geom = read_array(path)
        if ref_geom is None:
            ref_geom, ref_path = geom, path
        else:
            problem = ref_geom.mismatch(geom)
            if problem:
                raise FlareInputError(path, f"mask geometry differs from {ref_path.name}: {problem}")
        return _binarize(path, np.asarray(data), threshold)

    for lab in sorted(groups):
        g = groups[lab]
        name = _labels.LABELS[lab].name
        if g["plain"]:
            masks[lab] = load(g["plain"][0])
            report.files[name] = [g["plain"][0].name]
            continue
        rater_paths = dict(sorted(g["raters"].items()))
        report.raters[name] = list(rater_paths)
        if not isinstance(raters, str):
            if int(raters) not in rater_paths:
                raise FlareInputError(mask_dir, f"raters={int(raters)}: {name} has no rater {int(raters)} "
                                                f"(files: {', '.join(p.name for p in rater_paths.values())})")
            masks[lab] = load(rater_paths[int(raters)])
            report.files[name] = [rater_paths[int(raters)].name]
            continue
        count = None
        for p in rater_paths.values():
            m = load(p)
            count = m.astype(np.uint16) if count is None else count + m
        n = len(rater_paths)
        if raters == "majority":
            masks[lab] = 2 * count > n
        elif raters == "union":
            masks[lab] = count > 0
        else:
            masks[lab] = count == n
        report.files[name] = [p.name for p in rater_paths.values()]

    assert ref_geom is not None
    report.shape = ref_geom.shape
    report.ignored.sort()
    report.ignored_files.sort()
    report.reference = ref_path.name
    shape = ref_geom.shape
    order = sorted(masks)
    names = {lab: _labels.LABELS[lab].name for lab in order}
    sizes = {lab: int(np.count_nonzero(masks[lab])) for lab in order}
    report.mask_voxels = {names[lab]: sizes[lab] for lab in order}
    report.missing = [o.name for o in _labels.ORGANS if o.label not in masks]
    report.empty = [names[lab] for lab in order if sizes[lab] == 0]

    # voxels claimed by two or more organs
    claims = np.zeros(shape, np.uint8)
    for lab in order:
        claims += masks[lab]
    shared = np.flatnonzero(claims.ravel() >= 2)
    del claims
    if shared.size:
        member = np.stack([masks[lab].ravel()[shared] for lab in order])  # organs x shared voxels
        pair_counts = member.astype(np.int64) @ member.T.astype(np.int64)
        for a in range(len(order)):
            for b in range(a + 1, len(order)):
                if pair_counts[a, b]:
                    report.overlaps[(names[order[a]], names[order[b]])] = int(pair_counts[a, b])
    if report.overlaps and overlap == "error":
        pairs = ", ".join(f"{a}/{b}: {v}" for (a, b), v in report.overlaps.items())
        raise FlareInputError(mask_dir, f"masks overlap (voxels per pair: {pairs}) and overlap='error'")

    # paint from the lowest to the highest priority; later organs overwrite earlier ones
    if overlap == "smallest_wins":
        paint = sorted(order, key=lambda lab: (-sizes[lab], lab))
    else:
        paint = order
    out = np.zeros(shape, np.uint8)
    for lab in paint:
        out[masks[lab]] = lab
    counts = np.bincount(out.ravel(), minlength=_labels.NUM_CLASSES)
    report.label_voxels = {names[lab]: int(counts[lab]) for lab in order}
    if shared.size:
        final = out.ravel()[shared]
        for i, lab in enumerate(order):
            winners = final[member[i] & (final != lab)]
            for w, v in zip(*np.unique(winners, return_counts=True)):
                report.moved[(names[lab], names[int(w)])] = int(v)
    return out, ref_geom, report


def convert_mask_folder(mask_dir: str | Path, out_path: str | Path, *, overwrite: bool = False,
                        **kw) -> MultiMaskReport:
    """masks_to_label_map, then write the map atomically (uint8, on the masks' grid and header).

    `out_path` must be a NIfTI name outside the mask folder (the masks are never written to); an
    existing `out_path` is replaced only with `overwrite`. Checked before any mask is read.
    """
    check_nifti_name(out_path)
    check_output_outside(out_path, mask_dir, "the mask folder")
    check_overwrite(out_path, overwrite)
    label_map, geom, report = masks_to_label_map(mask_dir, **kw)
    ref = nib.load(str(Path(mask_dir) / report.reference))
    save_nifti_like(label_map, ref, out_path)
    return report
