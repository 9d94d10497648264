"""flare_utils: FLARE22 semi-supervised abdominal organ segmentation on nnU-Net v2.

The common cases in one call (the command line `flare-study` calls the same functions):

    from flare_utils import segment, evaluate, run_study
    seg = segment("ct.nii.gz", "ct_labels.nii.gz", "runs/demo/models/student_selected")
    scores = evaluate("predictions/", "labelsTs/")
    results = run_study("params/demo.yaml")

The stages live in one subpackage each: `data` (conversion), `synthetic` (phantom cohort),
`planning`, `training`, `semisup` (pseudo-label rounds and selection), `inference`, `evaluation`,
`study` (params, runner, reports, CLI); `layout.RunLayout` names every path of a run.
"""
__version__ = "0.1.0"

__all__ = ["segment", "evaluate", "run_study", "Segmentation", "__version__"]


def __getattr__(name):          # light to import: torch and nnU-Net load on first use
    if name in ("segment", "evaluate", "run_study", "Segmentation"):
        from flare_utils import api
        return getattr(api, name)
    raise AttributeError(f"module 'flare_utils' has no attribute {name!r}")
