"""GGUF files (llama architecture): metadata -> ModelConfig + tokenizer fields, tensors dequantized."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from torch import Tensor

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.weights.names import GGUF_LLAMA, to_ours

SUPPORTED_TYPES = {
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16, GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1,
    GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K, GGMLQuantizationType.Q8_K,
    GGMLQuantizationType.Q2_K, GGMLQuantizationType.Q3_K,
}


def is_gguf(path: Path) -> bool:
    """By the file's magic bytes, not its name: a mistyped file gets a clear error instead of a parse failure."""
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def open_gguf(path: Path) -> GGUFReader:
    try:
        return GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, AssertionError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LmforgeError(f"bad GGUF file {path}: truncated or corrupt ({msg})") from None


def metadata(reader: GGUFReader) -> dict[str, Any]:
    """All key/value fields as Python values (arrays as lists)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def config_from_gguf(meta: dict[str, Any], name: str) -> ModelConfig:
    try:
        return _config_from_gguf(meta, name)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise LmforgeError(f"GGUF metadata of {name} is incomplete ({type(e).__name__}: {e})") from None


def _config_from_gguf(meta: dict[str, Any], name: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise LmforgeError(f"GGUF architecture {arch!r} is not supported yet (supported: llama)")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    n_head = int(get("attention.head_count"))
    d_model = int(get("embedding_length"))
    vocab = get("vocab_size") or len(meta["tokenizer.ggml.tokens"])
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        name=name, hf_model_type="llama", vocab_size=int(vocab), d_model=d_model, n_layer=int(get("block_count")),
        n_head=n_head, n_kv_head=int(get("attention.head_count_kv", n_head)),
        head_dim=int(get("attention.key_length", d_model // n_head)), d_ff=int(get("feed_forward_length")),
        max_seq_len=int(get("context_length")), rope_base=float(get("rope.freq_base", 10000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")), bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=[int(eos)] if eos is not None else [], pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def unpermute_rope_rows(w: Tensor, n_head: int) -> Tensor:
    """llama.cpp interleaves each head's rotary halves in q/k rows; restore HF's half-split order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def load_gguf(path: Path) -> tuple[ModelConfig, dict[str, Tensor], dict[str, Any]]:
    """A GGUF file -> (config, our state dict in fp32, metadata for the tokenizer and chat template)."""
    reader = open_gguf(path)
    meta = metadata(reader)
    cfg = config_from_gguf(meta, name=path.stem)
    tensors: dict[str, Tensor] = {}
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TYPES:
            raise LmforgeError(f"GGUF tensor {t.name} has unsupported type {t.tensor_type.name}")
        try:
            values = dequantize(t.data, t.tensor_type)
        except (ValueError, NotImplementedError) as e:
            raise LmforgeError(f"cannot dequantize {t.name} ({t.tensor_type.name}): {e}") from None
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists dims fastest-first
        tensors[t.name] = torch.from_numpy(np.require(values, np.float32, ["C", "W"]).reshape(shape))
    if cfg.tie_embeddings and "output.weight" in tensors:
        cfg.tie_embeddings = False
    return cfg, to_ours(tensors, GGUF_LLAMA, fix=qk_row_fix(cfg)), meta


def qk_row_fix(cfg: ModelConfig) -> Callable[[str, Tensor], Tensor]:
    """The per-tensor fix `to_ours` applies to GGUF tensors: q and k rows back in HF's order."""

    def fix(name: str, w: Tensor) -> Tensor:
        if name.endswith("attn_q.weight"):
            return unpermute_rope_rows(w, cfg.n_head)
        if name.endswith("attn_k.weight"):
            return unpermute_rope_rows(w, cfg.n_kv_head)
        return w

    return fix
