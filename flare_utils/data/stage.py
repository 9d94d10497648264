"""The data-conversion stage (notebook 01): a study's CT scans become the run's nnU-Net raw dataset.

The cases come from the synthetic cohort (`source="phantom"`) or a FLARE22 folder layout; the
dataset is checked with nnU-Net's own integrity check and summarised per case in `conversion/`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from flare_utils.errors import FlareInputError
from flare_utils.layout import PROJECT_ROOT, RunLayout


@dataclass
class ConversionResult:
    """What the conversion stage made: the raw dataset, its per-case summary and organ volumes."""
    run: RunLayout
    dataset_dir: Path
    summary: pd.DataFrame            # one row per case: split, shape, spacing, organ volumes (ml)
    volumes: pd.DataFrame            # per-organ volume statistics over the labelled cases
    cohort: Any                      # the synthetic cohort's CohortInfo (phantom source), else None


def convert_stage(run_dir: str | Path, *, source: str = "phantom", flare22_root: str | Path | None = None,
                  phantom: Mapping[str, Any] | None = None, dataset_id: int = 501,
                  dataset_name: str = "FLARE22Synth", link: str = "copy", processes: int = 2, seed: int = 0,
                  **_: Any) -> ConversionResult:
    """Build `<run>/nnUNet_raw/DatasetNNN_<name>` from the chosen source, check it with nnU-Net and
    write `<run>/conversion/summary.csv|json`. Sources are never modified."""
    from flare_utils.data.convert import convert_flare22, dataset_summary, verify_with_nnunet, write_summary
    from flare_utils.study import report

    run = RunLayout(run_dir).activate()
    _remove_unfinished_builds(run.nnunet_raw, f"Dataset{int(dataset_id):03d}_{dataset_name}")
    _remove_unfinished_builds(run.root, run.synthetic_data.name)
    cohort = None
    if source == "phantom":
        from flare_utils.synthetic.phantom import write_cohort
        ph = dict(phantom or {})
        cohort = write_cohort(run.synthetic_data, ph.get("n_labelled", 8), ph.get("n_unlabelled", 16),
                              ph.get("n_validation", 4), seed=ph.get("seed", seed), preset=ph.get("preset", "demo"),
                              fov_mix=ph.get("fov_mix") or None, processes=processes)
        source_root = run.synthetic_data
    elif source == "flare22":
        if not flare22_root:
            raise FlareInputError(None, "source 'flare22' needs flare22_root (the FLARE22 folder layout)")
        source_root = Path(flare22_root)
    else:
        raise FlareInputError(None, f"source must be 'phantom' or 'flare22', got {source!r}")
    converted = convert_flare22(source_root, run.nnunet_raw, dataset_id, dataset_name, link=link, processes=processes)
    verify_with_nnunet(converted.dataset_dir, processes=processes)
    summary = dataset_summary(converted.dataset_dir, processes=processes)
    write_summary(summary, run.conversion)
    return ConversionResult(run, converted.dataset_dir, summary, report.volume_table(summary), cohort)


def _remove_unfinished_builds(folder: Path, name: str) -> None:
    """Delete what a killed conversion left of `name` in `folder`: the hidden temporary folders of
    `flare_utils.data.io.atomic_directory` (`.<name>.*.partial`, `.<name>.*.old`). The run lock
    guarantees that no other conversion of this run is building them now."""
    import shutil
    for pattern in (f".{name}.*.partial", f".{name}.*.old"):
        for stale in folder.glob(pattern):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)


def load_conversion_result(run_dir: str | Path, dataset_id: int) -> ConversionResult:
    """The result of a finished conversion stage, read from its files (nothing is rewritten)."""
    from flare_utils.study import report

    run = RunLayout(run_dir)
    f = run.conversion / "summary.json"
    if not f.is_file():
        raise FlareInputError(f, "the conversion stage of this run has not finished (no summary)")
    summary = pd.DataFrame(json.loads(f.read_text()))
    return ConversionResult(run, run.raw_dataset(dataset_id), summary, report.volume_table(summary), None)



# notebook 01 in a folder that is not a run yet starts the smoke study there (a tiny synthetic cohort,
# about a minute on a CPU), so that notebooks 02-07 can follow by setting run_dir alone
NEW_RUN_PARAMS = PROJECT_ROOT / "params" / "smoke.yaml"
