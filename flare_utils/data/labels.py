"""The FLARE22 organ table: label ids, names, NSD tolerances and structure-name aliases.

Everything that needs to know which organ a label value is (conversion, metrics, reports)
reads it from here, so the table exists exactly once.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Organ:
    label: int
    name: str            # canonical snake_case name, used in dataset.json and CSV columns
    title: str           # human-readable name for tables and plots
    nsd_tolerance_mm: float
    flare_key: str       # column prefix of the official FLARE22 evaluation CSV ("RK_DSC", ...)
    aliases: tuple[str, ...] = ()


# Order, ids and NSD tolerances follow the official FLARE22 evaluation (see DESIGN.md).
ORGANS: tuple[Organ, ...] = (
    Organ(1, "liver", "Liver", 5.0, "Liver", ("hepar",)),
    Organ(2, "right_kidney", "Right kidney", 3.0, "RK",
          ("kidney_right", "kidney_r", "r_kidney", "rkidney", "kidney_rt", "rt_kidney")),
    Organ(3, "spleen", "Spleen", 3.0, "Spleen", ("lien",)),
    Organ(4, "pancreas", "Pancreas", 5.0, "Pancreas", ()),
    Organ(5, "aorta", "Aorta", 2.0, "Aorta", ("abdominal_aorta", "aorta_abdominal")),
    Organ(6, "inferior_vena_cava", "Inferior vena cava", 2.0, "IVC",
          ("ivc", "postcava", "vena_cava_inferior", "inferior_vena_cava_ivc",
           "ivc_and_portal_splenic_vein_excluded")),
    Organ(7, "right_adrenal_gland", "Right adrenal gland", 2.0, "RAG",
          ("adrenal_gland_right", "right_adrenal", "adrenal_right", "r_adrenal_gland",
           "rag", "adrenal_gland_r", "right_suprarenal_gland", "suprarenal_gland_right")),
    Organ(8, "left_adrenal_gland", "Left adrenal gland", 2.0, "LAG",
          ("adrenal_gland_left", "left_adrenal", "adrenal_left", "l_adrenal_gland",
           "lag", "adrenal_gland_l", "left_suprarenal_gland", "suprarenal_gland_left")),
    Organ(9, "gallbladder", "Gallbladder", 2.0, "Gallbladder", ("gall_bladder", "gb", "cholecyst")),
    Organ(10, "esophagus", "Esophagus", 3.0, "Esophagus", ("oesophagus", "esophagus_abdominal")),
    Organ(11, "stomach", "Stomach", 5.0, "Stomach", ("gaster",)),
    Organ(12, "duodenum", "Duodenum", 7.0, "Duodenum", ()),
    Organ(13, "left_kidney", "Left kidney", 3.0, "LK",
          ("kidney_left", "kidney_l", "l_kidney", "lkidney", "kidney_lt", "lt_kidney")),
)

LABELS: dict[int, Organ] = {o.label: o for o in ORGANS}
BY_NAME: dict[str, Organ] = {o.name: o for o in ORGANS}
NUM_CLASSES = len(ORGANS) + 1  # with background
# Organs whose volumes the official evaluation cuts to the ground truth's z-range first.
Z_CUT_LABELS: tuple[int, ...] = (5, 6, 10)


def normalize_name(name: str) -> str:
    """Lower-case snake_case form of a structure name, without NIfTI/DICOM extensions.

    'Kidney Right.nii.gz' -> 'kidney_right'; 'Adrenal-Gland_L' -> 'adrenal_gland_l'.
    """
    base = name.strip()
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm"):
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
            break
    base = re.sub(r"[^0-9a-zA-Z]+", "_", base).strip("_").lower()
    return base


_ALIASES: dict[str, int] = {}
for _o in ORGANS:
    for _n in (_o.name, _o.title, _o.flare_key, *_o.aliases):
        _ALIASES[normalize_name(_n)] = _o.label


def label_for(name: str) -> int | None:
    """FLARE22 label of a structure name (TotalSegmentator, BTCV/AMOS or FLARE spelling), or None."""
    return _ALIASES.get(normalize_name(name))


def organ(label_or_name: int | str) -> Organ:
    """The Organ for a label id or any known alias; KeyError names what was asked."""
    if isinstance(label_or_name, int):
        if label_or_name not in LABELS:
            raise KeyError(f"{label_or_name} is not a FLARE22 label (valid: 1-{len(ORGANS)})")
        return LABELS[label_or_name]
    lab = label_for(label_or_name)
    if lab is None:
        raise KeyError(f"{label_or_name!r} is not a known FLARE22 organ name or alias")
    return LABELS[lab]


def dataset_json_labels() -> dict[str, int]:
    """The `labels` entry of an nnU-Net v2 dataset.json for the 13 FLARE22 organs."""
    return {"background": 0, **{o.name: o.label for o in ORGANS}}


def nsd_tolerances() -> dict[int, float]:
    return {o.label: o.nsd_tolerance_mm for o in ORGANS}
