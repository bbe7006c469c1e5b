"""Weight-only quantized Linears, swapped in through model/fast.py's `swap_linears` (heads included).

int8 with one scale per output row: weights take a quarter of fp32's memory and the matmul reads int8 from
memory, dequantizing on the fly. This is the plain PyTorch reference; faster kernels must give its numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.model.fast import swap_linears


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias, with q int8 (out, in) and scale (out, 1) = max|w| / 127 per row."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
        self.register_buffer("qweight", torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        weight = self.qweight.to(x.dtype) * self.scale.to(x.dtype)  # (out, in)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


def quantize_int8(model: nn.Module, include_heads: bool = True) -> int:
    """Swap every Linear (the head too, unless include_heads=False) for Int8Linear; returns how many."""
    return swap_linears(model, lambda _name, linear: Int8Linear(linear), include_heads)
