"""Inference-time module swaps: a Linear is replaced by another module with the same call, so the model code
never changes. `swap_linears` is the one seam: oneDNN Linears here, quantized Linears and LoRA use it too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# oneDNN's matmul beats the default fp32 path on this project's CPUs for both shapes that matter:
# matrix-vector products in decode (it streams the weights from memory faster, benchmarks/decode.py) and
# whole-sequence encoder products (benchmarks/embed.py). It has no autograd: with gradients on it falls back.
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def swap_linears(
    model: nn.Module, make: Callable[[str, nn.Linear], nn.Module | None], include_heads: bool = True
) -> int:
    """Replace each Linear `name` (nn.Linear or OneDNNLinear, which has the same attributes) by
    `make(name, linear)` (None keeps it); returns how many were swapped. A tied head shares the embedding's
    Parameter, and whatever `make` keeps of it stays shared."""
    heads = ("lm_head", "mlm_head", "score", "classifier")
    targets = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Linear, OneDNNLinear)]
    swapped = 0
    for name, linear in targets:
        if not include_heads and name.split(".")[-1] in heads:
            continue
        new = make(name, linear)
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        swapped += 1
    return swapped


class OneDNNLinear(nn.Module):
    """nn.Linear through oneDNN for fp32 CPU inference; F.linear whenever gradients, autocast, torch.compile or
    another dtype/device are involved, so it is always safe to leave in place."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (
            x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
        ):
            return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "none", [], "")
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def use_onednn(model: nn.Module, measure: bool = True) -> int:
    """Swap every nn.Linear (heads included) for OneDNNLinear where oneDNN is available, the model is fp32 on
    the CPU and (with `measure`) oneDNN is the faster path on this CPU; returns how many were swapped.
    LMFORGE_ONEDNN=1/0 forces the choice."""
    p = next(model.parameters())
    if not ONEDNN or p.device.type != "cpu" or p.dtype != torch.float32:
        return 0
    forced = os.environ.get("LMFORGE_ONEDNN")
    if forced is not None:
        if forced == "0":
            return 0
    elif measure and not _decision(model):
        return 0
    return swap_linears(model, lambda _name, linear: OneDNNLinear(linear))


_DECISIONS: dict[bool, bool] = {}  # per process, decoder or encoder shapes: the CPU does not change


def _decision(model: nn.Module) -> bool:
    """onednn_is_faster, measured once per process for each kind of product (one row / many rows)."""
    cfg = getattr(model, "cfg", None)
    encoder = cfg is not None and cfg.family == "encoder"
    if encoder not in _DECISIONS:
        _DECISIONS[encoder] = onednn_is_faster(model)
    return _DECISIONS[encoder]


def onednn_is_faster(model: nn.Module) -> bool:
    """Which matmul path is faster depends on the CPU (oneDNN won by ~1.4x on an AMD EPYC in decode, lost by
    ~1.4x on an Intel Xeon): time both over the model's own weights, as inference uses them. A decoder is timed
    on one row (decode streams the weights from memory), an encoder on a batch of rows (whole sequences)."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    cfg = getattr(model, "cfg", None)
    rows = 64 if cfg is not None and cfg.family == "encoder" else 1
    chosen, size = [], 0
    for linear in linears:  # enough weights to leave the caches: what a decode step reads
        chosen.append(linear)
        size += linear.weight.numel() * 4
        if size > (64 << 20) * (1 if rows == 1 else 0.25):
            break
    inputs = {k: torch.randn(rows, k) for k in {m.in_features for m in chosen}}

    def onednn(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")

    def seconds(fn: Callable[[Tensor, Tensor, Tensor | None], Tensor]) -> float:
        start = time.perf_counter()
        for m in chosen:
            fn(inputs[m.in_features], m.weight, m.bias)
        return time.perf_counter() - start

    with torch.inference_mode():
        seconds(onednn), seconds(F.linear)  # first calls: kernel selection, page faults
        fast = min(seconds(onednn) for _ in range(3))
        plain = min(seconds(F.linear) for _ in range(3))
    return fast < 0.95 * plain


def plain_linears(model: nn.Module) -> int:
    """Undo use_onednn: plain nn.Linears again (same Parameters), e.g. before training."""
    def back(module: nn.Module) -> int:
        n = 0
        for child_name, child in module.named_children():
            if isinstance(child, OneDNNLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                linear.weight = child.weight
                linear.bias = child.bias
                setattr(module, child_name, linear)
                n += 1
            else:
                n += back(child)
        return n

    return back(model)
