"""The pieces every family is built from: norms, rotary positions, attention, feed-forward."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


# oneDNN's matmul (+ fused bias, activation or residual add) beat the default fp32 path on this project's CPUs
# for both shapes that matter: matrix-vector products in decode (~1.4x: it streams the weights from memory
# faster, benchmarks/decode.py) and whole-sequence encoder products (benchmarks/embed.py). It has no
# autograd, so training and any wrapped Linear (LoRA, quantised) take the plain path.
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_ONEDNN_ACTS = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", "")}


def _onednn_applies(x: Tensor, weight: Tensor) -> bool:
    return (
        _ONEDNN and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, through oneDNN where that is faster (see above)."""
    if _onednn_applies(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def dense(layer: nn.Module, x: Tensor, act: str | None = None, residual: Tensor | None = None) -> Tensor:
    """act(layer(x)) or layer(x) + residual, fused into one oneDNN call when it applies."""
    if type(layer) is nn.Linear and _onednn_applies(x, layer.weight):
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, layer.weight, layer.bias, "add")
        attr, algorithm = _ONEDNN_ACTS.get(act, ("none", "")) if act else ("none", "")
        y = torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, attr, [], algorithm)
        return ACTIVATIONS[act](y) if act and attr == "none" else y
    y = layer(x)
    if residual is not None:
        return y + residual
    return ACTIVATIONS[act](y) if act else y


class Norm(nn.Module):
    """RMSNorm (Llama, T5: no mean, no bias) or LayerNorm (GPT-2, BERT)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.rms = cfg.norm == "rms"
        self.eps = cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(cfg.d_model))

    def forward(self, x: Tensor) -> Tensor:
        if self.rms and x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        if self.rms:  # statistics in fp32 like the reference implementations, so bf16 inference stays close
            return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def rope_tables(head_dim: int, max_len: int, base: float) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (max_len, head_dim) in the half-split layout HF Llama checkpoints use."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (L, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, hd)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, T, H, hd); cos/sin: (B, T, 1, hd) already gathered at each token's position."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads; self-attention (fused qkv) or cross-attention."""

    def __init__(self, cfg: ModelConfig, cross: bool = False) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(cfg.head_dim)
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        self.cross = cross
        if cross:
            self.q = nn.Linear(cfg.d_model, q_dim, bias=cfg.qkv_bias)
            self.kv = nn.Linear(cfg.d_model, 2 * kv_dim, bias=cfg.qkv_bias)
        else:
            # one matmul for q, k and v: fewer kernel launches per decode step
            self.qkv = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.out = nn.Linear(q_dim, cfg.d_model, bias=cfg.attn_out_bias)

    def split_kv(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        """(B, S, 2*kv_dim) -> k, v each (B, n_kv_head, S, hd)."""
        B, S, _ = kv.shape
        k, v = kv.view(B, S, 2, self.n_kv_head, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(
        self,
        x: Tensor,  # (B, T, d)
        mask: Tensor | None,  # bool (keep) or float (added) broadcastable to (B, H, T, S)
        rope: tuple[Tensor, Tensor] | None = None,
        kv_cache: tuple[Tensor, Tensor] | None = None,  # self: (B, n_kv, S_max, hd) buffers to fill
        start: int = 0,  # self: first cache slot of x
        memory_kv: tuple[Tensor, Tensor] | None = None,  # cross: encoder keys/values
        is_causal: bool = False,
        residual: Tensor | None = None,  # added to the output (fused into the output projection when it can be)
    ) -> Tensor:
        B, T, _ = x.shape
        if self.cross:
            q = dense(self.q, x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
            assert memory_kv is not None
            k, v = memory_kv
        else:
            n_qk = self.n_head + self.n_kv_head
            qkv = dense(self.qkv, x).view(B, T, n_qk + self.n_kv_head, self.head_dim)
            qk = qkv[:, :, :n_qk]
            if rope is not None:  # q and k heads rotated in one go: half the element-wise ops of a decode step
                qk = apply_rope(qk, *rope)
            q, k = qk[:, :, : self.n_head].transpose(1, 2), qk[:, :, self.n_head :].transpose(1, 2)
            v = qkv[:, :, n_qk:].transpose(1, 2)
            if kv_cache is not None:
                k_cache, v_cache = kv_cache
                k_cache[:, :, start : start + T] = k
                v_cache[:, :, start : start + T] = v
                k, v = k_cache[:, :, : start + T], v_cache[:, :, : start + T]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, scale=self.scale,
            enable_gqa=self.n_head != self.n_kv_head,
        )  # (B, H, T, hd)
        return dense(self.out, y.transpose(1, 2).reshape(B, T, -1), residual=residual)


class MLP(nn.Module):
    """Gated (SwiGLU, gated-GELU) or plain (GELU, ReLU) feed-forward."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gated = cfg.gated_mlp
        self.act_name = cfg.act
        self.act = ACTIVATIONS[cfg.act]
        # gated: gate and up projections fused into one matmul, gate first
        self.fc_in = nn.Linear(cfg.d_model, (2 if self.gated else 1) * cfg.d_ff, bias=cfg.mlp_bias)
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if self.gated:
            gate, up = dense(self.fc_in, x).chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = dense(self.fc_in, x, self.act_name)
        return dense(self.fc_out, h, residual=residual)


class Block(nn.Module):
    """Self-attention (+ cross-attention in an encoder-decoder's decoder) + feed-forward, with residuals.

    Pre-norm (GPT-2, Llama, T5) normalises each sublayer's input; post-norm (BERT) normalises the sum.
    """

    def __init__(self, cfg: ModelConfig, cross: bool = False) -> None:
        super().__init__()
        self.post_norm = cfg.post_norm
        self.attn_norm, self.attn = Norm(cfg), Attention(cfg)
        self.cross_norm, self.cross_attn = (Norm(cfg), Attention(cfg, cross=True)) if cross else (None, None)
        self.mlp_norm, self.mlp = Norm(cfg), MLP(cfg)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        rope: tuple[Tensor, Tensor] | None = None,
        kv_cache: tuple[Tensor, Tensor] | None = None,
        start: int = 0,
        memory_kv: tuple[Tensor, Tensor] | None = None,
        memory_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        if self.post_norm:
            x = self.attn_norm(self.attn(x, mask, rope, kv_cache, start, is_causal=is_causal, residual=x))
            return self.mlp_norm(self.mlp(x, residual=x))
        x = self.attn(self.attn_norm(x), mask, rope, kv_cache, start, is_causal=is_causal, residual=x)
        if self.cross_attn is not None:
            x = self.cross_attn(self.cross_norm(x), memory_mask, memory_kv=memory_kv, residual=x)
        return self.mlp(self.mlp_norm(x), residual=x)
