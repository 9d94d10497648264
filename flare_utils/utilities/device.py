"""Which torch device to run on: one rule for training and inference.

"auto" picks the best device this machine has (CUDA, then Apple's MPS, then the CPU); a device
asked for by name must exist, so a typo or a missing GPU fails at once with a clear message
instead of deep inside torch.
"""
from __future__ import annotations

import torch

from flare_utils.errors import FlareInputError

__all__ = ["DEVICE_NAMES", "resolve_device"]

DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")      # and "cuda:N"


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _available(kind: str) -> bool:
    return {"cpu": True, "cuda": torch.cuda.is_available(), "mps": _mps_available()}.get(kind, False)


def resolve_device(device: str | torch.device = "auto", passed: str | torch.device | None = None) -> torch.device:
    """The torch device for `device`: "auto", "cpu", "cuda", "cuda:N", "mps" or a torch.device.

    "auto": the kind of `passed` (the device a caller was handed, e.g. the one nnU-Net gives a
    trainer) when this machine has it, else cuda, then mps, then cpu. Any other name, or a device
    this machine does not have, is a FlareInputError.
    """
    name = str(device)
    if name == "auto":
        want = torch.device(passed).type if passed is not None else "cuda"
        for kind in (want, "cuda", "mps"):
            if _available(kind):
                return torch.device(kind)
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise FlareInputError(None, f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    if not _available(kind):
        raise FlareInputError(None, f"device {name!r} requested but not available on this machine")
    if index and int(index) >= torch.cuda.device_count():
        raise FlareInputError(None, f"device {name!r} requested but not available on this machine "
                                    f"({torch.cuda.device_count()} CUDA device(s))")
    return torch.device(name)
