"""Runs a study: each stage is a parameterised notebook executed by papermill into the run folder.

The runner owns orchestration only: which notebook runs with which parameters, where its output
goes, HTML rendering, resuming, progress and provenance. The science lives in the notebooks'
calls into flare_utils.

A stage expands to one or more *units* (one executed notebook each; the student stage runs its
notebook once per student variant). A unit is complete when its marker `.flare_stages/<unit>.json`
exists, records the same parameters, its executed notebook is there, and it finished after every
unit before it (a re-run upstream makes everything downstream stale). `run_study` skips complete
units; `start_from` re-runs a stage and everything after it; `only` re-runs just the named stages.
A failing unit leaves its `.partial.ipynb` / `.partial.html`, no marker, and a StageFailed that
names notebook, cell and partial HTML; what earlier units produced stays valid.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TextIO

import yaml

from flare_utils.errors import FlareInputError
from flare_utils.data.io import atomic_write_text
from flare_utils.study.params import STUDENT_VARIANTS, StudyParams, load_params
from flare_utils.layout import NOTEBOOK_DIR, RunLayout
from flare_utils.utilities.environment import environment
from flare_utils.utilities.progress import ENV_VAR as PROGRESS_ENV, ProgressWatcher



@dataclass(frozen=True)
class Unit:
    """One notebook execution of a stage."""
    stage: str
    name: str                            # "teacher", "student:selected"
    notebook: str                        # source file in notebooks/
    output: str                          # executed notebook's file name in <run>/notebooks/
    parameters: Callable[[], dict[str, Any]]   # evaluated when the unit is reached


@dataclass(frozen=True)
class Stage:
    name: str
    notebook: str
    units: Callable[["Stage", StudyParams, RunLayout], list[Unit]]


# ---------------------------------------------------------------------------------------------
# Parameters of each stage's notebook

def _common(p: StudyParams, run: RunLayout) -> dict[str, Any]:
    return {"run_dir": str(run.root), "seed": p.seed, "device": p.device}


def _none_to_empty(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    """Notebook parameters use "" for 'not given' where the params file uses null."""
    return {**d, **{k: (d[k] if d[k] is not None else "") for k in keys}}


def _raw_dataset(p: StudyParams, run: RunLayout) -> Path:
    return run.dataset_dir(p.data.dataset_id, p.data.dataset_name)


def _plans_id(p: StudyParams, name: str) -> str:
    """Plans identifier of a plan variant name (a built-in one or one of teacher.plan_variants);
    anything else is taken as an identifier already."""
    from flare_utils.planning.plans import resolve_plans_identifier
    return resolve_plans_identifier(name, p.teacher.plan_variants)


def _convert_parameters(p: StudyParams, run: RunLayout) -> dict[str, Any]:
    return {**_common(p, run), **dataclasses.asdict(p.data)}


def _teacher_parameters(p: StudyParams, run: RunLayout) -> dict[str, Any]:
    t = _none_to_empty(dataclasses.asdict(p.teacher), "init_checkpoint")
    _drop_single_gpu(t)
    return {**_common(p, run), "dataset_id": p.data.dataset_id, "processes": p.data.processes, **t}


def _pseudo_parameters(p: StudyParams, run: RunLayout) -> dict[str, Any]:
    q, t = p.pseudo, p.teacher
    plans = _plans_id(p, t.plans)
    retrain = {"optimizer": t.optimizer, "initial_lr": t.initial_lr, "mirroring": t.mirroring,
               "oversample_foreground_percent": t.oversample_foreground, "num_threads": q.num_threads}
    if q.retrain_from_teacher:
        from flare_utils.training.api import results_folder
        fold = t.folds if t.folds == "all" else t.folds[0]
        with run.activated():
            retrain["init_checkpoint"] = str(results_folder(p.data.dataset_id, plans, t.trainer) / f"fold_{fold}"
                                             / "checkpoint_final.pth")
    retrain = {**{k: v for k, v in retrain.items() if v is not None}, **q.retrain_config}
    return {**_common(p, run), "dataset_id": p.data.dataset_id, "plans": plans, "teacher_trainer": t.trainer,
            "rounds": q.rounds, "folds": t.folds, "tta": q.tta, "retrain_epochs": q.retrain_epochs,
            "retrain_iterations": q.retrain_iterations, "retrain_folds": q.retrain_folds, "retrain_config": retrain,
            "max_cases": q.max_cases, "processes": p.data.processes, "torch_threads": q.num_threads,
            # only when set: an in-process study's parameters (and its completion key) stay as they were
            **_cluster_parameter(p), **({"num_gpus": q.num_gpus} if q.num_gpus != 1 else {})}


def _drop_single_gpu(section: dict[str, Any]) -> dict[str, Any]:
    """num_gpus only when > 1: the parameters (and completion keys) of one-GPU runs stay as they were."""
    if section.get("num_gpus", 1) == 1:
        section.pop("num_gpus", None)
    return section


def _cluster_parameter(p: StudyParams) -> dict[str, Any]:
    """{"cluster": the params' cluster: section} for the stages with per-case work, only when it is not
    local: an in-process study's parameters (and so their completion keys) stay as they were."""
    return {"cluster": dataclasses.asdict(p.cluster)} if p.cluster.type != "local" else {}


def _select_parameters(p: StudyParams, run: RunLayout) -> dict[str, Any]:
    return {"run_dir": str(run.root), **dataclasses.asdict(p.selection), "processes": p.data.processes}


def _student_parameters(p: StudyParams, run: RunLayout, variant: str) -> dict[str, Any]:
    s = dataclasses.asdict(p.student)
    del s["variants"]
    _drop_single_gpu(s)
    from flare_utils.semisup.selection import ALL_CASES_FILE, SELECTION_FILE
    selection = {"labelled_only": None,
                 "selected": s["selection_file"] or str(run.selection / SELECTION_FILE),
                 "all": str(run.selection / ALL_CASES_FILE)}[variant]
    if selection is not None and not Path(selection).is_file():
        raise FlareInputError(Path(selection), f"student variant '{variant}' needs this selection file: run the "
                                               "select stage first (or give student.selection_file)")
    s["selection_file"] = selection
    s["plans"] = _plans_id(p, s["plans"])
    return {**_common(p, run), "dataset_id": p.data.dataset_id, **_none_to_empty(s, "selection_file"),
            "variant": variant}


def _infer_parameters(p: StudyParams, run: RunLayout) -> dict[str, Any]:
    from flare_utils.study.models import select_models
    models = select_models(run.root, p.inference.models)
    if not models:
        raise FlareInputError(run.root, "no trained model registered in models.json: run the training stages first")
    i = p.inference
    showcase = next((f"student_{v}" for v in p.student.variants if f"student_{v}" in models), "")
    return {"run_dir": str(run.root), "device": p.device, "showcase": showcase,
            "models": {n: {"path": m["path"], "folds": m["folds"]} for n, m in models.items()},
            "input_dir": i.input_dir or str(_raw_dataset(p, run) / "imagesTs"), "mode": i.mode, "tta": i.tta,
            "centre_threshold": i.centre_threshold, "inplane_step": i.inplane_step,
            "ground_truth_dir": str(_raw_dataset(p, run) / "labelsTs"), **_cluster_parameter(p)}


def _evaluate_parameters(p: StudyParams, run: RunLayout) -> dict[str, Any]:
    e = dataclasses.asdict(p.evaluation)
    sets, timing = {}, {}
    from flare_utils.inference.runs import SUMMARY_JSON
    summary = run.inference / SUMMARY_JSON
    if summary.is_file():                      # the inference stage's predictions, one set per model
        for name, m in json.loads(summary.read_text())["models"].items():
            sets[name] = str(summary.parent / m["output_dir"])       # recorded relative to the summary
            if m.get("run_report"):
                timing[name] = str(summary.parent / m["run_report"])
    sets.update(e["prediction_sets"])
    timing.update(e["timing_files"])
    raw = _raw_dataset(p, run)
    return {"run_dir": str(run.root), **e, "prediction_sets": sets, "timing_files": timing,
            "ground_truth_dir": e["ground_truth_dir"] or str(raw / "labelsTs"),
            "image_dir": e["image_dir"] or str(raw / "imagesTs"), **_cluster_parameter(p)}


def _single(parameters: Callable[[StudyParams, RunLayout], dict[str, Any]]):
    def units(stage: Stage, p: StudyParams, run: RunLayout) -> list[Unit]:
        return [Unit(stage.name, stage.name, stage.notebook, stage.notebook, lambda: parameters(p, run))]
    return units


def _student_units(stage: Stage, p: StudyParams, run: RunLayout) -> list[Unit]:
    stem = Path(stage.notebook).stem
    return [Unit(stage.name, f"{stage.name}:{v}", stage.notebook, f"{stem}_{v}.ipynb",
                 (lambda v=v: _student_parameters(p, run, v))) for v in p.student.variants]


STAGES: tuple[Stage, ...] = (
    Stage("convert", "01_data_conversion.ipynb", _single(_convert_parameters)),
    Stage("teacher", "02_teacher_training.ipynb", _single(_teacher_parameters)),
    Stage("pseudo", "03_pseudo_labels.ipynb", _single(_pseudo_parameters)),
    Stage("select", "04_selection.ipynb", _single(_select_parameters)),
    Stage("student", "05_student_training.ipynb", _student_units),
    Stage("infer", "06_efficient_inference.ipynb", _single(_infer_parameters)),
    Stage("evaluate", "07_evaluation.ipynb", _single(_evaluate_parameters)),
)
STAGE_BY_NAME = {s.name: s for s in STAGES}
STAGE_NAMES = tuple(s.name for s in STAGES)


def validate_stages(params: StudyParams) -> list[Stage]:
    """The params' stages in pipeline order (unknown names and inconsistent variants are errors)."""
    unknown = [s for s in params.stages if s not in STAGE_BY_NAME]
    if unknown:
        raise FlareInputError(None, f"params.stages: unknown stage(s) {unknown}; known: {list(STAGE_NAMES)}")
    v = params.student.variants
    if "student" in params.stages:
        if not v or len(set(v)) != len(v):
            raise FlareInputError(None, f"params.student.variants: give distinct variants of {list(STUDENT_VARIANTS)}")
        if params.student.recipe != "plain" and "labelled_only" in v[:1]:
            raise FlareInputError(None, "params.student.variants: the study's student (the first variant) of recipe "
                                        f"'{params.student.recipe}' needs pseudo labels")
    return sorted((STAGE_BY_NAME[s] for s in dict.fromkeys(params.stages)), key=lambda s: STAGE_NAMES.index(s.name))


def plan_units(params: StudyParams, run: RunLayout) -> list[Unit]:
    return [u for stage in validate_stages(params) for u in stage.units(stage, params, run)]


# ---------------------------------------------------------------------------------------------
# Completion markers

def _marker_path(run: RunLayout, unit: Unit) -> Path:
    return run.markers / f"{unit.name.replace(':', '__')}.json"


def _hash(parameters: dict[str, Any], run: RunLayout | None = None) -> str:
    """The key of a unit's parameters; with `run`, paths inside the run count relative to it, so a
    copied or moved run folder stays complete."""
    text = json.dumps(parameters, sort_keys=True, default=str)
    if run is not None:
        text = text.replace(str(run.root), "<run>")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_marker(run: RunLayout, unit: Unit) -> dict[str, Any] | None:
    f = _marker_path(run, unit)
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def unit_outputs(unit: Unit, p: StudyParams, run: RunLayout) -> list[Path]:
    """The folders a unit writes; a complete unit needs them back (deleting one makes it run again)."""
    if unit.stage == "convert":
        return [run.conversion, _raw_dataset(p, run)]
    if unit.stage == "student":
        return [run.student(unit.name.split(":", 1)[1])]
    return [{"teacher": run.teacher, "pseudo": run.pseudo_labels, "select": run.selection,
             "infer": run.inference, "evaluate": run.evaluation}[unit.stage]]


def _missing_outputs(run: RunLayout, marker: dict[str, Any]) -> list[str]:
    """What a unit's marker lists (its folders, the models it registered) and is gone now."""
    missing = [o for o in marker.get("outputs", []) if not run.resolve(o).exists()]
    if marker.get("models"):
        from flare_utils.study.models import read_models
        try:
            models = read_models(run.root)
        except FlareInputError:
            models = {}
        for name in marker["models"]:
            m = models.get(name)
            if m is None:
                missing.append(f"model '{name}' in {run.models_file.name}")
                continue
            path = Path(m["path"])
            if not all((path / f"fold_{f}" / "checkpoint_final.pth").is_file() for f in m.get("folds", [])):
                missing.append(run.stored(path))
    return missing


def last_recorded_status(run: RunLayout, unit_name: str) -> tuple[str | None, str | None]:
    """(status, message) of `unit_name` in stages.json; a "running" unit whose runner is gone (no live
    holder of the run's lock, e.g. after a SIGKILL) reads "interrupted"."""
    try:
        entries = json.loads(run.stages_file.read_text())
    except (OSError, ValueError):
        return None, None
    entry = next((e for e in entries if isinstance(e, dict) and e.get("unit") == unit_name), None) \
        if isinstance(entries, list) else None
    if entry is None:
        return None, None
    status, message = entry.get("status"), entry.get("message")
    if status == "running" and not runner_alive(run):
        return "interrupted", "the run stopped during this stage (its process is gone)"
    return status, message


def runner_alive(run: RunLayout) -> bool:
    """Whether a live process holds the run's lock (a runner is writing it now)."""
    from flare_utils.study.lock import holder_alive, read_lock
    return holder_alive(read_lock(run.root))


def completion(run: RunLayout, unit: Unit, parameters: dict[str, Any], not_before: float) -> tuple[bool, str]:
    """(complete?, why not) for a unit given its parameters and the finish time of the units before it."""
    m = _read_marker(run, unit)
    if m is None:
        status, message = last_recorded_status(run, unit.name)
        if status == "running":
            return False, "running now"
        if status == "interrupted":
            return False, "interrupted during its last run"
        if status == "failed":
            return False, "failed in its last run" + (f": {message.splitlines()[0]}" if message else "")
        return False, "not run yet"
    if m.get("parameters_hash") not in (_hash(parameters, run), _hash(parameters)):   # (markers before 2026-12)
        return False, "parameters changed"
    if not (run.notebooks / unit.output).is_file():
        return False, "executed notebook missing"
    missing = _missing_outputs(run, m)
    if missing:
        return False, "outputs missing: " + ", ".join(missing)
    if float(m.get("finished", 0)) < not_before:
        return False, "an earlier stage ran again"
    return True, ""


# ---------------------------------------------------------------------------------------------
# Execution

class StageFailed(RuntimeError):
    """A stage notebook raised; the message names the notebook, the cell and the partial HTML."""

    def __init__(self, stage: str, notebook: Path, html: Path | None, detail: str):
        self.stage, self.notebook, self.html, self.detail = stage, notebook, html, detail
        where = f"; partial report: {html}" if html else ""
        super().__init__(f"stage '{stage}' failed in {notebook}{where}\n{detail}")


@dataclass
class StageResult:
    name: str                   # unit name
    status: str                 # "done" | "skipped" | "failed" | "pending" | "running"
    seconds: float | None
    notebook: Path
    html: Path | None
    message: str | None = None
    stage: str = ""
    peak_ram_mib: float | None = None    # the runner, the kernel and its workers (PSS summed; MiB)
    peak_gpu_mib: float | None = None    # device-wide GPU memory in use (None: no GPU read)


# Rendering of executed notebooks for collaborators: text, tables and figures first; each code cell
# folded under a "code" summary (the .ipynb keeps everything); the parameters actually used as one
# table; stderr (nnU-Net's warnings; the run log has them) left out; a real title; a link to the index.
_NOTEBOOK_CSS = """
.flare-nav{position:sticky;top:0;z-index:10;background:#fff;border-bottom:1px solid #ddd;padding:.45em 0 .45em 0;
  margin-bottom:1em;font-size:14px;color:#555;font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif}
.flare-nav a{font-weight:600;margin-right:1.2em}
.flare-nav button{font-size:12px;margin-left:.3em;cursor:pointer}
details.flare-code>summary{cursor:pointer;color:#888;font-size:12px;margin:.1em 0;user-select:none;
  font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif}
details.flare-code[open]>summary{margin-bottom:.3em}
.flare-params-head{font-weight:600;margin:.2em 0 .4em 0}
.flare-params-head span{font-weight:400;color:#777;font-size:90%}
.flare-params{display:grid;grid-template-columns:repeat(auto-fill,minmax(21em,1fr));gap:.1em 1.6em;font-size:13px}
.flare-params .p{padding:.12em 0;border-bottom:1px solid #eee;overflow-wrap:anywhere}
.flare-params .wide{grid-column:1/-1}
.flare-params .k{font-weight:600;margin-right:.6em}
.flare-params .wide .v{white-space:pre-wrap;display:block;margin:.1em 0 0 1em;background:none}
.flare-params .default code{color:#999}
"""
_NOTEBOOK_TEMPLATE = """{%- extends 'index.html.j2' -%}
{% block extra_css %}<style type="text/css">""" + _NOTEBOOK_CSS + """</style>{% endblock extra_css %}
{%- block body_header -%}
{{ super() }}
<nav class="flare-nav"><a href="../index.html">&larr; Study index</a><span>Code is folded: click
&ldquo;code&rdquo; above a result to read it, or <button type="button" onclick="var d=document.querySelectorAll(
'details.flare-code'),o=!Array.prototype.every.call(d,function(x){return x.open});d.forEach(function(x){x.open=o})"
>show / hide all code</button>. The notebook (.ipynb) beside this page has everything.</span></nav>
{%- endblock body_header -%}
{% block input_group -%}
<details class="flare-code"{% if cell.metadata.get('flare_open') %} open{% endif %}><summary>code</summary>
{{ super() }}
</details>
{%- endblock input_group %}
"""


def _notebook_title(nb, notebook: Path) -> str:
    """The first markdown heading ("02 · Teacher training"), else the file name."""
    import re
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for line in cell.source.splitlines():
            m = re.match(r"\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$", line)
            if m:
                return re.sub(r"[`*_]", "", m.group(1)).strip()
    return notebook.name.split(".")[0]


def _assignments(source: str) -> dict[str, tuple[str, str]] | None:
    """{name: (value as written, same-line comment)} of a parameters cell; None if it does not parse."""
    import ast
    import io
    import tokenize
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    comments: dict[int, str] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
    except (tokenize.TokenError, SyntaxError):
        pass
    out: dict[str, tuple[str, str]] = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else []
        for t in targets:
            if isinstance(t, ast.Name):
                out[t.id] = (ast.get_source_segment(source, node.value) or "", comments.get(node.lineno, ""))
    return out


def _readable_value(text: str) -> str:
    """A long dict or list literal one entry per line (pprint); anything else as written."""
    import ast
    import pprint
    if len(text) <= 100:
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text
    return pprint.pformat(value, width=110, sort_dicts=False) if isinstance(value, (dict, list)) else text


def _parameters_html(defaults: dict[str, tuple[str, str]], injected: dict[str, tuple[str, str]]) -> str:
    """The parameters the notebook ran with: injected ones in black, untouched defaults in grey."""
    import html
    items = []
    for name in [*defaults, *(n for n in injected if n not in defaults)]:
        value, comment = injected[name] if name in injected else defaults[name]
        value = _readable_value(value)
        comment = comment or defaults.get(name, ("", ""))[1]
        cls = "p" + (" wide" if len(name) + len(value) > 48 else "") + ("" if name in injected else " default")
        tip = f' title="{html.escape(comment, quote=True)}"' if comment else ""
        items.append(f'<div class="{cls}"{tip}><code class="k">{html.escape(name)}</code>'
                     f'<code class="v">{html.escape(value)}</code></div>')
    note = " (grey: the notebook's default, not set by the study; hover a name for its meaning)" \
        if injected and any(n not in injected for n in defaults) else ""
    return (f'<p class="flare-params-head">Parameters of this run<span>{html.escape(note)}</span></p>'
            f'<div class="flare-params">{"".join(items)}</div>')


def _report_notebook(nb):
    """A copy of the executed notebook as the HTML shows it (see _NOTEBOOK_TEMPLATE)."""
    import copy
    import nbformat
    nb = copy.deepcopy(nb)
    tags = lambda c: set(c.metadata.get("tags", []))                  # noqa: E731
    defaults_cell = next((c for c in nb.cells if "parameters" in tags(c)), None)
    injected_cell = next((c for c in nb.cells if "injected-parameters" in tags(c)), None)
    shown = injected_cell or defaults_cell
    if shown is not None:
        defaults = _assignments(defaults_cell.source) if defaults_cell is not None else {}
        injected = _assignments(injected_cell.source) if injected_cell is not None else {}
        if defaults is not None and injected is not None:
            table = _parameters_html(defaults, injected) if injected_cell is not None else \
                _parameters_html({}, defaults)
            shown.outputs = [nbformat.v4.new_output("display_data", data={"text/html": table})]
            nb.cells = [c for c in nb.cells if c is shown or c is not defaults_cell]
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        failed = any(o.output_type == "error" for o in cell.outputs)
        if failed:
            cell.metadata["flare_open"] = True          # the failing cell's code stays visible
        else:
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.get("name") == "stderr")]
    return nb


def render_html(notebook: Path) -> Path:
    """Render an executed notebook to HTML beside it, for reading without Jupyter.

    Text, tables and figures first: every code cell's input is folded (a "code" line opens it;
    the .ipynb keeps everything), the parameters the notebook ran with (papermill's injected cell
    over the notebook's defaults) are one table and the default parameters cell is left out,
    stderr output (nnU-Net's warnings; the run log has them) is dropped except in a failing cell,
    the page is titled by the notebook's first heading and links back to ../index.html.
    """
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    shown = _report_notebook(nb)
    title = _notebook_title(nb, notebook)
    if any(o.output_type == "error" for c in nb.cells if c.cell_type == "code" for o in c.outputs):
        title += " (stopped with an error)"
    shown.metadata["title"] = title
    exporter = HTMLExporter(extra_loaders=[jinja2.DictLoader({"flare_notebook.html.j2": _NOTEBOOK_TEMPLATE})],
                            template_file="flare_notebook.html.j2", exclude_input_prompt=True,
                            exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(shown)
    return atomic_write_text(notebook.with_suffix(".html"), body)


class RunLog:
    """Runner messages to the console and `<run>/logs/run.log`; notebook output to the log only."""

    def __init__(self, run: RunLayout, console: Callable[[str], None] | None):
        self.path = run.run_log
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.console = console
        self._file = open(self.path, "a", buffering=1)
        self._handler = logging.StreamHandler(self._file)
        self._handler.setFormatter(logging.Formatter("%(asctime)s   | %(message)s", "%H:%M:%S"))

    def __call__(self, message: str) -> None:
        self.file_only(message)
        if self.console is not None:
            self.console(message)

    def file_only(self, message: str) -> None:
        self._file.write(f"{_dt.datetime.now():%Y-%m-%d %H:%M:%S} {message}\n")

    def capture_papermill(self):
        """Route papermill's logger (with the notebook's cell output) into the log file."""
        logger = logging.getLogger("papermill")
        logger.addHandler(self._handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        return self._handler

    def close(self) -> None:
        logging.getLogger("papermill").removeHandler(self._handler)
        self._file.close()


def run_unit(unit: Unit, parameters: dict[str, Any], run: RunLayout, *, kernel_name: str = "python3",
             log: Callable[[str], None] = print, progress_stream: TextIO | None = None,
             outputs: Iterable[Path] = ()) -> StageResult:
    """Execute one unit's notebook into `<run>/notebooks/` and render it; write its marker, which
    lists `outputs` (the unit's folders) and the models the unit registered."""
    import papermill as pm
    from flare_utils.study.models import read_models
    from papermill.exceptions import PapermillExecutionError

    run.notebooks.mkdir(parents=True, exist_ok=True)
    source = NOTEBOOK_DIR / unit.notebook
    out = run.notebooks / unit.output
    partial = out.with_name(out.stem + ".partial.ipynb")
    marker = _marker_path(run, unit)
    marker.unlink(missing_ok=True)           # from here on the unit is not complete
    progress_file = run.progress_file
    progress_file.parent.mkdir(parents=True, exist_ok=True)
    models_before = read_models(run.root)
    from flare_utils.evaluation.efficiency import ResourceMonitor
    # the stage's memory: this process and its descendants (kernel, data-augmentation and pool workers)
    monitor = ResourceMonitor(interval=MEMORY_SAMPLE_INTERVAL_S, pss=True, gpu=None)
    t0 = time.perf_counter()
    log(f"[{unit.name}] running {unit.notebook}" + (f" -> {unit.output}" if unit.output != unit.notebook else ""))
    try:     # the kernel inherits nnU-Net's folders and the progress file
        with environment(**run.nnunet_environment(), **{PROGRESS_ENV: str(progress_file)}), \
                ProgressWatcher(progress_file, stream=progress_stream, log=getattr(log, "file_only", None)), monitor:
            # replace=True: the runner decided (markers) that this unit runs; a notebook opened by hand
            # on a finished run only shows it (flare_utils.study.notebook.open_stage)
            pm.execute_notebook(str(source), str(partial), parameters={**parameters, "replace": True},
                                kernel_name=kernel_name,
                                cwd=str(run.root), progress_bar=False, log_output=True)
    except PapermillExecutionError as e:
        html = render_html(partial) if partial.exists() else None
        detail = f"cell {e.cell_index} (execution count {e.exec_count}) raised {e.ename}: {e.evalue}"
        raise StageFailed(unit.name, partial, html, detail) from None
    os.replace(partial, out)
    html = render_html(out)
    stale = partial.with_suffix(".html")
    if stale.exists():
        stale.unlink()
    seconds = time.perf_counter() - t0
    ram, gpu = _peaks(monitor)
    registered = [n for n, m in read_models(run.root).items() if models_before.get(n) != m]
    marker.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"unit": unit.name, "notebook": unit.output, "finished": time.time(),
                                          "seconds": round(seconds, 2), "peak_ram_mib": ram, "peak_gpu_mib": gpu,
                                          "parameters_hash": _hash(parameters, run),
                                          "outputs": [run.stored(o) for o in outputs], "models": registered,
                                          "parameters": parameters}, indent=1, default=str))
    log(f"[{unit.name}] done in {seconds:.1f} s, peak RAM {_gib(ram)} -> {html}")
    return StageResult(unit.name, "done", seconds, out, html, stage=unit.stage, peak_ram_mib=ram, peak_gpu_mib=gpu)


MEMORY_SAMPLE_INTERVAL_S = 0.5


def _peaks(monitor) -> tuple[float | None, float | None]:
    """(peak RAM, peak GPU memory) in MiB of a finished ResourceMonitor, rounded; None: not read."""
    r = monitor.result
    if r is None:
        return None, None
    gpu = None if r.gpu_mem_peak_mib is None else round(r.gpu_mem_peak_mib, 1)
    return round(r.peak_rss_mib, 1), gpu


def _gib(mib: float | None) -> str:
    return "not measured" if mib is None else f"{mib / 1024:.2f} GiB"


def _stage_names(names: Iterable[str] | str | None, params: StudyParams, what: str) -> list[str]:
    if names is None:
        return []
    names = [names] if isinstance(names, str) else list(names)
    bad = [n for n in names if n not in STAGE_BY_NAME]
    if bad:
        raise FlareInputError(None, f"{what}: unknown stage(s) {bad}; known: {list(STAGE_NAMES)}")
    missing = [n for n in names if n not in params.stages]
    if missing:
        raise FlareInputError(None, f"{what}: stage(s) {missing} are not in this study's stages {params.stages}")
    return names


def _write_status(run: RunLayout, results: list[StageResult]) -> None:
    rel = lambda p: None if p is None else os.path.relpath(p, run.root)   # noqa: E731
    atomic_write_text(run.stages_file, json.dumps(
        [{"unit": r.name, "stage": r.stage, "status": r.status,
          "seconds": None if r.seconds is None else round(r.seconds, 2),
          "peak_ram_mib": r.peak_ram_mib, "peak_gpu_mib": r.peak_gpu_mib, "notebook": rel(r.notebook),
          "html": rel(r.html), "message": r.message} for r in results], indent=2))


def study_status(params_path: str | Path | Mapping[str, Any], *, run_dir: str | Path | None = None) -> list[tuple[str, bool, str]]:
    """(unit, complete?, why not) for every unit of the params' plan, without running anything.
    A unit whose parameters need earlier outputs that are missing reads "waiting for earlier stages"."""
    overrides = {"run_dir": str(run_dir)} if run_dir is not None else None
    params = load_params(params_path, overrides)
    run = RunLayout(Path(params.run_dir).resolve())
    settle_killed_run(run)
    out, not_before, chain_ok = [], 0.0, True
    for unit in plan_units(params, run):
        try:
            parameters = unit.parameters()
        except FlareInputError:
            out.append((unit.name, False, "waiting for earlier stages"))
            chain_ok = False
            continue
        done, why = completion(run, unit, parameters, not_before)
        if done and not chain_ok:
            done, why = False, "an earlier stage is not complete"
        if done:
            not_before = max(not_before, float(_read_marker(run, unit)["finished"]))
        else:
            chain_ok = False
        out.append((unit.name, done, why))
    return out


def settle_killed_run(run: RunLayout) -> bool:
    """After a runner was killed (SIGKILL, power loss), stages.json and index.html still say "running":
    when no live process holds the run's lock, record those units as interrupted and rewrite the index
    report. True when something was rewritten."""
    try:
        entries = json.loads(run.stages_file.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(entries, list) or not any(isinstance(e, dict) and e.get("status") == "running"
                                                for e in entries) or runner_alive(run):
        return False
    for e in entries:
        if isinstance(e, dict) and e.get("status") == "running":
            e["status"], e["message"] = "interrupted", "the run stopped during this stage (its process is gone)"
    atomic_write_text(run.stages_file, json.dumps(entries, indent=2))
    if run.index_html.is_file():
        from flare_utils.study.index_report import write_index
        write_index(run.root)
    return True


def run_study(params_path: str | Path | Mapping[str, Any], *, run_dir: str | Path | None = None, start_from: str | None = None,
              only: Iterable[str] | str | None = None, log: Callable[[str], None] | None = print,
              progress_stream: TextIO | None = None, command: str | None = None,
              index: bool = True) -> list[StageResult]:
    """Execute the params file's stages in pipeline order, skipping complete units (module
    docstring); stop at the first failing one (StageFailed, after writing stages.json and the
    index report). Returns one StageResult per unit of the plan."""
    overrides = {"run_dir": str(run_dir)} if run_dir is not None else None
    params = load_params(params_path, overrides)
    start = _stage_names(start_from, params, "--from")
    only_l = _stage_names(only, params, "--only")
    if start and only_l:
        raise FlareInputError(None, "give --from or --only, not both")
    run = RunLayout(Path(params.run_dir).resolve())
    from flare_utils.study.lock import run_lock
    with run_lock(run.root, command, log):      # one writer per run folder
        return _run_locked(params, run, start, only_l, log=log, progress_stream=progress_stream,
                           command=command, index=index)


def _run_locked(params: StudyParams, run: RunLayout, start: list[str], only_l: list[str], *,
                log: Callable[[str], None] | None, progress_stream: TextIO | None, command: str | None,
                index: bool) -> list[StageResult]:
    from flare_utils.study import provenance
    run.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.params_file, yaml.safe_dump(params.to_dict(), sort_keys=False))
    provenance.write(run.root, params, command)
    units = plan_units(params, run)
    rlog = RunLog(run, log)
    stages_of_units = [u.stage for u in units]
    start_index = stages_of_units.index(start[0]) if start else len(units)
    forced = ({u.name for u in units if u.stage in only_l} if only_l else
              {u.name for u in units[start_index:]} if start else set())
    results = [StageResult(u.name, "pending", None, run.notebooks / u.output, None, stage=u.stage) for u in units]
    rlog(f"study '{params.name}' in {run.root}: " + ", ".join(u.name for u in units))
    not_before = 0.0
    try:
        for i, unit in enumerate(units):
            if only_l and unit.name not in forced:
                rlog(f"[{unit.name}] not selected (--only)")
                m = _read_marker(run, unit)
                results[i].status = "skipped" if m else "pending"
                results[i].message = "not selected by --only"
                results[i].html = (run.notebooks / unit.output).with_suffix(".html") if m else None
                not_before = max(not_before, float(m["finished"])) if m else not_before
                continue
            parameters = unit.parameters()
            if unit.name not in forced:
                done, why = completion(run, unit, parameters, not_before)
                if done:
                    m = _read_marker(run, unit)
                    not_before = max(not_before, float(m["finished"]))
                    results[i] = StageResult(unit.name, "skipped", m.get("seconds"), run.notebooks / unit.output,
                                             (run.notebooks / unit.output).with_suffix(".html"),
                                             "complete (outputs and parameters unchanged); time and memory of its run",
                                             stage=unit.stage, peak_ram_mib=m.get("peak_ram_mib"),
                                             peak_gpu_mib=m.get("peak_gpu_mib"))
                    rlog(f"[{unit.name}] complete, skipped")
                    continue
                if start and i < start_index:
                    raise FlareInputError(run.root, f"--from {start[0]}: the earlier stage unit '{unit.name}' is "
                                                    f"not complete ({why}); run it first")
                rlog(f"[{unit.name}] {why}")
            results[i].status, results[i].message = "running", None
            _write_status(run, results)
            handler = rlog.capture_papermill()
            try:
                results[i] = run_unit(unit, parameters, run, log=rlog, progress_stream=progress_stream,
                                      outputs=unit_outputs(unit, params, run))
            except StageFailed as e:
                results[i] = StageResult(unit.name, "failed", None, e.notebook, e.html, e.detail, stage=unit.stage)
                rlog(f"[{unit.name}] FAILED: {e}")
                raise
            except KeyboardInterrupt as e:
                results[i].status, results[i].message = "interrupted", "the run was stopped during this stage"
                e.flare_unit = unit.name        # cli.main names it in its one-line message
                rlog(f"[{unit.name}] interrupted")
                raise
            finally:
                logging.getLogger("papermill").removeHandler(handler)
            not_before = time.time()
    finally:
        _write_status(run, results)
        if index:
            try:
                from flare_utils.study.index_report import write_index
                path = write_index(run.root)
                rlog(f"index report: {path}")
            except Exception as e:          # the report must never hide the stage's own error
                rlog(f"index report not written: {type(e).__name__}: {e}")
        rlog.close()
    return results


def main_progress_stream() -> TextIO | None:
    """Progress bars on an interactive terminal only (CI logs stay readable)."""
    return sys.stderr if sys.stderr.isatty() else None
