"""Shared fixtures of the inference tests (import them into a test module to use them).

`tiny_model`: a real nnU-Net v2 results folder, trained once on tiny phantom cases with the stock
nnU-Net trainer on a short schedule (`tests/demo_model.py`, about a minute on 2 CPU cores),
with fold 0, a perturbed copy as fold 1 and another as fold "all". It is cached in pytest's cache
folder (`.pytest_cache/d/flare_inference_tiny_model`) and reused by later sessions while the
training request is unchanged.
`tiny_cases`: a few tiny phantom CT cases (images + ground truth) that the model never saw.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

MODEL_REQUEST = dict(dataset_id=951, name="InferenceTiny", n_cases=6, preset="tiny",
                     fov=("abdomen", "whole_body", "chest_abdomen_pelvis"), variant="tiny",
                     patch_zyx=(16, 32, 32), spacing_zyx=(8.0, 6.0, 6.0), epochs=20, iterations=50,
                     extra_folds=(1, "all"), oversample_foreground=0.66, n_conv=2, seed=0)


def _cache_dir(request, tmp_path_factory, name: str) -> Path:
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir(name))
    return tmp_path_factory.mktemp(name)


@pytest.fixture(scope="session")
def tiny_model(request, tmp_path_factory) -> Path:
    from demo_model import train_demo_model
    run_dir = _cache_dir(request, tmp_path_factory, "flare_inference_tiny_model")
    return train_demo_model(run_dir, **MODEL_REQUEST)


@pytest.fixture(scope="session")
def tiny_cases(tmp_path_factory) -> Path:
    """images/<id>_0000.nii.gz and labels/<id>.nii.gz: abdomen, whole body, chest-abdomen-pelvis."""
    from flare_utils.synthetic.phantom import generate_case
    root = tmp_path_factory.mktemp("tiny_cases")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for i, fov in enumerate(("abdomen", "whole_body", "chest_abdomen_pelvis")):
        c = generate_case(500 + i, "tiny", fov=fov)
        c.label = c.label.astype(np.uint8)
        c.save(root / "images" / f"case{i}_0000.nii.gz", root / "labels" / f"case{i}.nii.gz")
    return root
