"""Where a run keeps things, and nnU-Net's three folders for it.

nnU-Net v2 (2.8) keeps lazy path objects in `nnunetv2.paths` that read nnUNet_raw /
nnUNet_preprocessed / nnUNet_results from the environment at every use, so setting the
environment is all it takes, before or after nnunetv2 is imported. (Older nnU-Net releases read
them once at import: there, call `use_nnunet_folders` before importing nnunetv2.)
"""
from __future__ import annotations

import contextlib
import os
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
    """Point nnU-Net at this run's folders (through the environment) and create them."""
    env = nnunet_env(run_dir)
    for k, v in env.items():
        os.environ[k] = v
        Path(v).mkdir(parents=True, exist_ok=True)
    return RunLayout(Path(run_dir).resolve())


def _apply_environment(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def environment(**values: str | None):
    """Set (or, for None, unset) environment variables for a block and restore them afterwards:
    nnU-Net and the FLARE trainers read their folders and configuration from the environment."""
    old = {k: os.environ.get(k) for k in values}
    try:
        _apply_environment(values)
        yield
    finally:
        _apply_environment(old)
