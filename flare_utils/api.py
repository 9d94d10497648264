"""The one-call Python API for the common cases; the command line calls the same functions.

    from flare_utils import segment, evaluate, run_study
    seg = segment("ct.nii.gz", "ct_labels.nii.gz", "runs/demo/models/student_selected")
    scores = evaluate("predictions/", "labelsTs/")
    results = run_study("params/demo.yaml")
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd

from flare_utils.errors import FlareInputError

from flare_utils.inference.case_report import EFFICIENCY_DIR
from flare_utils.inference.defaults import DEFAULT_CENTRE_THRESHOLD, DEFAULT_INPLANE_GRID, DEFAULT_INPLANE_STEP

__all__ = ["Segmentation", "segment", "evaluate", "run_study"]

_NIFTI = (".nii.gz", ".nii")


@dataclass
class Segmentation:
    """What `segment` made: the written label files, one efficiency row per case, and (one file in)
    the label map itself."""
    paths: dict[str, Path]                       # case id -> written label map
    report: pd.DataFrame                         # one row per case (windows, phase times, peak RAM)
    label: Any = None                            # the uint8 label array (single-file input only)
    failed: dict[str, str] = field(default_factory=dict)     # case id -> error (folder input, keep_going)
    skipped: list[str] = field(default_factory=list)         # cases whose output existed (folder input)

    def images(self) -> dict[str, Any]:
        """The label maps as nibabel images (loaded lazily, one per case)."""
        import nibabel as nib
        return {case: nib.load(str(p)) for case, p in self.paths.items()}


def segment(input: str | Path, output: str | Path, model: str | Path, *, folds: Sequence[int | str] | str | None = (0,),
            mode: str = "efficient", tta: bool = False, device: str = "auto",
            spacing: Sequence[float] | None = None, centre_threshold: int = DEFAULT_CENTRE_THRESHOLD,
            inplane_step: float = DEFAULT_INPLANE_STEP, inplane_grid: str = DEFAULT_INPLANE_GRID,
            backend: str = "torch",
            overwrite: bool = False, keep_going: bool = False,
            checkpoint: str = "checkpoint_final.pth", client=None) -> Segmentation:
    """Segment a NIfTI CT (or every NIfTI of a folder) with a trained nnU-Net v2 results folder.

    A file goes to `output` when that ends in .nii/.nii.gz, else to `output/<case>.nii.gz`, the case
    being the file's whole name without .nii.gz/.nii (`patient_0001.nii.gz` -> `patient_0001`) minus
    only nnU-Net's channel suffix `_0000` (`ct_0000.nii.gz` -> `ct`); a folder's images go to
    `output/<case>.nii.gz`, named by the same rule (resumable: existing outputs are kept unless
    `overwrite`). Efficiency
    reports go to `<output folder>/efficiency/`. `folds`: one, several (ensemble), "all" or None (every
    trained fold); `mode`: "efficient" (the FLARE22 winner's sliding window) or "full" (nnU-Net's);
    `inplane_grid`: efficient mode's in-plane windows, "paper" (3x3) or "adaptive" (spread over a
    body wider than the paper's band). `backend`: "torch", or on the CPU "openvino" / "onnx" (the network
    run by OpenVINO / ONNX Runtime, optional packages; `flare_utils.inference.backends`).
    `client`: a `distributed.Client` (`flare_utils.distributed.open_cluster`): a folder's cases are
    predicted on its workers, one task per case (the same files); one image is predicted here.
    """
    from flare_utils.data.io import case_id_from_path
    from flare_utils.inference.folder import done_report
    from flare_utils.inference.predictor import EfficientPredictor

    input, output = Path(input), Path(output)
    if not input.exists():
        raise FlareInputError(input, "input image or folder not found")
    if isinstance(folds, (str, int)):
        folds = [folds]
    if folds is not None:
        folds = "all" if [str(f) for f in folds] == ["all"] else [int(f) for f in folds]
    options = dict(checkpoint=checkpoint, mode=mode, tta=tta, device=device, spacing=spacing,
                   centre_threshold=centre_threshold, inplane_step=inplane_step, inplane_grid=inplane_grid)
    if backend != "torch":        # CPU only: OpenVINO / ONNX Runtime (flare_utils.inference.backends)
        options["backend"] = backend
    if input.is_dir() and output.name.endswith(_NIFTI):
        raise FlareInputError(output, "a folder of images needs an output folder, not a NIfTI file name")
    p = None
    if not (input.is_dir() and client is not None):
        p = EfficientPredictor.from_results_folder(model, folds=folds, **options)
    if input.is_dir():
        on_error = "skip" if keep_going else "raise"
        if p is None:
            from flare_utils.inference.cluster_folder import predict_folder_on_cluster
            df = predict_folder_on_cluster(client, model, input, output, folds=folds, options=options,
                                           overwrite=overwrite, on_error=on_error)
        else:
            df = p.predict_folder(input, output, overwrite=overwrite, on_error=on_error)
        failed = {r["case_id"]: r["error"] for _, r in df.iterrows()
                  if "error" in df and isinstance(r.get("error"), str)}
        skipped = [r["case_id"] for _, r in df.iterrows() if bool(r.get("skipped_existing", False))]
        paths = {c: output / f"{c}.nii.gz" for c in df["case_id"] if c not in failed}
        return Segmentation(paths, df, failed=failed, skipped=skipped)
    input_case = case_id_from_path(input, channel_suffix=True)      # names the efficiency report
    target = output if output.name.endswith(_NIFTI) else output / f"{input_case}.nii.gz"
    case = case_id_from_path(target)
    done = None if overwrite else done_report(target.parent / EFFICIENCY_DIR / f"{input_case}.json",
                                               p.producer_key(), input, target)
    if done is not None:             # this model, with these settings, already made it from this input
        done.skipped_existing = True
        return Segmentation({case: target}, pd.DataFrame([done.to_row()]), skipped=[case])
    label, rep = p.predict_case(input, target, case_id=input_case, report_dir=target.parent / EFFICIENCY_DIR)
    return Segmentation({case: target}, pd.DataFrame([rep.to_row()]), label=label)


def evaluate(predictions: str | Path, ground_truth: str | Path, output: str | Path | None = None, *,
             revision: str = "2022", hd95: bool = False, processes: int = 2,
             cases: Iterable[str] | None = None, allow_missing: bool = False, strict: bool = False, client=None):
    """FLARE22 DSC/NSD (official rules) of every ground-truth case against `predictions/<case>.nii.gz`.

    Returns the `EvaluationResult` (per-case table `.per_case`, `.summary`); with `output` the CSV and
    summary JSON are written there. Label values outside 0-13 count as background (official rule) with
    a warning and counts in the summary; `strict` refuses them. `client`: a `distributed.Client`: one
    task per case on its workers instead of `processes` local processes (the same results)."""
    from flare_utils.evaluation.evaluate import evaluate_folders
    return evaluate_folders(predictions, ground_truth, output, revision=revision, hd95=hd95, processes=processes,
                            cases=cases, allow_missing=allow_missing, strict=strict, client=client)


def run_study(params: str | Path | Mapping[str, Any], *, run_dir: str | Path | None = None,
              start_from: str | None = None, only: Iterable[str] | str | None = None,
              log: Callable[[str], None] | None = print, **kwargs):
    """Run a study (a params YAML file, or the same as a mapping) into its run folder: every stage
    notebook in pipeline order, complete stages skipped. Returns one `StageResult` per unit."""
    from flare_utils.study.runner import run_study as _run
    return _run(params, run_dir=run_dir, start_from=start_from, only=only, log=log, **kwargs)
