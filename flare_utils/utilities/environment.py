"""Environment variables set for a block and restored afterwards.

nnU-Net and the FLARE trainers read settings from the environment (the trainer configuration file,
augmentation worker counts, the progress file); this sets them for exactly one block.
"""
from __future__ import annotations

import contextlib
import os


def _apply(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def environment(**values: str | None):
    """Set (or, for None, unset) environment variables for a block; restore them afterwards."""
    old = {k: os.environ.get(k) for k in values}
    try:
        _apply(values)
        yield
    finally:
        _apply(old)
