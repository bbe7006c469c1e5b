"""The pieces every family is built from: norms, rotary positions, attention, feed-forward.

Every projection is an nn.Module called as a module (`self.qkv(x)`), so hooks, autocast, LoRA, quantized
or oneDNN Linears (model/fast.py) reach all of them by swapping a module.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from lmforge.config import ModelConfig
from lmforge.model import kernels

if TYPE_CHECKING:
    from lmforge.model.cache import CacheStep

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


class Norm(nn.Module):
    """RMSNorm (Llama, T5: no mean, no bias) or LayerNorm (GPT-2, BERT) over the last `dim` features."""

    def __init__(self, cfg: ModelConfig, dim: int | None = None) -> None:
        super().__init__()
        dim = dim or cfg.d_model
        self.rms = cfg.norm == "rms"
        self.eps = cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.rms and x.dtype == torch.float32:
            # inference: the native one-pass kernel (PyTorch's CPU rms_norm is ~6 ops, ~40 us per decode call);
            # kernels.rms_norm itself keeps F.rms_norm wherever autograd would record (grad enabled and x or the
            # weight requiring it) and for other devices. torch.compile traces F.rms_norm, never the extension.
            if not torch.compiler.is_compiling():
                return kernels.rms_norm(x, self.weight, self.eps)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        if self.rms:  # statistics in fp32 like the reference implementations, so bf16 stays close
            return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def rope_tables(
    head_dim: int, max_len: int, base: float, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (max_len, head_dim) in the half-split layout HF Llama checkpoints use."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32, device=device), inv_freq)  # (L, hd/2)
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
        self.dropout = cfg.attn_dropout
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        self.cross = cross
        if cross:
            self.q = nn.Linear(cfg.d_model, q_dim, bias=cfg.qkv_bias)
            self.kv = nn.Linear(cfg.d_model, 2 * kv_dim, bias=cfg.qkv_bias)
        else:
            # one matmul for q, k and v: fewer kernel launches per decode step
            self.qkv = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.q_norm = Norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = Norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.out = nn.Linear(q_dim, cfg.d_model, bias=cfg.attn_out_bias)
        # opt-in (eval/explain.py): spell attention out and keep its probabilities (B, H, T, S) here; off, the
        # fused SDPA path runs untouched
        self.keep_weights = False
        self.weights: Tensor | None = None

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys/values of the encoder output: (B, S, d) -> k, v each (B, n_kv_head, S, hd)."""
        B, S, _ = memory.shape
        k, v = self.kv(memory).view(B, S, 2, self.n_kv_head, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(
        self,
        x: Tensor,  # (B, T, d)
        mask: Tensor | None,  # bool (keep) or float (added), broadcastable to (B, H, T, S)
        rope: tuple[Tensor, Tensor] | None = None,  # cos, sin (B, T, 1, hd)
        cache: CacheStep | None = None,  # self-attention: where this call's keys/values go and which to read
        layer: int = 0,
        memory_kv: tuple[Tensor, Tensor] | None = None,  # cross-attention: encoder keys/values
        is_causal: bool = False,
    ) -> Tensor:
        B, T, _ = x.shape
        if self.cross:
            assert memory_kv is not None, "cross-attention needs the encoder's keys/values"
            q = self.q(x).view(B, T, self.n_head, self.head_dim)
            if self.q_norm is not None:
                q = self.q_norm(q)
            q = q.transpose(1, 2)
            k, v = memory_kv
        else:
            n_qk = self.n_head + self.n_kv_head
            qkv = self.qkv(x)
            if T == 1 and cache is not None and rope is not None and self.fusable(qkv, cache):
                # decode: rope, cache write and attention in one native call (kernels/decode.cpp); the mask
                # with a cache only says "columns up to each row's position", which the kernel knows
                y = kernels.decode_attention(qkv.view(B, -1), rope[0].reshape(B, -1), rope[1].reshape(B, -1),
                                             cache.cache.k[layer], cache.cache.v[layer], cache.first,
                                             cache.positions.reshape(B), self.n_head, self.scale)
                if y is not None:
                    return self.out(y.view(B, 1, -1))
            qkv = qkv.view(B, T, n_qk + self.n_kv_head, self.head_dim)
            qk = qkv[:, :, :n_qk]
            if self.q_norm is not None and self.k_norm is not None:
                qk = torch.cat([self.q_norm(qk[:, :, : self.n_head]), self.k_norm(qk[:, :, self.n_head :])], dim=2)
            if rope is not None:  # q and k heads rotated in one go: half the element-wise ops of a decode step
                rotated = self.rope_natively(qkv, rope, n_qk) if self.q_norm is None else None
                qk = apply_rope(qk, *rope) if rotated is None else rotated
            q, k = qk[:, :, : self.n_head].transpose(1, 2), qk[:, :, self.n_head :].transpose(1, 2)
            v = qkv[:, :, n_qk:].transpose(1, 2)  # (B, n_kv, T, hd)
            if cache is not None:
                k, v = cache.update(layer, k, v)  # (B, n_kv, S, hd): every key this call may attend to
                if (is_causal and mask is None and T > 1 and cache.start == 0 and cache.kv_len == T
                        and self.fusable(qkv, cache)):
                    # a prompt from column 0, natively against the keys just cached (SDPA's CPU kernel was ~20% of
                    # an int4 prefill)
                    rows = qk if qk.is_contiguous() else qkv  # not rotated nor normed: qk is a view of qkv
                    y = kernels.prefill_attention(rows.reshape(B * T, -1), cache.cache.k[layer], cache.cache.v[layer],
                                                  cache.first, T, self.n_head, self.scale)
                    if y is not None:
                        return self.out(y.view(B, T, -1))
        if k.dtype != q.dtype:  # a quantized model's bf16 cache: attention in fp32 (bf16 SDPA is ~4x slower here)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if self.keep_weights:
            return self.out(self.attend_keeping_weights(q, k, v, mask, is_causal).transpose(1, 2).reshape(B, T, -1))
        if T == 1 and B >= 16 and not self.training and (mask is None or mask.dtype == torch.bool):
            return self.out(decode_attention(q, k, v, mask, self.scale).transpose(1, 2).reshape(B, T, -1))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_head != self.n_kv_head,
        )  # (B, H, T, hd)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))

    def fusable(self, qkv: Tensor, cache: CacheStep) -> bool:
        """Whether decode may take the fused native path: inference, fp32 on the CPU, plain per-row slots."""
        return (
            qkv.dtype is torch.float32 and qkv.is_cpu and self.q_norm is None and not self.keep_weights
            and not self.training and cache.slots is None and cache.positions.dtype is torch.long
            and not (torch.is_grad_enabled() and qkv.requires_grad) and not torch.compiler.is_compiling()
        )

    @staticmethod
    def rope_natively(qkv: Tensor, rope: tuple[Tensor, Tensor], n_qk: int) -> Tensor | None:
        """apply_rope on qkv's first n_qk heads in one native pass (kernels.rope_heads; prefill's many tokens made
        PyTorch's five element-wise ops a few percent of it), for fp32 inference on the CPU; else None."""
        B, T, _, hd = qkv.shape
        if not (qkv.dtype is torch.float32 and qkv.is_cpu and qkv.is_contiguous() and rope[0].dtype is torch.float32
                and not (torch.is_grad_enabled() and qkv.requires_grad) and not torch.compiler.is_compiling()):
            return None
        cos, sin = (t.expand(B, T, 1, hd).reshape(B * T, hd) for t in rope)
        y = kernels.rope_heads(qkv.view(B * T, -1), cos, sin, n_qk)
        return None if y is None else y.view(B, T, n_qk, hd)

    def attend_keeping_weights(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
        """What SDPA computes, spelled out: q (B, H, T, hd), k/v (B, n_kv, S, hd) -> (B, H, T, hd); the
        probabilities softmax(q k^T * scale + mask) are kept in self.weights (B, H, T, S)."""
        group = self.n_head // self.n_kv_head  # each kv head serves this many query heads (SDPA's enable_gqa)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, S, hd)
        # (B, H, T, S); softmax in at least fp32, as SDPA's kernels accumulate
        scores = torch.matmul(q, k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * self.scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        elif is_causal:  # SDPA's is_causal: query i sees keys 0..i (top-left aligned)
            T, S = scores.shape[-2:]
            scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        weights = scores.softmax(dim=-1)
        self.weights = weights.detach()
        if self.training and self.dropout:
            weights = F.dropout(weights, self.dropout)
        return torch.matmul(weights.to(v.dtype), v)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, scale: float) -> Tensor:
    """One new token per row against its keys: q (B, H, 1, hd), k/v (B, n_kv, S, hd), keep (B, 1, 1, S) ->
    (B, H, 1, hd). Two batched matmuls with each kv head's query heads side by side; on CPU this is ~2x faster
    than SDPA for 32 rows and as fast for 8 (SDPA stays faster for one row)."""
    B, H, _, hd = q.shape
    n_kv = k.shape[1]
    scores = torch.matmul(q.reshape(B, n_kv, H // n_kv, hd), k.transpose(-1, -2)) * scale  # (B, n_kv, H/n_kv, S)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v).reshape(B, H, 1, hd)


class MLP(nn.Module):
    """Gated (SwiGLU, gated-GELU) or plain (GELU, ReLU) feed-forward."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gated = cfg.gated_mlp
        self.act = ACTIVATIONS[cfg.act]
        # gated: gate and up projections fused into one matmul, gate first
        self.fc_in = nn.Linear(cfg.d_model, (2 if self.gated else 1) * cfg.d_ff, bias=cfg.mlp_bias)
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            h = self.fc_in(x)
            if self.act is F.silu and h.dtype is torch.float32 and h.is_cpu and h.is_contiguous() and not (
                    torch.is_grad_enabled() and h.requires_grad) and not torch.compiler.is_compiling():
                fused = kernels.silu_mul(h)  # one native pass instead of chunk, silu, mul (inference only)
                if fused is not None:
                    return self.fc_out(fused)
            gate, up = h.chunk(2, dim=-1)
            return self.fc_out(self.act(gate) * up)
        return self.fc_out(self.act(self.fc_in(x)))


# Block -> (key, the objects it identifies, native plan): Block.native_plan's cache, outside the module so that it is
# never pickled, copied or saved with it
_NATIVE_PLANS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


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
        self.dropout = cfg.dropout

    def drop(self, y: Tensor) -> Tensor:
        return F.dropout(y, self.dropout, training=True) if self.training and self.dropout else y

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: CacheStep | None = None,
        layer: int = 0,
        memory_kv: tuple[Tensor, Tensor] | None = None,
        memory_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        if x.shape[1] == 1 and cache is not None and rope is not None and memory_kv is None:
            y = self.decode_natively(x, rope, cache, layer)
            if y is not None:
                return y
        if self.post_norm:
            x = self.attn_norm(x + self.drop(self.attn(x, mask, rope, cache, layer, is_causal=is_causal)))
            return self.mlp_norm(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.attn_norm(x), mask, rope, cache, layer, is_causal=is_causal))
        if self.cross_attn is not None:
            x = x + self.drop(self.cross_attn(self.cross_norm(x), memory_mask, memory_kv=memory_kv))
        return x + self.drop(self.mlp(self.mlp_norm(x)))

    def decode_natively(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: CacheStep, layer: int) -> Tensor | None:
        """The whole block in one native call (kernels.decode_block: the same calls as forward, without ~10 Python
        module calls per block) when it is a pre-norm RMSNorm / rotary / SwiGLU block at inference, fp32 on the
        CPU, with no hook, adapter or oneDNN Linear in it; else None and forward goes on."""
        if (
            torch.is_grad_enabled() or self.training or x.dtype is not torch.float32 or not x.is_cpu
            or cache.slots is not None or torch.compiler.is_compiling() or _global_forward_hooks
            or _global_forward_pre_hooks
        ):
            return None
        plan = self.native_plan()
        if plan is None:
            return None
        attn_norm, mlp_norm, eps, linears, n_head, scale = plan
        B = x.shape[0]
        y = kernels.decode_block(x.view(B, -1), attn_norm, mlp_norm, eps, linears, rope[0].reshape(B, -1),
                                 rope[1].reshape(B, -1), cache.cache.k[layer], cache.cache.v[layer], cache.first,
                                 cache.positions.reshape(B), n_head, scale)
        return None if y is None else y.view(B, 1, -1)

    def native_plan(self) -> tuple | None:
        """kernels.decode_block's arguments that belong to the block (norm weights, eps, the four Linears' specs,
        heads, scale), or None for a block it cannot run: post-norm, cross-attention, LayerNorm, not SwiGLU, q/k
        norms, kept attention weights, a hook, or a Linear that native_linear refuses (LoRA, oneDNN, not fp32).
        Cached, and made again whenever one of the block's modules, their tensors or their flags is another
        object: built afresh per call, its ~30 nn.Module attribute lookups were ~15% of an int4 decode step."""
        parts = []
        for m in self._modules.values():
            if m is not None:
                parts.append(m)
                parts.extend(c for c in m._modules.values() if c is not None)
        if self._forward_hooks or self._forward_pre_hooks or any(m._forward_hooks or m._forward_pre_hooks
                                                                  for m in parts):
            return None
        # a Parameter keeps its identity through .to(dtype) (its .data is swapped), so its dtype is part of the key
        held = [x for m in parts for x in (m, *m._parameters.values(), *m._buffers.values(),
                                             *(p.dtype for p in m._parameters.values() if p is not None),
                                             m.__dict__.get("precise"), m.__dict__.get("keep_weights"))]
        key = tuple(map(id, held))  # `held` stays referenced with the plan: no id is reused while it is cached
        cached = _NATIVE_PLANS.get(self)
        if cached is not None and cached[0] == key:
            return cached[2]
        plan = self._make_native_plan()
        _NATIVE_PLANS[self] = (key, held, plan)
        return plan

    def _make_native_plan(self) -> tuple | None:
        attn, mlp = self.attn, self.mlp
        if (
            self.post_norm or self.cross_attn is not None or not self.attn_norm.rms or mlp.act is not F.silu
            or not mlp.gated or attn.q_norm is not None or attn.keep_weights
            or self.attn_norm.weight.dtype is not torch.float32 or self.mlp_norm.weight.dtype is not torch.float32
        ):
            return None
        linears = [native_linear(m) for m in (attn.qkv, attn.out, mlp.fc_in, mlp.fc_out)]
        if any(spec is None for spec in linears):
            return None
        return self.attn_norm.weight, self.mlp_norm.weight, self.attn_norm.eps, linears, attn.n_head, attn.scale


def native_linear(m: nn.Module) -> tuple | None:
    """A projection as kernels.decode_block takes it, or None for one it cannot run (LoRA, oneDNN, hooks, not
    fp32): a plain fp32 nn.Linear, or a quantized Linear's own `native_spec`."""
    if m._forward_hooks or m._forward_pre_hooks:
        return None
    if type(m) is nn.Linear:
        w = m.weight
        return (0, w, w, w, m.bias, m.out_features, m.in_features, False) if w.dtype is torch.float32 else None
    spec = getattr(m, "native_spec", None)
    return spec() if spec is not None else None
