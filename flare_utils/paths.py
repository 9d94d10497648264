"""Where a run keeps things, and nnU-Net's three folders for it.

nnU-Net v2 reads nnUNet_raw / nnUNet_preprocessed / nnUNet_results from the environment when
`nnunetv2.paths` is first imported, so `use_nnunet_folders` must run before that import.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"


@dataclass(frozen=True)
class RunLayout:
    """The folders of one run (`<run_dir>/...`)."""
    root: Path

    @property
    def nnunet_raw(self) -> Path: return self.root / "nnUNet_raw"
    @property
    def nnunet_preprocessed(self) -> Path: return self.root / "nnUNet_preprocessed"
    @property
    def nnunet_results(self) -> Path: return self.root / "nnUNet_results"
    @property
    def synthetic_data(self) -> Path: return self.root / "synthetic_cohort"
    @property
    def conversion(self) -> Path: return self.root / "conversion"
    @property
    def evaluation(self) -> Path: return self.root / "evaluation"
    @property
    def notebooks(self) -> Path: return self.root / "notebooks"

    def dataset_dir(self, dataset_id: int, name: str) -> Path:
        return self.nnunet_raw / f"Dataset{dataset_id:03d}_{name}"


def nnunet_env(run_dir: str | Path) -> dict[str, str]:
    layout = RunLayout(Path(run_dir).resolve())
    return {"nnUNet_raw": str(layout.nnunet_raw),
            "nnUNet_preprocessed": str(layout.nnunet_preprocessed),
            "nnUNet_results": str(layout.nnunet_results)}


def use_nnunet_folders(run_dir: str | Path) -> RunLayout:
    """Point nnU-Net at this run's folders (before nnunetv2 is imported) and create them."""
    env = nnunet_env(run_dir)
    if "nnunetv2.paths" in sys.modules:
        import nnunetv2.paths as p  # already imported: its module globals must follow too
        p.nnUNet_raw, p.nnUNet_preprocessed, p.nnUNet_results = (
            env["nnUNet_raw"], env["nnUNet_preprocessed"], env["nnUNet_results"])
    for k, v in env.items():
        os.environ[k] = v
        Path(v).mkdir(parents=True, exist_ok=True)
    return RunLayout(Path(run_dir).resolve())
