"""The checks of a whole params file: every value in its range, plan names and folds that exist,
what the listed stages need. Each check returns its problems as "params.<key>: what is allowed, got
what", so that `flare_utils.study.params.load_params` reports them all at once."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from flare_utils.errors import FlareInputError
from flare_utils.study.params import StudyParams

# smallest allowed value of an integer setting (null, where allowed, means unset and is fine)
_MINIMUM: dict[str, int] = {
    "seed": 0,
    "data.dataset_id": 1, "data.processes": 1, "data.preview_cases": 0,
    "data.phantom.n_labelled": 1, "data.phantom.n_unlabelled": 0, "data.phantom.n_validation": 0,
    "data.phantom.seed": 0,
    "teacher.epochs": 1, "teacher.iterations_per_epoch": 1, "teacher.val_iterations": 1,
    "teacher.freeze_encoder_stages": 0, "teacher.batch_size": 1, "teacher.num_threads": 1, "teacher.n_proc_da": 0,
    "pseudo.rounds": 1, "pseudo.retrain_epochs": 1, "pseudo.retrain_iterations": 1, "pseudo.num_threads": 1,
    "pseudo.max_cases": 1,
    "student.epochs": 1, "student.iterations_per_epoch": 1, "student.val_iterations": 1,
    "student.finetune_epochs": 0, "student.batch_size": 1, "student.cps_rampup_epochs": 0,
    "student.num_threads": 1, "student.n_proc_da": 0,
    "inference.centre_threshold": 0,
    "evaluation.processes": 1,
}
# numbers in an interval: (low, high, low included)
_INTERVAL: dict[str, tuple[float, float, bool]] = {
    "teacher.initial_lr": (0, math.inf, False), "student.initial_lr": (0, math.inf, False),
    "teacher.oversample_foreground": (0, 1, True), "student.oversample_foreground": (0, 1, True),
    "student.pseudo_share": (0, 1, True), "student.cps_lambda_max": (0, math.inf, True),
    "selection.threshold": (0, math.inf, False), "selection.fraction": (0, 1, False),
    "inference.inplane_step": (0, 1, False),
}
_HINT = {
    "teacher.n_proc_da": " (0: augmentation in the training process)",
    "student.n_proc_da": " (0: augmentation in the training process)",
    "pseudo.rounds": " (K rounds of pseudo labels; the select stage needs K >= 2)",
    "selection.fraction": " (the share of the most stable cases kept)",
    "selection.threshold": " (keep cases with u < threshold)",
}
# budgets and workers the trainers take in pseudo.retrain_config: smallest allowed value
_RETRAIN_MINIMUM = {"num_epochs": 1, "num_iterations_per_epoch": 1, "num_val_iterations_per_epoch": 1,
                    "num_threads": 1, "n_proc_da": 0, "export_processes": 1, "preprocess_processes": 1,
                    "batch_size": 1}


def _value(p: StudyParams, key: str) -> Any:
    for part in key.split("."):
        p = getattr(p, part)
    return p


def _interval(low: float, high: float, closed: bool) -> str:
    if math.isinf(high):
        return f"{'>=' if closed else '>'} {low:g}"
    return f"in {'[' if closed else '('}{low:g}, {high:g}]"


def _number_problems(p: StudyParams) -> list[str]:
    out = []
    for key, low in _MINIMUM.items():
        v = _value(p, key)
        if v is not None and v < low:
            out.append(f"params.{key}: must be >= {low}{_HINT.get(key, '')}, got {v}")
    for key, (low, high, closed) in _INTERVAL.items():
        v = _value(p, key)
        if v is not None and not ((v >= low if closed else v > low) and v <= high):
            out.append(f"params.{key}: must be {_interval(low, high, closed)}{_HINT.get(key, '')}, got {v}")
    for k, low in _RETRAIN_MINIMUM.items():
        v = p.pseudo.retrain_config.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < low:
            out.append(f"params.pseudo.retrain_config.{k}: must be >= {low}, got {v}")
    return out


def _data_problems(p: StudyParams) -> list[str]:
    if p.data.source == "flare22" and not p.data.flare22_root:
        return ["params.data.flare22_root: data.source flare22 reads the FLARE22 folders: give flare22_root "
                "(the folder holding them)"]
    return []


def _preprocessed_dataset(p: StudyParams) -> Path | None:
    """The run's nnU-Net preprocessed folder of the study's dataset, when an earlier run made it."""
    from flare_utils.layout import RunLayout
    root = RunLayout(Path(p.run_dir).expanduser().resolve()).nnunet_preprocessed
    found = sorted(root.glob(f"Dataset{int(p.data.dataset_id):03d}_*")) if root.is_dir() else []
    return found[0] if found else None


def _plans_files(pre: Path | None) -> set[str]:
    """Identifiers of the plans files in a preprocessed dataset folder (JSON files with a plans_name)."""
    out = set()
    for f in sorted(pre.glob("*.json")) if pre is not None else []:
        if f.name.startswith(".") or f.name in ("dataset.json", "dataset_fingerprint.json", "splits_final.json"):
            continue
        try:
            if "plans_name" in json.loads(f.read_text()):
                out.add(f.stem)
        except (OSError, ValueError, TypeError):
            pass
    return out


def _plans_problems(p: StudyParams, pre: Path | None) -> list[str]:
    """teacher.plan_variants entries, and teacher.plans / student.plans: a plan variant's name (or its
    plans identifier) or the identifier of a plans file the run already has; the student's plan
    must be one the teacher stage prepares."""
    from flare_utils.planning.plans import PLAN_VARIANTS, PlanVariant
    out, names = [], []
    for i, v in enumerate(p.teacher.plan_variants):
        where = f"params.teacher.plan_variants[{i}]"
        if isinstance(v, str):
            if v not in PLAN_VARIANTS:
                out.append(f"{where}: unknown plan variant {v!r}; known variants: {sorted(PLAN_VARIANTS)} "
                           "(or a mapping of PlanVariant fields defining a new one)")
                continue
            names.append(v)
            continue
        try:
            d = dict(v)
            for k in ("patch_size_zyx", "spacing_zyx"):
                if d.get(k) is not None:
                    d[k] = tuple(d[k])
            if not isinstance(d.get("name"), str) or not d["name"]:
                raise ValueError("a study's own plan variant needs a name")
            PlanVariant(**d)
        except (TypeError, ValueError) as e:
            out.append(f"{where}: {e}")
            continue
        names.append(d["name"])
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        out.append(f"params.teacher.plan_variants: variant(s) {twice} listed twice")
    own = [n for n in names if n not in PLAN_VARIANTS]
    known = {*PLAN_VARIANTS, *own}
    by_identifier = {PlanVariant(name=n).plans_identifier: n for n in known}
    made = _plans_files(pre)
    for key in ("teacher.plans", "student.plans"):
        name = _value(p, key)
        if name in known or name in by_identifier or name in made:
            continue
        out.append(f"params.{key}: unknown plan {name!r}; known variants: {sorted(PLAN_VARIANTS)}"
                   + (f", this file's own: {own}" if own else "")
                   + (f", or a plans identifier the run has made: {sorted(made)}" if made else
                      ", or the identifier of a plans file the run has made (nnUNetPlans_<variant>)"))
    planned = {*names, *([p.teacher.plans] if p.teacher.plans in PLAN_VARIANTS else [])}
    student = by_identifier.get(p.student.plans, p.student.plans)
    if ("student" in p.stages and student in known and student not in planned
            and PlanVariant(name=student).plans_identifier not in made):
        out.append(f"params.student.plans: plan variant {student!r} is not prepared by this study: add it to "
                   f"teacher.plan_variants (now {names})")
    return out


def _split_size(p: StudyParams, pre: Path | None) -> tuple[int | None, str]:
    """(number of folds of the study's split, where that number comes from); None: teacher.splits is
    broken (reported by `_fold_problems`)."""
    s = p.teacher.splits
    if s is not None:
        if s.get("folds") is not None:
            return (len(s["folds"]), "teacher.splits.folds") if isinstance(s["folds"], list) else (None, "")
        n = s.get("n_folds", 5)
        ok = isinstance(n, int) and not isinstance(n, bool) and n >= 2
        return (n, "teacher.splits.n_folds") if ok else (None, "")
    if pre is not None and (pre / "splits_final.json").is_file():
        try:
            folds = json.loads((pre / "splits_final.json").read_text())
        except (OSError, ValueError):
            folds = None
        if isinstance(folds, list) and folds:
            return len(folds), "the run's splits_final.json"
    return 5, "nnU-Net's default 5-fold split (teacher.splits sets another)"


def _fold_problems(p: StudyParams, pre: Path | None) -> list[str]:
    """teacher.splits, and the folds of teacher, pseudo retraining and students: 0..n-1 of the split
    (teacher.splits, else the run's splits_final.json, else nnU-Net's 5 folds) or "all"."""
    out = []
    s = p.teacher.splits
    if s is not None:
        from flare_utils.training.splits import SplitSpec
        try:
            spec = SplitSpec.coerce(s)
        except FlareInputError as e:
            return [f"params.teacher.splits: {e.problem}"]
        except (TypeError, ValueError) as e:
            return [f"params.teacher.splits: not a split specification ({e})"]
        if spec.folds is None and (not isinstance(spec.n_folds, int) or isinstance(spec.n_folds, bool)
                                   or spec.n_folds < 2):
            out.append(f"params.teacher.splits.n_folds: must be an integer >= 2, got {spec.n_folds!r}")
        if spec.folds is not None and (not isinstance(spec.folds, list) or not spec.folds):
            out.append("params.teacher.splits.folds: give a list with one entry per fold")
    n, source = _split_size(p, pre)
    if n is None:
        return out
    allowed = f"0-{n - 1} ({n} folds: {source}) or \"all\""
    for key in ("teacher.folds", "pseudo.retrain_folds", "student.folds"):
        folds = _value(p, key)
        if folds == "all":
            continue
        if not folds:
            out.append(f"params.{key}: no folds given; allowed: {allowed}")
            continue
        bad = [f for f in folds if f != "all" and not (isinstance(f, int) and 0 <= f < n)
               and not (isinstance(f, str) and f.isdigit() and int(f) < n)]
        if bad:
            out.append(f"params.{key}: fold(s) {bad} not in the split; allowed: {allowed}")
        twice = sorted({str(f) for f in folds if [str(g) for g in folds].count(str(f)) > 1})
        if twice:
            out.append(f"params.{key}: fold(s) {twice} listed twice")
    n_labelled = p.data.phantom.n_labelled
    made_split = s is None and source.startswith("the run's")       # kept by the teacher stage as it is
    if (p.data.source == "phantom" and "teacher" in p.stages and not made_split
            and (s is None or s.get("folds") is None) and n_labelled < n):
        out.append(f"params.data.phantom.n_labelled: {n_labelled} labelled cases cannot fill the split's {n} folds "
                   f"({source}): set teacher.splits: {{n_folds: {max(2, n_labelled)}}} or label more cases")
    return out


def _selection_problems(p: StudyParams) -> list[str]:
    out = []
    sel, k = p.selection, p.pseudo.rounds
    if sel.threshold is None and sel.fraction is None:
        out.append("params.selection: give a threshold (keep u < threshold) or a fraction (the most stable share)")
    elif sel.threshold is not None and sel.fraction is not None:
        out.append("params.selection: give threshold or fraction, not both (threshold: null to keep a fraction)")
    if k >= 1 and not -k <= sel.labels_round < k:
        out.append(f"params.selection.labels_round: must pick one of the pseudo.rounds = {k} rounds: {-k}..{k - 1} "
                   f"(-1: the last), got {sel.labels_round}")
    if "select" in p.stages and k == 1:
        out.append("params.pseudo.rounds: the select stage compares rounds: needs pseudo.rounds >= 2, got 1")
    return out


def _stage_problems(p: StudyParams) -> list[str]:
    """What the listed stages need from stages that are not listed: the students' selection files."""
    if "student" not in p.stages:
        return []
    out = []
    s = p.student
    if "selected" in s.variants and s.selection_file is not None and not Path(s.selection_file).is_file():
        out.append(f"params.student.selection_file: {s.selection_file} not found")
    if "select" not in p.stages:
        from flare_utils.layout import RunLayout
        from flare_utils.semisup.selection import ALL_CASES_FILE, SELECTION_FILE
        folder = RunLayout(Path(p.run_dir).expanduser().resolve()).selection
        needing = [v for v in s.variants
                   if (v == "selected" and s.selection_file is None and not (folder / SELECTION_FILE).is_file())
                   or (v == "all" and not (folder / ALL_CASES_FILE).is_file())]
        if needing:
            out.append(f"params.student.variants: {needing} learn from the select stage's files, but 'select' is not "
                       "in params.stages (and the run has none yet): add select (after pseudo) to stages, or keep "
                       "only labelled_only" + (" (or give student.selection_file)" if "selected" in needing else ""))
    return out


def _gpu_problems(p: StudyParams) -> list[str]:
    """num_gpus of the training sections: an integer >= 1; > 1 (nnU-Net's DDP) needs CUDA."""
    out = []
    for key in ("teacher.num_gpus", "pseudo.num_gpus", "student.num_gpus"):
        v = _value(p, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            out.append(f"params.{key}: must be an integer >= 1 (1: one process; > 1: nnU-Net's multi-GPU DDP "
                       f"training), got {v!r}")
        elif v > 1 and p.device not in ("cuda", "auto"):
            out.append(f"params.{key}: {v} GPUs (DDP) needs params.device cuda or auto, got device {p.device!r}; "
                       f"allowed with device {p.device!r}: num_gpus 1")
    if p.student.recipe == "cps" and p.student.num_gpus != 1:
        out.append(f"params.student.num_gpus: the cps recipe trains on one GPU only: must be 1, got "
                   f"{p.student.num_gpus}")
    return out


def check_params(p: StudyParams) -> list[str]:
    """Every problem of a typed params' values, as "params.<key>: what is allowed" (empty: none).
    Files an earlier run of the same run_dir made count (plans files, splits_final.json,
    selection files); unknown stage names are left to the runner's `validate_stages`."""
    pre = _preprocessed_dataset(p)
    from flare_utils.distributed.cluster import cluster_problems
    return [*_number_problems(p), *_data_problems(p), *_plans_problems(p, pre), *_fold_problems(p, pre),
            *_selection_problems(p), *_stage_problems(p), *_gpu_problems(p), *cluster_problems(p.cluster)]
