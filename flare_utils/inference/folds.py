"""Which folds of an nnU-Net results folder to predict with.

Folds come from users (command line, params, notebooks) as ints, digit strings or "all"; they are
checked and normalised once here, and `available_folds` lists the folds that have a checkpoint.
"""
from __future__ import annotations

from pathlib import Path

from flare_utils.errors import FlareInputError

__all__ = ["normalise_folds", "available_folds"]


def normalise_folds(folds) -> tuple | None:
    """Folds as a tuple of ints and/or 'all' (None stays None); bad values are FlareInputErrors."""
    if folds is None:
        return None
    if isinstance(folds, (str, int)):
        folds = [folds]
    out = []
    for f in folds:
        if isinstance(f, str) and f != "all":
            if not f.isdigit():
                raise FlareInputError(None, f"fold {f!r} is not an integer or 'all'")
            f = int(f)
        out.append(f)
    if not out:
        raise FlareInputError(None, "no folds given")
    return tuple(out)


def available_folds(model_dir: str | Path, checkpoint: str = "checkpoint_final.pth") -> list:
    """The folds of `model_dir` whose `fold_<f>/<checkpoint>` exists, in folder-name order: ints
    for `fold_<N>`, the name as a string otherwise (e.g. "all")."""
    out = []
    for p in sorted(Path(model_dir).glob("fold_*")):
        if (p / checkpoint).is_file():
            s = p.name[len("fold_"):]
            out.append(int(s) if s.isdigit() else s)
    return out
