"""Memory planning: what a model needs at a precision, context and batch, before anything is loaded.

weights    every tensor the model holds at that precision, counted from the model built on the meta device
           with the same rules the loader applies (quantized Linears' exact buffer sizes, heads int8, tied copies)
kv cache   what the engine allocates: keys and values for each layer and slot, context rounded up to 64
activations one prefill chunk's largest live tensors and the logits rows (an upper estimate)
runtime    this very process (Python, PyTorch and lmforge imported: what a generate process holds before its model;
           how much of PyTorch's libraries is resident varies by ~50 MB with the page cache) plus an allowance
           for the tokenizer, the GGUF metadata and the load's transient copies
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.precision import QUANT_DTYPES

RUNTIME_BYTES = 330 << 20  # where /proc cannot tell: `import torch` ~220 MB + lmforge + the allowance below
LOAD_ALLOWANCE = 80 << 20  # tokenizer, GGUF metadata, a load's transient copies: measured for SmolLM2 here
FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PREFILL_CHUNK = 512  # the engine's default


@dataclass
class MemoryPlan:
    weights: int
    kv_cache: int
    activations: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.runtime


def weight_bytes(cfg: ModelConfig, dtype: str) -> int:
    """Bytes of every weight and buffer the loaded model holds (rotary tables included)."""
    from torch import nn

    from lmforge.model.quantize import layer_kind, quantized_nbytes
    from lmforge.weights.check import meta_model

    model = meta_model(cfg)
    quant = QUANT_DTYPES.get(dtype)
    float_bytes = 4 if quant else _float_bytes(dtype)
    seen = set()
    linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    total = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary tables: fp32 at any precision
    for name, p in model.named_parameters(remove_duplicate=False):
        module = linears.get(name)
        kind = layer_kind(quant[0], quant[1], name.rsplit(".", 1)[0], module.in_features) if quant and module else None
        if kind is not None:
            assert module is not None and quant is not None
            total += quantized_nbytes(kind, module.out_features, module.in_features)  # its own copy
        elif id(p) not in seen:
            table = quant and name.endswith("emb.weight")  # build_quantized keeps embedding tables in bf16
            total += p.numel() * (2 if table else float_bytes if p.is_floating_point() else p.element_size())
        seen.add(id(p))
    return total


def kv_cache_bytes(cfg: ModelConfig, dtype: str, context: int, batch: int) -> int:
    columns = min(-(-context // 64) * 64, max(context, cfg.max_seq_len))
    n_layer = cfg.n_decoder_layer if cfg.family == "encoder-decoder" else cfg.n_layer
    per_slot = 2 * n_layer * cfg.n_kv_head * cfg.head_dim * columns
    if cfg.family == "encoder-decoder":
        per_slot += 2 * n_layer * cfg.n_kv_head * cfg.head_dim * cfg.max_seq_len
    return per_slot * batch * (2 if dtype in QUANT_DTYPES else _float_bytes(dtype))  # quantized: a bf16 cache


def activation_bytes(cfg: ModelConfig, dtype: str, context: int, batch: int) -> int:
    """A prefill chunk: the residual stream and its norms, q/k/v, the MLP's inner activations (gate|up and their
    product) and fp32 attention scores for one head group; plus fp32 logits and their softmax for each row."""
    chunk = min(context, PREFILL_CHUNK)
    width = 4 if dtype in QUANT_DTYPES else _float_bytes(dtype)
    stream = chunk * (6 * cfg.d_model + (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim + 3 * cfg.d_ff) * width
    scores = cfg.n_head * chunk * min(context, cfg.max_seq_len) * 4
    logits = 2 * batch * cfg.vocab_size * 4
    return stream + scores + logits


def plan(cfg: ModelConfig, dtype: str, context: int | None = None, batch: int = 1) -> MemoryPlan:
    context = context or cfg.max_seq_len
    if context < 1 or batch < 1:
        raise LmforgeError("--context and --batch must be >= 1")
    if context > cfg.max_seq_len:
        raise LmforgeError(f"context {context} exceeds the model's {cfg.max_seq_len} tokens")
    return MemoryPlan(weight_bytes(cfg, dtype), kv_cache_bytes(cfg, dtype, context, batch),
                      activation_bytes(cfg, dtype, context, batch), runtime_bytes())


def runtime_bytes() -> int:
    """This process's resident memory now (Linux) plus LOAD_ALLOWANCE; RUNTIME_BYTES elsewhere."""
    import re

    try:
        with open("/proc/self/status") as f:
            found = re.search(r"VmRSS:\s+(\d+) kB", f.read())
    except OSError:
        found = None
    return int(found.group(1)) * 1024 + LOAD_ALLOWANCE if found else RUNTIME_BYTES


def _float_bytes(dtype: str) -> int:
    if dtype not in FLOAT_BYTES:
        raise LmforgeError(f"unknown dtype {dtype!r} (use one of: {', '.join([*FLOAT_BYTES, *QUANT_DTYPES])})")
    return FLOAT_BYTES[dtype]

