"""Transfer learning helpers: initialise a network from a checkpoint, freeze encoder stages.

Both work on nnU-Net's `PlainConvUNet` / `ResidualEncoderUNet` (network.encoder.stages) and on
wrapped networks (torch.compile's OptimizedModule, DDP), and need no trainer.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from flare_utils.errors import FlareInputError

_PREFIXES = ("module.", "_orig_mod.")


def unwrap(network: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(network, "_orig_mod"):
            network = network._orig_mod
        elif isinstance(network, nn.parallel.DistributedDataParallel):
            network = network.module
        else:
            return network


@dataclass
class TransferReport:
    """What `load_transfer_weights` did, parameter (state-dict key) by key."""
    source: str
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)      # target key -> reason
    unused: list[str] = field(default_factory=list)            # source keys not in the target

    @property
    def n_loaded(self) -> int:
        return len(self.loaded)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def summary(self) -> str:
        return (f"transfer init from {self.source}: {len(self.loaded)} tensors loaded, {len(self.skipped)} skipped"
                + (f" (e.g. {next(iter(self.skipped.items()))})" if self.skipped else "")
                + f", {len(self.unused)} source tensors unused")


def read_state_dict(checkpoint: str | Path | Mapping) -> dict[str, torch.Tensor]:
    """Network weights from an nnU-Net checkpoint (`network_weights`), a {'state_dict': ...}
    file or a plain state dict; 'module.'/'_orig_mod.' prefixes removed."""
    if isinstance(checkpoint, Mapping):
        ck, where = checkpoint, None
    else:
        where = Path(checkpoint)
        if not where.is_file():
            raise FlareInputError(where, "checkpoint not found")
        try:
            ck = torch.load(where, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unreadable file
            raise FlareInputError(where, f"not a readable torch checkpoint ({type(e).__name__}: {e})") from e
    for key in ("network_weights", "state_dict", "model"):
        if isinstance(ck, Mapping) and key in ck and isinstance(ck[key], Mapping):
            ck = ck[key]
            break
    if not isinstance(ck, Mapping) or not all(isinstance(v, torch.Tensor) for v in ck.values()):
        raise FlareInputError(where, "no network state dict found (expected an nnU-Net checkpoint with "
                                     "'network_weights' or a plain state dict)")
    out = {}
    for k, v in ck.items():
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def load_transfer_weights(network: nn.Module, checkpoint: str | Path | Mapping,
                          exclude: Iterable[str] = ()) -> TransferReport:
    """Copy every tensor whose key and shape match from `checkpoint` into `network`.

    Keys containing one of `exclude` (e.g. ".seg_layers." for new heads) are not loaded;
    mismatching shapes (a head with another number of classes) are skipped and reported.
    """
    exclude = tuple(exclude)
    src = read_state_dict(checkpoint)
    net = unwrap(network)
    target = net.state_dict()
    report = TransferReport(source=str(checkpoint) if not isinstance(checkpoint, Mapping) else "<state dict>")
    new_state = {}
    for k, t in target.items():
        if any(e in k for e in exclude):
            report.skipped[k] = "excluded"
        elif k not in src:
            report.skipped[k] = "missing in checkpoint"
        elif tuple(src[k].shape) != tuple(t.shape):
            report.skipped[k] = f"shape {tuple(src[k].shape)} in checkpoint, {tuple(t.shape)} in network"
        else:
            new_state[k] = src[k].to(dtype=t.dtype)
            report.loaded.append(k)
    report.unused = sorted(set(src) - set(target))
    if not report.loaded:
        raise FlareInputError(report.source, "no tensor of the checkpoint fits this network "
                                             "(different architecture?)")
    net.load_state_dict(new_state, strict=False)
    return report


def encoder_stages(network: nn.Module) -> nn.ModuleList | nn.Sequential:
    net = unwrap(network)
    enc = getattr(net, "encoder", None)
    stages = getattr(enc, "stages", None)
    if stages is None:
        raise FlareInputError(None, f"{type(net).__name__} has no encoder.stages; cannot freeze encoder stages")
    return stages


def freeze_encoder_stages(network: nn.Module, n: int) -> list[str]:
    """Set requires_grad=False on the first `n` encoder stages (and the stem, if any).

    Returns the names of the frozen parameters. Frozen parameters must also be left out of the
    optimizer (FlareTrainer.configure_optimizers does) so weight decay cannot change them.
    """
    if n <= 0:
        return []
    stages = encoder_stages(network)
    if n > len(stages):
        raise FlareInputError(None, f"cannot freeze {n} encoder stages: the network has {len(stages)}")
    net = unwrap(network)
    frozen_ids = set()
    stem = getattr(net.encoder, "stem", None)
    modules = ([stem] if stem is not None else []) + [stages[i] for i in range(n)]
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)
            frozen_ids.add(id(p))
    return [name for name, p in net.named_parameters() if id(p) in frozen_ids]
