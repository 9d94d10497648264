"""Making the FLARE trainers visible to nnU-Net's own trainer lookup.

nnU-Net v2 finds trainers by class name (`nnUNetv2_train -tr NAME`, and the predictor with the
`trainer_name` stored in each checkpoint) by importing every module under the
`nnunetv2.training.nnUNetTrainer` package (`recursive_find_trainer_class_by_name`). Modules
directly in that folder are searched before its sub-packages, and the sub-package `primus` needs
`timm`, which a CPU install deliberately lacks, so any lookup that reaches the sub-packages fails.
`register_with_nnunet()` therefore writes one small shim module directly into that folder,
`nnUNetTrainer_flare_utils.py` (it sorts after `nnUNetTrainer.py`, so looking up the stock
trainer never imports it). The shim imports the classes listed by `trainer_classes()`, i.e. every
nnU-Net trainer class exported (`__all__`) by the modules in `TRAINER_MODULES`; other trainer
modules (pseudo-label, noisy student, CPS) register by being added there - the shim itself never
needs rewriting. Writing is idempotent and atomic; `unregister_from_nnunet()` removes the shim.
If flare_utils is uninstalled the shim silently exports nothing.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

from flare_utils.data.io import atomic_write_text
from flare_utils.errors import FlareInputError

SHIM_MODULE = "nnUNetTrainer_flare_utils"
# Modules whose exported nnUNetTrainer subclasses nnU-Net can find by name (extension point).
TRAINER_MODULES: list[str] = ["flare_utils.training.trainers", "flare_utils.training.with_pseudo_labels",
                              "flare_utils.training.noisy_student", "flare_utils.training.cps"]

_SHIM_SOURCE = '''"""Written by flare_utils.training.register_with_nnunet(); do not edit.

Exposes the flare_utils trainers to nnU-Net's trainer lookup (nnUNetv2_train -tr NAME,
nnUNetv2_predict). Remove with flare_utils.training.unregister_from_nnunet().
"""
try:
    from flare_utils.training.registry import trainer_classes as _trainer_classes
except ModuleNotFoundError as _e:  # flare_utils not installed in this environment
    if not (_e.name or "").startswith("flare_utils"):
        raise
else:
    globals().update(_trainer_classes())
'''


def trainer_classes() -> dict[str, type]:
    """{class name: class} of every trainer exported by the modules in TRAINER_MODULES."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    out: dict[str, type] = {}
    for modname in TRAINER_MODULES:
        mod = importlib.import_module(modname)
        for name in getattr(mod, "__all__", [n for n in dir(mod) if not n.startswith("_")]):
            obj = getattr(mod, name, None)
            if isinstance(obj, type) and issubclass(obj, nnUNetTrainer) and obj is not nnUNetTrainer:
                out[name] = obj
    return out


def shim_path() -> Path:
    import nnunetv2.training.nnUNetTrainer as pkg
    return Path(pkg.__path__[0]) / f"{SHIM_MODULE}.py"


def register_with_nnunet() -> Path:
    """Write (if missing or different) the shim module into nnU-Net's trainer package."""
    path = shim_path()
    if not path.is_file() or path.read_text() != _SHIM_SOURCE:
        try:
            atomic_write_text(path, _SHIM_SOURCE)
        except OSError as e:
            raise FlareInputError(path.parent, f"cannot write the nnU-Net trainer shim ({e}); nnUNetv2_train "
                                               f"-tr Flare... needs a writable nnunetv2 installation") from e
        importlib.invalidate_caches()
        sys.modules.pop(f"nnunetv2.training.nnUNetTrainer.{SHIM_MODULE}", None)
    return path


def unregister_from_nnunet() -> bool:
    path = shim_path()
    sys.modules.pop(f"nnunetv2.training.nnUNetTrainer.{SHIM_MODULE}", None)
    if path.is_file():
        path.unlink()
        return True
    return False


def find_trainer(name: str) -> type:
    """The trainer class nnU-Net itself finds for `name` (after registering ours)."""
    register_with_nnunet()
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    try:
        return recursive_find_trainer_class_by_name(name)
    except RuntimeError as e:
        raise FlareInputError(None, f"nnU-Net trainer {name!r} not found: {e}") from e
    except ModuleNotFoundError as e:   # e.g. nnU-Net's primus trainers need timm
        raise FlareInputError(None, f"nnU-Net trainer {name!r} not found: searching nnU-Net's trainer package "
                                    f"failed importing {e.name!r} ({e})") from e
