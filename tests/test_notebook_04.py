"""notebooks/04_selection.ipynb end to end (papermill) on three rounds of synthetic pseudo labels.

The rounds are made by `flare_utils.semisup.rounds.predict_round` with a stand-in predictor that returns
each case's ground truth with a case-specific share of its foreground voxels dropped at random
(independently per round): case i drops about 2.5*i % of them, so unstable cases are also the worse
ones, which the notebook's check (Spearman of u with 1 - DSC) must find.
"""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

pm = pytest.importorskip("papermill")

from flare_utils.semisup import rounds as pseudo  # noqa: E402
from flare_utils.data.io import save_nifti_like  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "04_selection.ipynb"
N_CASES = 8


class NoisyTruth:
    def __init__(self, truth_dir: Path, k: int):
        self.truth_dir, self.k = truth_dir, k

    def predict_case(self, image, output=None, case_id=None):
        img = nib.load(str(image))
        truth = np.asarray(nib.load(str(self.truth_dir / f"{case_id}.nii.gz")).dataobj).astype(np.uint8)
        i = int(case_id.split("_")[-1]) - 1
        rng = np.random.default_rng(1000 * self.k + i)
        drop = (truth > 0) & (rng.random(truth.shape) < 0.025 * i)
        lab = np.where(drop, 0, truth).astype(np.uint8)
        save_nifti_like(lab, img, output)
        return lab, None


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    from flare_utils.synthetic.phantom import write_cohort
    run_dir = tmp_path_factory.mktemp("nb04") / "run"
    cohort = write_cohort(run_dir / "synthetic_cohort", 0, N_CASES, 0, preset="tiny", fov_mix="abdomen", seed=7)
    images = cohort.root / "Training" / "FLARE22_UnlabeledCase"
    truth = cohort.root / "SyntheticTruth" / "unlabelled_labels"
    model = run_dir / "model"
    for k in (1, 2, 3):
        pseudo.predict_round(run_dir, k, model, images, folds=["all"],
                             predictor_factory=lambda *a, k=k: NoisyTruth(truth, k))
    out_nb = run_dir.parent / "04_selection.out.ipynb"
    pm.execute_notebook(str(NOTEBOOK), str(out_nb), kernel_name="python3", progress_bar=False,
                        parameters={"run_dir": str(run_dir), "threshold": 0.1, "n_show": 2, "processes": 1})
    return run_dir, out_nb


@pytest.mark.e2e
def test_scores_and_selection_file(executed):
    from flare_utils.semisup.selection_file import read_selection_file
    run_dir, _ = executed
    out = run_dir / "selection"
    scores = pd.read_csv(out / "stability_scores.csv", index_col="case")
    assert len(scores) == N_CASES
    assert scores.at["Case_00001", "u"] == 0.0                       # the exact truth in every round
    assert scores["u"].is_monotonic_increasing                       # rank order
    assert list(scores.index[:3]) == ["Case_00001", "Case_00002", "Case_00003"]
    selected = list(scores.index[scores["selected"]])
    assert selected and len(selected) < N_CASES
    assert (scores.loc[selected, "u"] < 0.1).all() and (scores.loc[~scores["selected"], "u"] >= 0.1).all()
    sel = read_selection_file(out / "selection.json")
    assert list(sel.cases) == selected
    assert sel.labels_folder == pseudo.round_dir(run_dir, 3).resolve()
    assert sel.images_folder.name == "FLARE22_UnlabeledCase"
    summary = json.loads((out / "selection_summary.json").read_text())
    assert summary["n_selected"] == len(selected) and summary["rule"]["threshold"] == 0.1


@pytest.mark.e2e
def test_stable_cases_have_better_pseudo_labels(executed):
    run_dir, _ = executed
    stats = json.loads((run_dir / "selection" / "selection_vs_truth.json").read_text())
    assert stats["n_cases"] == N_CASES
    assert stats["spearman_rho"] > 0.8
    assert stats["mean_quality_selected"] > stats["mean_quality_rejected"]


@pytest.mark.e2e
def test_figures(executed):
    run_dir, out_nb = executed
    out = run_dir / "selection"
    assert (out / "u_histogram.png").stat().st_size > 1000
    assert (out / "u_vs_dsc.png").stat().st_size > 1000
    overlays = sorted(p.name for p in out.glob("overlay_*.png"))
    assert len(overlays) == 4
    assert sum(n.startswith("overlay_most_stable") for n in overlays) == 2
    nb = nbformat.read(str(out_nb), as_version=4)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 6                    # histogram, 4 overlays, u vs DSC


def test_stored_notebook_is_clean_and_parameterised():
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    for name in ("run_dir", "rounds", "images_dir", "threshold", "fraction", "labels_round", "exclude_empty",
                 "truth_dir", "out_dir", "n_show", "processes"):
        assert f"{name} =" in code[0].source
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
