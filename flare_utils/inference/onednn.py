"""Faster CPU inference for small 3D networks: Conv3d layers routed straight to oneDNN.

PyTorch's CPU dispatch sends a convolution to oneDNN only when, among other rules, the batch is
> 1 or N*C*D*H > 20480 (a heuristic written for 2D), so the batch-1 sliding-window patches of a
small 3D network run the slow im2col path (`slow_conv3d`). `use_onednn_convolutions` patches the
layers' forward to call `torch.mkldnn_convolution` directly on CPU (inference only); results agree
to float32 rounding. The gain measured for the project's demo network is in docs/benchmarks.md.
"""
from __future__ import annotations

import types

import torch

__all__ = ["use_onednn_convolutions"]


def _onednn_conv_forward(self, x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled():
        return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride, self.dilation,
                                        self.groups)
    return self._conv_forward(x, self.weight, self.bias)


def use_onednn_convolutions(net: torch.nn.Module) -> int:
    """Route the network's Conv3d layers (zero padding) straight to oneDNN on CPU, for float32
    inference without gradients; other calls take PyTorch's usual path. Returns the number of
    layers patched (0 when oneDNN is not available)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    n = 0
    for m in net.modules():
        if isinstance(m, torch.nn.Conv3d) and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            m.forward = types.MethodType(_onednn_conv_forward, m)
            n += 1
    return n
