"""Where a run keeps everything, and the one place that points nnU-Net at a run's folders.

`RunLayout(run_dir)` names every folder and file a study writes (stages, reports, models, logs);
`RunLayout.activate()` points nnU-Net's three folders (nnUNet_raw / _preprocessed / _results) at
the run, and `nnunet_folders()` tells the rest of the package which folders are in force. Nothing
else in flare_utils reads or writes the nnUNet_* variables.

nnU-Net v2 2.8 reads those variables lazily (`nnunetv2.paths` holds `_EnvPath` objects read at
every use), so activating a run works before or after nnunetv2 is imported.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from flare_utils.errors import FlareInputError
from flare_utils.utilities.environment import environment

PROJECT_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
NNUNET_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
CONFIGURATION = "3d_fullres"


@dataclass(frozen=True)
class RunLayout:
    """Every output path of one run (`<run_dir>/...`): the single source of a run's file names."""
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).resolve())

    # nnU-Net's folders
    @property
    def nnunet_raw(self) -> Path: return self.root / "nnUNet_raw"
    @property
    def nnunet_preprocessed(self) -> Path: return self.root / "nnUNet_preprocessed"
    @property
    def nnunet_results(self) -> Path: return self.root / "nnUNet_results"

    def dataset_dir(self, dataset_id: int, name: str) -> Path:
        return self.nnunet_raw / f"Dataset{int(dataset_id):03d}_{name}"

    def raw_dataset(self, dataset_id: int) -> Path:
        """The run's raw dataset folder of `dataset_id` (whatever its name)."""
        found = sorted(self.nnunet_raw.glob(f"Dataset{int(dataset_id):03d}_*"))
        if not found:
            raise FlareInputError(self.nnunet_raw, f"no raw dataset {int(dataset_id):03d} in this run: run the "
                                                   "convert stage first (or give the run_dir of a converted run)")
        return found[0]

    # the study's own files
    @property
    def params_file(self) -> Path: return self.root / "params.yaml"
    @property
    def provenance_file(self) -> Path: return self.root / "provenance.json"
    @property
    def stages_file(self) -> Path: return self.root / "stages.json"
    @property
    def index_html(self) -> Path: return self.root / "index.html"
    @property
    def markers(self) -> Path: return self.root / ".flare_stages"
    @property
    def notebooks(self) -> Path: return self.root / "notebooks"
    @property
    def logs(self) -> Path: return self.root / "logs"
    @property
    def run_log(self) -> Path: return self.logs / "run.log"
    @property
    def progress_file(self) -> Path: return self.logs / "progress.jsonl"
    @property
    def models_file(self) -> Path: return self.root / "models.json"
    @property
    def models_dir(self) -> Path: return self.root / "models"

    # one folder per stage
    @property
    def synthetic_data(self) -> Path: return self.root / "synthetic_cohort"
    @property
    def synthetic_unlabelled_truth(self) -> Path:
        """Ground truth of the synthetic cohort's "unlabelled" cases (real data has none)."""
        return self.synthetic_data / "SyntheticTruth" / "unlabelled_labels"
    @property
    def conversion(self) -> Path: return self.root / "conversion"
    @property
    def teacher(self) -> Path: return self.root / "teacher"
    @property
    def pseudo_labels(self) -> Path: return self.root / "pseudo_labels"
    @property
    def pseudo_report(self) -> Path: return self.pseudo_labels / "report"

    def pseudo_round(self, k: int) -> Path:
        """`pseudo_labels/round_<k:02d>` (rounds are numbered from 1)."""
        if int(k) < 1:
            raise FlareInputError(None, f"rounds are numbered from 1, got {k}")
        return self.pseudo_labels / f"round_{int(k):02d}"

    @property
    def selection(self) -> Path: return self.root / "selection"
    @property
    def student_training(self) -> Path: return self.root / "student_training"

    def student(self, variant: str) -> Path:
        return self.student_training / variant

    @property
    def inference(self) -> Path: return self.root / "inference"
    @property
    def evaluation(self) -> Path: return self.root / "evaluation"

    def relative(self, path: str | Path) -> str:
        """`path` relative to the run folder, with forward slashes (links in the run's reports)."""
        return Path(path).resolve().relative_to(self.root).as_posix()

    def stored(self, path: str | Path) -> str:
        """How a run's files record a path: relative to the run when inside it (a copied or moved run
        folder keeps working), else absolute."""
        try:
            return self.relative(path)
        except ValueError:
            return str(Path(path).resolve())

    def resolve(self, stored: str | Path) -> Path:
        """The path a run's file recorded (`stored`), as it is now."""
        return self.root / stored

    # pointing nnU-Net at the run
    def nnunet_environment(self) -> dict[str, str]:
        """The nnUNet_* variables for this run (for a child process's environment)."""
        return dict(zip(NNUNET_VARIABLES, map(str, (self.nnunet_raw, self.nnunet_preprocessed, self.nnunet_results))))

    def activate(self) -> "RunLayout":
        """Point nnU-Net at this run's folders for the rest of the process (and create them)."""
        env = self.nnunet_environment()
        for path in env.values():
            Path(path).mkdir(parents=True, exist_ok=True)
        os.environ.update(env)
        _refresh_nnunet_paths()
        return self

    @contextlib.contextmanager
    def activated(self) -> Iterator["RunLayout"]:
        """`activate()` for a block; the previous nnU-Net folders are restored afterwards."""
        with environment(**{k: os.environ.get(k) for k in NNUNET_VARIABLES}):
            yield self.activate()
        _refresh_nnunet_paths()


def _refresh_nnunet_paths() -> None:
    """Module attributes of `nnunetv2.paths` must stay lazy `_EnvPath` objects (code that replaced
    them by strings would pin a previous run's folders); older nnU-Net keeps plain strings."""
    p = sys.modules.get("nnunetv2.paths")
    if p is None:
        return
    env_path = getattr(p, "_EnvPath", None)
    for k in NNUNET_VARIABLES:
        cur = getattr(p, k, None)
        if env_path is not None and not isinstance(cur, env_path):
            setattr(p, k, env_path(k, f"{k} is not set."))
        elif env_path is None and os.environ.get(k):
            setattr(p, k, os.environ[k])


@dataclass(frozen=True)
class NnUNetFolders:
    """nnU-Net's three folders in force, and nnU-Net's names inside them."""
    raw: Path
    preprocessed: Path
    results: Path

    def dataset_name(self, dataset: int | str) -> str:
        """`DatasetNNN_Name` of a dataset id or name (nnU-Net's lookup in these folders)."""
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
        try:
            return str(maybe_convert_to_dataset_name(dataset))
        except RuntimeError as e:
            raise FlareInputError(self.raw, f"dataset {dataset!r} not found: {e}") from e

    def raw_dataset(self, dataset: int | str) -> Path:
        return self.raw / self.dataset_name(dataset)

    def preprocessed_dataset(self, dataset: int | str) -> Path:
        return self.preprocessed / self.dataset_name(dataset)

    def results_folder(self, dataset: int | str, plans_identifier: str, trainer: str = "FlareTeacherTrainer",
                       configuration: str = CONFIGURATION) -> Path:
        """`<results>/<dataset>/<trainer>__<plans>__<configuration>` (nnU-Net's naming)."""
        return self.results / self.dataset_name(dataset) / f"{trainer}__{plans_identifier}__{configuration}"


def nnunet_folders(run_dir: str | Path | None = None) -> NnUNetFolders:
    """nnU-Net's folders: `run_dir`'s (activating that run) or, for None, the ones in force."""
    if run_dir is not None:
        RunLayout(run_dir).activate()
    missing = [k for k in NNUNET_VARIABLES if not os.environ.get(k)]
    if missing:
        raise FlareInputError(None, f"{', '.join(missing)} not set: give run_dir, or call "
                                    "flare_utils.layout.RunLayout(run_dir).activate() first")
    return NnUNetFolders(*(Path(os.environ[k]) for k in NNUNET_VARIABLES))
