"""Typed, validated study parameters (the YAML files in params/).

A params file describes a whole run. Every section is a dataclass; loading rejects unknown keys
and wrong types with the key's full path, so a typo never silently falls back to a default. Then
the values are checked as a whole (`flare_utils.study.params_checks.check_params`: budgets, folds,
plan names, selection rules, what the listed stages need) and keys given twice are refused, so `flare-study run` and `status`
stop at once with every problem of the file, each naming its key and what is allowed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from flare_utils.distributed.cluster import ClusterParams
from flare_utils.errors import FlareInputError
from flare_utils.inference.defaults import DEFAULT_CENTRE_THRESHOLD, DEFAULT_INPLANE_STEP
from flare_utils.utilities.typed import from_dict


@dataclass
class PhantomParams:
    """Synthetic cohort (the embedded default dataset), see flare_utils.synthetic.phantom."""
    preset: str = "demo"
    n_labelled: int = 8
    n_unlabelled: int = 16
    n_validation: int = 4
    seed: int = 0
    # split -> field of view ("abdomen", "whole_body", ...) or weights of several
    # ({"abdomen": 0.6, "abdomen_pelvis": 0.4}); splits not named use the preset's mix
    fov_mix: dict[str, str | dict[str, float]] = field(default_factory=dict)


@dataclass
class DataParams:
    """Data conversion stage: where cases come from and which nnU-Net dataset they become."""
    source: Literal["phantom", "flare22"] = "phantom"
    flare22_root: str | None = None      # FLARE22 folder layout (source: flare22)
    phantom: PhantomParams = field(default_factory=PhantomParams)
    dataset_id: int = 501
    dataset_name: str = "FLARE22Synth"
    link: Literal["copy", "hardlink", "symlink"] = "copy"
    processes: int = 2
    preview_cases: int = 3               # cases drawn in the conversion notebook


@dataclass
class TeacherParams:
    """Teacher training stage (02): plan variants to build and the big teacher's training."""
    # planned + preprocessed: names of flare_utils.planning.plans.PLAN_VARIANTS, or mappings of PlanVariant
    # fields (a study's own variant: {name, base_features, patch_size_zyx, spacing_zyx, ...})
    plan_variants: list[str | dict[str, Any]] = field(default_factory=lambda: ["accurate_demo", "efficient_demo"])
    plans: str = "accurate_demo"         # the teacher's plan variant (flare_utils.planning.plans)
    trainer: str = "FlareTeacherTrainer"
    folds: list[int] | Literal["all"] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    epochs: int = 10
    iterations_per_epoch: int = 25
    val_iterations: int = 5
    loss: Literal["dice_ce", "dice", "ce"] = "dice_ce"
    init_checkpoint: str | None = None   # transfer learning: a pretrained nnU-Net checkpoint
    freeze_encoder_stages: int = 0
    splits: dict[str, Any] | None = None  # custom folds (flare_utils.training.splits.SplitSpec)
    batch_size: int | None = None
    num_threads: int | None = None
    n_proc_da: int | None = None
    final_validation: bool = True
    optimizer: Literal["sgd", "adamw"] = "sgd"   # adamw: nnU-Net's Adam recipe (learns fast; the CPU demo)
    initial_lr: float | None = None      # None: the optimizer's default (sgd 1e-2, adamw 3e-3)
    mirroring: bool | None = None        # None: the trainer's default (teacher: on)
    oversample_foreground: float | None = None   # share of patches forced onto foreground (nnU-Net: 0.33)
    num_gpus: int = 1                    # > 1: each fold trains on that many GPUs (nnU-Net's DDP; device cuda/auto)


@dataclass
class PseudoParams:
    """Pseudo-label rounds (03): the teacher labels every unlabelled scan, then K-1 retrainings
    on labelled + pseudo-labelled cases each label them again (the models keep the teacher's plans,
    optimizer and learning rate)."""
    rounds: int = 3                      # K (the selection stage needs K >= 2)
    tta: bool = False                    # mirroring at test time
    retrain_epochs: int = 10
    retrain_iterations: int = 25
    retrain_folds: list[int | str] = field(default_factory=lambda: ["all"])
    retrain_config: dict[str, Any] = field(default_factory=dict)   # more PseudoLabelConfig options
    num_threads: int | None = None
    max_cases: int | None = None         # only the first N unlabelled cases (None: all)
    # rounds 2..K start from the teacher's weights (first trained fold) instead of from scratch: a
    # short budget then refines the teacher rather than relearning it (the CPU demo's shortcut)
    retrain_from_teacher: bool = False
    num_gpus: int = 1                    # GPUs per retraining of rounds 2..K (nnU-Net's DDP when > 1)


@dataclass
class SelectionParams:
    """Stability-based selection (04): keep the cases whose labels moved least over the rounds."""
    threshold: float | None = 0.1        # keep u < threshold (the paper's 0.1) ...
    fraction: float | None = None        # ... or the most stable fraction (threshold: null)
    labels_round: int = -1               # whose labels the student learns from (-1: the last round)
    exclude_empty: bool = False


STUDENT_VARIANTS = ("labelled_only", "selected", "all")


@dataclass
class StudentParams:
    """Student training stage (05): small network on labelled + selected pseudo-labelled cases."""
    plans: str = "efficient_demo"
    recipe: Literal["plain", "noisy_student", "cps"] = "plain"
    selection_file: str | None = None    # None: the selection stage's file when that stage runs
    folds: list[int] | Literal["all"] = field(default_factory=lambda: [0])
    epochs: int = 10
    iterations_per_epoch: int = 25
    val_iterations: int = 5
    pseudo_share: float | None = None    # None: the recipe's default (0.5; noisy student 0.75)
    finetune_epochs: int = 0             # noisy student: labelled-only fine-tune
    batch_size: int | None = None
    cps_rampup_epochs: int = 20
    cps_lambda_max: float = 0.5
    num_threads: int | None = None
    n_proc_da: int | None = None
    final_validation: bool = True
    optimizer: Literal["sgd", "adamw"] = "sgd"
    initial_lr: float | None = None
    oversample_foreground: float | None = None
    num_gpus: int = 1                    # GPUs per student fold (nnU-Net's DDP when > 1; not with recipe cps)
    # students trained for the comparison: on the labelled cases only, + the selected pseudo-labelled
    # cases, + every pseudo-labelled case (the last two need the selection stage); the first one
    # listed is the study's student (the model the inference stage showcases)
    variants: list[Literal["labelled_only", "selected", "all"]] = field(default_factory=lambda: ["selected"])


@dataclass
class InferenceParams:
    """Efficient inference (06) of the study's models on the held-out cases."""
    models: list[str] | Literal["all"] = "all"   # names in the run's models.json, or every trained model
    input_dir: str | None = None         # None: the dataset's imagesTs (held-out cases)
    mode: Literal["efficient", "full"] = "efficient"
    tta: bool = False
    centre_threshold: int = DEFAULT_CENTRE_THRESHOLD
    # efficient mode: in-plane spacing of the 3x3 grid in patches (0.5 = the paper's 50% overlap; 0.33
    # puts every voxel nearer a window centre at the same window count, see docs/benchmarks.md)
    inplane_step: float = DEFAULT_INPLANE_STEP


@dataclass
class EvaluationParams:
    """Evaluation stage: which prediction folders to score against which ground truth. In a study
    the inference stage's predictions are scored automatically; these sets come on top."""
    prediction_sets: dict[str, str] = field(default_factory=dict)
    ground_truth_dir: str | None = None  # None: the dataset's labelsTs
    image_dir: str | None = None         # images for the overlay pictures (None: the dataset's imagesTs)
    timing_files: dict[str, str] = field(default_factory=dict)
    revision: Literal["2022", "2024"] = "2022"
    hd95: bool = False
    processes: int = 2


@dataclass
class StudyParams:
    """A whole run: global settings plus one section per stage."""
    name: str = "study"
    run_dir: str = "runs/study"          # relative paths are relative to the working directory
    seed: int = 0
    device: Literal["cpu", "cuda", "mps", "auto"] = "auto"
    stages: list[str] = field(default_factory=lambda: ["convert"])
    data: DataParams = field(default_factory=DataParams)
    teacher: TeacherParams = field(default_factory=TeacherParams)
    pseudo: PseudoParams = field(default_factory=PseudoParams)
    selection: SelectionParams = field(default_factory=SelectionParams)
    student: StudentParams = field(default_factory=StudentParams)
    inference: InferenceParams = field(default_factory=InferenceParams)
    evaluation: EvaluationParams = field(default_factory=EvaluationParams)
    cluster: ClusterParams = field(default_factory=ClusterParams)   # where per-case work runs (Dask)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_params(path: str | Path | Mapping[str, Any], overrides: dict[str, Any] | None = None) -> StudyParams:
    """Read and validate a params YAML (or the same as a mapping); `overrides` (top-level keys) win.

    Every problem found (keys given twice, then unknown keys / wrong types, else the values'
    problems of `check_params`) is reported together in one FlareInputError."""
    where: Path | None = None
    problems: list[str] = []
    if isinstance(path, Mapping):
        raw = {**path, **(overrides or {})}
    else:
        where = Path(path)
        if not where.is_file():
            raise FlareInputError(where, "params file not found")
        try:
            raw, problems = _read_yaml(where)
        except yaml.YAMLError as e:
            raise FlareInputError(where, f"not valid YAML: {e}") from e
        raw = raw or {}
        if not isinstance(raw, dict):
            raise FlareInputError(where, "top level must be a mapping of keys to values")
        raw.update(overrides or {})
    try:
        params = from_dict(StudyParams, raw)
    except FlareInputError as e:
        raise _problems_error(where, [*problems, e.problem]) from None
    from flare_utils.study.params_checks import check_params
    problems += check_params(params)
    if problems:
        raise _problems_error(where, problems)
    return params


def _problems_error(where: Path | None, problems: list[str]) -> FlareInputError:
    if len(problems) == 1:
        return FlareInputError(where, problems[0])
    return FlareInputError(where, f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


# ---------------------------------------------------------------------------------------------
# Reading: keys given twice are problems too

class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader recording every key given twice in one mapping (PyYAML itself keeps the
    last value without a word). Merge keys (`<<: *anchor`) may be overridden as YAML intends."""

    def __init__(self, stream):
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in first_line:
                        self.duplicates.append(f"line {line}: key {key!r} given twice in one mapping (first on line "
                                               f"{first_line[key]}); YAML would keep only the last one: remove one")
                    else:
                        first_line[key] = line
                except TypeError:       # an unhashable key: the base class reports it
                    pass
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> tuple[Any, list[str]]:
    """(the YAML's data, its duplicate keys)."""
    loader = _UniqueKeyLoader(path.read_text())
    try:
        return loader.get_single_data(), loader.duplicates
    finally:
        loader.dispose()
