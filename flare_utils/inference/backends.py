"""Optional CPU inference backends for the sliding window's network: OpenVINO and ONNX Runtime.

`EfficientPredictor(..., backend="openvino" | "onnx")` (CLI `--backend`) exports each loaded network
once to ONNX (`torch.onnx.export`, fixed input 1 x 1 x patch, opset 17) and runs the windows through
OpenVINO (CPU plugin, latency hint, one stream, f32 inference precision) or ONNX Runtime
(CPUExecutionProvider), with as many threads as torch uses (`torch.get_num_threads()`). Everything
else (grid, Gaussian, argmax, resampling, writing) is the torch code of the default backend.

Neither package is a dependency of the project: `pip install openvino` / `pip install onnxruntime onnx`.
The logits differ from torch's by float32 rounding of a different kernel order (max abs difference
about 1e-2 on logits up to 20 for the real `efficient` plan with random weights); measurement and
label agreement in docs/benchmarks.md ("Real-size efficient plan on CPU").
"""
from __future__ import annotations

import contextlib
import copy
import io
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from flare_utils.errors import FlareInputError

__all__ = ["BACKENDS", "ExportedNetwork", "export_onnx", "wrap_networks"]

BACKENDS = ("torch", "openvino", "onnx")
_PACKAGES = {"openvino": "openvino", "onnx": "onnxruntime onnx"}


def export_onnx(net: torch.nn.Module, patch: Sequence[int], path: str | Path, in_channels: int = 1) -> Path:
    """Export `net` (eval, float32, CPU) to ONNX with the fixed input shape 1 x in_channels x patch.
    A forward patched onto the network's layers (`use_onednn_convolutions`) is removed from the copy
    that is exported."""
    net = copy.deepcopy(net).cpu().float().eval()
    for m in net.modules():
        m.__dict__.pop("forward", None)
    x = torch.zeros((1, in_channels, *(int(p) for p in patch)))
    path = Path(path)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), input_names=["x"], output_names=["logits"], opset_version=17,
                          dynamo=False)
    return path


class ExportedNetwork(torch.nn.Module):
    """A torch Module whose forward runs the exported network in `backend` (float32 in, float32 out,
    on the CPU). Inputs of batch > 1 are run one window at a time (the export's batch is 1)."""

    def __init__(self, net: torch.nn.Module, patch: Sequence[int], backend: str, threads: int | None = None,
                 in_channels: int = 1):
        super().__init__()
        if backend not in BACKENDS or backend == "torch":
            raise FlareInputError(None, f"backend must be one of {BACKENDS[1:]} here, got {backend!r}")
        self.backend = backend
        self.patch = tuple(int(p) for p in patch)
        self.threads = int(threads or torch.get_num_threads())
        try:
            if backend == "openvino":
                import openvino as ov
            else:
                import onnx  # noqa: F401  (torch.onnx.export needs it)
                import onnxruntime as ort
        except ImportError as e:
            raise FlareInputError(None, f"backend {backend!r} needs the package(s) {_PACKAGES[backend]} "
                                        f"(pip install {_PACKAGES[backend]}): {e}") from e
        with tempfile.TemporaryDirectory(prefix="flare_onnx_") as tmp:
            f = export_onnx(net, self.patch, Path(tmp) / "net.onnx", in_channels)
            if backend == "openvino":
                core = ov.Core()
                cfg = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
                       "INFERENCE_NUM_THREADS": str(self.threads), "INFERENCE_PRECISION_HINT": "f32"}
                self._compiled = core.compile_model(core.read_model(str(f)), "CPU", cfg)
                self._request = self._compiled.create_infer_request()
                self.version = ov.__version__
            else:
                so = ort.SessionOptions()
                so.intra_op_num_threads = self.threads
                so.inter_op_num_threads = 1
                so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                self._session = ort.InferenceSession(f.read_bytes(), so, providers=["CPUExecutionProvider"])
                self.version = ort.__version__

    def _run(self, a: np.ndarray) -> np.ndarray:
        if self.backend == "openvino":
            return np.asarray(self._request.infer({0: a})[0])
        return self._session.run(None, {"x": a})[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.patch:
            raise ValueError(f"{self.backend} backend: window {tuple(x.shape[2:])} is not the exported patch "
                             f"{self.patch}")
        a = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        ys = [self._run(a[i:i + 1]) for i in range(a.shape[0])]
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(ys) if len(ys) > 1 else ys[0],
                                                     dtype=np.float32))


def wrap_networks(networks: Sequence[torch.nn.Module], patch: Sequence[int], backend: str,
                  threads: int | None = None, in_channels: int = 1) -> list[torch.nn.Module]:
    """The networks as run by `backend` ("torch": unchanged)."""
    if backend not in BACKENDS:
        raise FlareInputError(None, f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return list(networks)
    return [ExportedNetwork(n, patch, backend, threads, in_channels) for n in networks]
