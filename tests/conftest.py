"""Shared fixtures: where the real CT test data lives, and skipping when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the project checkout (FLARE_SHARED_DATA overrides, e.g. on other machines).
SHARED_DATA = Path(os.environ.get("FLARE_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "real_ct" / "ct.nii.gz").exists():
        pytest.skip(f"real CT test data not found at {SHARED_DATA} (expected ../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_ct(shared_data) -> Path:
    return shared_data / "real_ct"


@pytest.fixture(scope="session")
def real_dicom_series(shared_data) -> Path:
    p = shared_data / "real_dicom" / "series"
    if not p.is_dir():
        pytest.skip(f"real DICOM series not found at {p}")
    return p
