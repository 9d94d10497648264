"""What a stage notebook needs to open on a run: its parameters, and protection of finished runs.

Papermill (the runner) injects every parameter of a stage and `replace=True`. Opened by hand in
JupyterLab, a notebook has its defaults: `run_dir` names a run folder and every parameter left at
None is taken from that run's own `params.yaml`, exactly as the runner would pass it. A stage the run
has already completed is then shown from its files, never redone over them, unless `replace=True`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from flare_utils.errors import FlareInputError
from flare_utils.layout import PROJECT_ROOT, RunLayout


def resolve_run_dir(run_dir: str | Path | None, stage: str) -> RunLayout:
    """The run a stage notebook works on. A relative `run_dir` is relative to the project root (so
    "runs/demo" means the same folder from a notebook, the command line and the params files).
    An empty `run_dir` stops at once with the parameter to set."""
    if not run_dir:
        raise FlareInputError(None, f"set run_dir in the parameters cell to a run folder, e.g. run_dir = "
                                    f"\"runs/demo\" after `bash scripts/demo.sh` (the {stage} stage reads that "
                                    "run's params.yaml for everything else)")
    p = Path(run_dir).expanduser()
    return RunLayout(p if p.is_absolute() else PROJECT_ROOT / p)


def _recorded(run: RunLayout, stage: str, variant: str | None) -> tuple[str, dict[str, Any]]:
    """(unit name, what the runner passes to it) for `stage` on `run`, from the run's params.yaml;
    `variant` None: the stage's first unit (the study's student for "student")."""
    from flare_utils.study.params import load_params
    from flare_utils.study.runner import plan_units

    params = load_params(run.params_file, {"run_dir": str(run.root)})
    units = [u for u in plan_units(params, run) if u.stage == stage]
    if variant is not None:
        units = [u for u in units if u.name == f"{stage}:{variant}"]
    if not units:
        raise FlareInputError(run.params_file, f"this run has no '{stage}' stage"
                                               + (f" with variant '{variant}'" if variant else ""))
    return units[0].name, {**units[0].parameters(), "run_dir": str(run.root)}


def _given(given: Mapping[str, Any]) -> dict[str, Any]:
    """The values set in `given` (not None)."""
    return {k: v for k, v in given.items() if v is not None}


def is_complete(run: RunLayout, unit_name: str) -> bool:
    """Whether the runner recorded `unit_name` ("teacher", "student:selected") as complete in `run`."""
    return (run.markers / f"{unit_name.replace(':', '__')}.json").is_file()


@dataclass
class OpenedStage:
    """A stage notebook's view of its run: the parameters to use and whether to only show results."""
    run: RunLayout
    parameters: dict[str, Any]           # every parameter of the stage (given values win over the run's)
    show_only: bool                      # the run completed this stage and nothing asks to redo it

    def arguments(self, *drop: str) -> dict[str, Any]:
        """The parameters without the notebook-only ones (`replace` and `drop`)."""
        return {k: v for k, v in self.parameters.items() if k not in ("replace", *drop)}


def open_stage(stage: str, given: Mapping[str, Any], *, variant: str | None = None,
               output_keys: tuple[str, ...] = (), new_run_params: str | Path | None = None) -> OpenedStage:
    """Open `stage` on the run `given["run_dir"]` for a notebook (see the module docstring).

    Parameters given as None come from the run's params.yaml, as the runner would pass them. In a
    folder without params.yaml (a notebook run by hand or by a test with all its parameters) the
    values given are used and the stage function's defaults for the others. With `new_run_params`
    (notebook 01: params/smoke.yaml) such a folder becomes a run of that study instead, so the later
    notebooks open it by `run_dir` alone.

    On a run that completed the stage, without `replace=True`: the notebook only shows the stage's
    files (`show_only`), unless a value in `output_keys` (e.g. `out_dir`) sends the outputs to another
    folder; a changed setting without such a folder is refused, so a finished run is never silently
    rewritten."""
    from flare_utils.utilities.processes import guard_kernel_process_group
    guard_kernel_process_group()         # in a kernel: its workers die with it or with the runner
    run = resolve_run_dir(given.get("run_dir"), stage)
    values = _given(given)
    if not run.params_file.is_file() and new_run_params is not None:
        _start_run(run, new_run_params)
    if not run.params_file.is_file():
        if not any(k not in ("run_dir", "replace") for k in values):
            raise FlareInputError(run.root, f"not a run folder (no {run.params_file.name}): give the run_dir of a "
                                            "run that `flare-study run` made, or set this stage's parameters")
        return OpenedStage(run, {**values, "run_dir": str(run.root)}, False)
    unit, recorded = _recorded(run, stage, variant)
    opened = OpenedStage(run, {**recorded, **values, "run_dir": str(run.root)}, False)
    if given.get("replace") or not is_complete(run, unit) or any(given.get(k) for k in output_keys):
        return opened
    changed = sorted(k for k, v in values.items() if k not in ("run_dir", "replace") and recorded.get(k) != v)
    if changed:
        where = f"; or send the outputs elsewhere with {' / '.join(output_keys)}" if output_keys else ""
        raise FlareInputError(run.root, f"this run's {unit} stage is complete with other settings ({', '.join(changed)}): "
                                        f"set replace = True to redo it and rewrite its outputs{where}")
    opened.show_only = True
    return opened


def _start_run(run: RunLayout, params_file: str | Path) -> None:
    """Make `run` a run of the study `params_file` (its params.yaml, with this run_dir)."""
    import yaml

    from flare_utils.data.io import atomic_write_text
    from flare_utils.study.params import load_params

    params = load_params(params_file, {"run_dir": str(run.root)})
    atomic_write_text(run.params_file, yaml.safe_dump(params.to_dict(), sort_keys=False))
