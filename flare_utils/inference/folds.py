"""Which folds of an nnU-Net results folder to predict with.

Folds come from users (command line, params, notebooks) as ints, digit strings or "all"; they are
checked and normalised once here, and `available_folds` lists the folds that have a checkpoint.
`model_identity` names what a model predicts with (its files' content, wherever the folder lies), so
that outputs can say which model made them and resumable work can tell its own outputs from others'.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from flare_utils.errors import FlareInputError

__all__ = ["normalise_folds", "available_folds", "model_identity", "file_sha256"]

_SHA256: dict[tuple[str, int, int], str] = {}


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


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's content (remembered per path, size and modification time in this process)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def model_identity(model_dir: str | Path, folds, checkpoint: str = "checkpoint_final.pth") -> str:
    """A short key of a model as it predicts: the content of plans.json, dataset.json and the
    checkpoint of each fold in `folds`. A retrained (or other) model gets another key; a copied or
    moved folder keeps it."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    for name in ("plans.json", "dataset.json"):
        if (model_dir / name).is_file():
            h.update(f"{name}:{file_sha256(model_dir / name)};".encode())
    for f in normalise_folds(folds) or ():
        ck = model_dir / f"fold_{f}" / checkpoint
        h.update(f"fold_{f}:{file_sha256(ck) if ck.is_file() else 'missing'};".encode())
    return h.hexdigest()[:16]
