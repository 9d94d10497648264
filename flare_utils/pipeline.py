"""Runs a study: each stage is a parameterised notebook executed by papermill into the run folder.

The runner owns orchestration only (which notebook, which parameters, where the output goes,
HTML rendering, stopping at the first failure). The science lives in the notebooks' calls into
flare_utils.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import FlareInputError
from .io import atomic_write_text
from .params import StudyParams, load_params
from .paths import NOTEBOOK_DIR, RunLayout, nnunet_env


@dataclass(frozen=True)
class Stage:
    name: str
    notebook: str                                    # file name in notebooks/
    parameters: Callable[[StudyParams, RunLayout], dict[str, Any]]


def _common(p: StudyParams, run: RunLayout) -> dict[str, Any]:
    return {"run_dir": str(run.root), "seed": p.seed, "device": p.device}


def _convert_parameters(p: StudyParams, run: RunLayout) -> dict[str, Any]:
    d = dataclasses.asdict(p.data)
    return {**_common(p, run), **d}


def _none_to_empty(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    """Notebook parameters use "" for 'not given' where the params file uses null."""
    return {**d, **{k: (d[k] if d[k] is not None else "") for k in keys}}


def _teacher_parameters(p: StudyParams, run: RunLayout) -> dict[str, Any]:
    t = _none_to_empty(dataclasses.asdict(p.teacher), "init_checkpoint")
    return {**_common(p, run), "dataset_id": p.data.dataset_id, "processes": p.data.processes, **t}


def _student_parameters(p: StudyParams, run: RunLayout) -> dict[str, Any]:
    s = dataclasses.asdict(p.student)
    if s["selection_file"] is None and "select" in p.stages:
        s["selection_file"] = str(run.root / "selection" / "selection.json")
    return {**_common(p, run), "dataset_id": p.data.dataset_id, **_none_to_empty(s, "selection_file")}


def _evaluate_parameters(p: StudyParams, run: RunLayout) -> dict[str, Any]:
    e = dataclasses.asdict(p.evaluation)
    return {"run_dir": str(run.root), **e,
            "ground_truth_dir": e["ground_truth_dir"] or "", "image_dir": e["image_dir"] or ""}


STAGES: tuple[Stage, ...] = (
    Stage("convert", "01_data_conversion.ipynb", _convert_parameters),
    Stage("teacher", "02_teacher_training.ipynb", _teacher_parameters),
    Stage("student", "05_student_training.ipynb", _student_parameters),
    Stage("evaluate", "07_evaluation.ipynb", _evaluate_parameters),
)
STAGE_BY_NAME = {s.name: s for s in STAGES}


class StageFailed(RuntimeError):
    """A stage notebook raised; the message names the notebook, the cell and the partial HTML."""

    def __init__(self, stage: str, notebook: Path, html: Path | None, detail: str):
        self.stage, self.notebook, self.html, self.detail = stage, notebook, html, detail
        where = f"; partial report: {html}" if html else ""
        super().__init__(f"stage '{stage}' failed in {notebook}{where}\n{detail}")


@dataclass
class StageResult:
    name: str
    status: str          # "done" | "failed"
    seconds: float
    notebook: Path
    html: Path | None


def validate_stages(params: StudyParams) -> list[Stage]:
    unknown = [s for s in params.stages if s not in STAGE_BY_NAME]
    if unknown:
        raise FlareInputError(None, f"params.stages: unknown stage(s) {unknown}; "
                                    f"known: {[s.name for s in STAGES]}")
    order = [s.name for s in STAGES]
    return sorted((STAGE_BY_NAME[s] for s in params.stages), key=lambda s: order.index(s.name))


def render_html(notebook: Path) -> Path:
    """Render an executed notebook to HTML beside it (input cells kept: the study is readable)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    body, _ = HTMLExporter().from_notebook_node(nb)
    return atomic_write_text(notebook.with_suffix(".html"), body)


def run_stage(stage: Stage, params: StudyParams, run: RunLayout, *, kernel_name: str = "python3",
              log: Callable[[str], None] = print) -> StageResult:
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    run.notebooks.mkdir(parents=True, exist_ok=True)
    source = NOTEBOOK_DIR / stage.notebook
    out = run.notebooks / stage.notebook
    partial = out.with_name(out.stem + ".partial.ipynb")
    parameters = stage.parameters(params, run)
    env_before = dict(os.environ)
    os.environ.update(nnunet_env(run.root))     # the kernel inherits nnU-Net's folders
    t0 = time.perf_counter()
    log(f"[{stage.name}] running {stage.notebook}")
    try:
        pm.execute_notebook(str(source), str(partial), parameters=parameters, kernel_name=kernel_name,
                            cwd=str(run.root), progress_bar=False, log_output=False)
    except PapermillExecutionError as e:
        html = render_html(partial) if partial.exists() else None
        detail = (f"cell {e.cell_index} (execution count {e.exec_count}) raised "
                  f"{e.ename}: {e.evalue}")
        raise StageFailed(stage.name, partial, html, detail) from None
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    os.replace(partial, out)
    html = render_html(out)
    stale = partial.with_suffix(".html")
    if stale.exists():
        stale.unlink()
    seconds = time.perf_counter() - t0
    log(f"[{stage.name}] done in {seconds:.1f} s -> {html}")
    return StageResult(stage.name, "done", seconds, out, html)


def run_study(params_path: str | Path, *, run_dir: str | Path | None = None,
              log: Callable[[str], None] = print) -> list[StageResult]:
    """Execute the params file's stages in pipeline order; stop at the first failing one."""
    overrides = {"run_dir": str(run_dir)} if run_dir is not None else None
    params = load_params(params_path, overrides)
    stages = validate_stages(params)
    run = RunLayout(Path(params.run_dir).resolve())
    run.root.mkdir(parents=True, exist_ok=True)
    (run.root / "params.yaml").write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    results = []
    for stage in stages:
        results.append(run_stage(stage, params, run, log=log))
    summary = [{"stage": r.name, "status": r.status, "seconds": round(r.seconds, 2),
                "notebook": str(r.notebook), "html": str(r.html)} for r in results]
    (run.root / "stages.json").write_text(json.dumps(summary, indent=2))
    return results
