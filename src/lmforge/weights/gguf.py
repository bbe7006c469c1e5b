"""GGUF files (llama architecture): metadata -> ModelConfig + tokenizer fields; tensors dequantized, or kept as
model/quantize.py's block rows (GGUF's own Q4_1 / Q8_0 bytes): no float copy of the model ever exists."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from torch import Tensor

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model.quantize import QuantKind, layer_kind, quantize_int4, quantize_int8
from lmforge.weights.check import GgufHeader, scan_gguf
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


@dataclass
class RawTensor:
    """Where one tensor's bytes are in the file; `data` reads them, as (rows, bytes per row) uint8. Plain reads,
    not a memory map: mapped file pages would count towards the process's memory until the map is dropped."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order: fastest-varying first
    path: Path
    start: int
    n_bytes: int

    @property
    def data(self) -> np.ndarray:
        block, type_size = GGML_QUANT_SIZES[self.tensor_type]
        raw = np.fromfile(self.path, dtype=np.uint8, count=self.n_bytes, offset=self.start)
        return raw.reshape(-1, self.shape[0] // block * type_size)


def raw_tensors(path: Path, header: GgufHeader) -> list[RawTensor]:
    """Every tensor of a scanned (checked) GGUF file, unread."""
    return [RawTensor(t.name, GGMLQuantizationType(t.type), t.dims, path, header.data_start + t.offset, t.n_bytes)
            for t in header.tensors]


def dequantized(t: RawTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """One GGUF tensor as `dtype`, in our (row-major, slowest dim first) shape; a large one is dequantized a
    slice of rows at a time, so its fp32 copy never exists whole when a narrower dtype is asked for."""
    if t.tensor_type not in SUPPORTED_TYPES:
        raise LmforgeError(f"GGUF tensor {t.name} has unsupported type {t.tensor_type.name}")
    data = t.data
    shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists dims fastest-first
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(data.shape[0], -1)
    step = max(1, (8 << 20) // max(1, data.shape[1]))  # ~8 MB of file bytes per slice
    for begin in range(0, data.shape[0], step):
        try:
            values = dequantize(data[begin : begin + step], t.tensor_type)
        except (ValueError, NotImplementedError) as e:
            raise LmforgeError(f"cannot dequantize {t.name} ({t.tensor_type.name}): {e}") from None
        flat[begin : begin + step] = torch.from_numpy(np.require(values, np.float32, ["C", "W"]))
    return out


def quantized_rows(t: RawTensor, kind: QuantKind, group: int) -> tuple[Tensor, bool]:
    """A 2-D GGUF weight -> block rows for `kind` (model/quantize.py) and whether its blocks were kept exactly:
    Q4_1 and Q8_0 are used as read, Q4_0's blocks gain the offset -8 d; any other type is dequantized, this one
    tensor, and quantized again."""
    T = GGMLQuantizationType
    if kind == "int4" and t.tensor_type == T.Q4_1 or kind == "int8" and t.tensor_type == T.Q8_0:
        return torch.from_numpy(t.data), True
    if kind == "int4" and t.tensor_type == T.Q4_0:  # fp16 d | 16 bytes: w = d * (q - 8) = d * q + (-8 d)
        blocks = torch.from_numpy(t.data).reshape(t.data.shape[0], -1, 18)
        offset = (blocks[..., :2].contiguous().view(torch.float16) * -8).view(torch.uint8)  # exact: a power of 2
        return torch.cat([blocks[..., :2], offset, blocks[..., 2:]], dim=-1).reshape(blocks.shape[0], -1), True
    w = dequantized(t)
    return (quantize_int4(w, group) if kind == "int4" else quantize_int8(w)), t.tensor_type in (T.F32, T.F16, T.BF16)


def load_gguf(
    path: Path, quant: QuantKind | None = None, group: int = 32, header: GgufHeader | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[ModelConfig, dict[str, Tensor], dict[str, Any]]:
    """A GGUF file -> (config, our state dict, metadata for the tokenizer and chat template). Without `quant`
    every tensor is `dtype`. With it, each Linear's weight becomes block rows of the kind `layer_kind` picks (a
    tied head gets its rows under "lm_head.weight" from the embedding's blocks), the embedding table bf16 and
    the rest `dtype`; a note
    names any tensor that could not be kept in its file's blocks. `header` is scan_gguf's (checked) reading of
    the file. Tensors are read one at a time: no float copy of the whole model exists beside the result."""
    header = header or scan_gguf(path)
    meta = header.metadata
    cfg = config_from_gguf(meta, name=path.stem)
    tensors_in_file = raw_tensors(path, header)
    names = {t.name for t in tensors_in_file}
    if cfg.tie_embeddings and "output.weight" in names:
        cfg.tie_embeddings = False
    tensors: dict[str, Tensor] = {}
    requantized: list[str] = []
    for t in tensors_in_file:
        if quant is None or len(t.shape) != 2:
            tensors[t.name] = dequantized(t, dtype)
            continue
        is_head = t.name == "output.weight" or t.name == "token_embd.weight"
        kind = layer_kind(quant, group, "lm_head" if is_head else t.name, int(t.shape[0]))
        if t.name == "token_embd.weight":  # looked up as bf16 floats (build_quantized); as a tied head, quantized
            tensors[t.name] = dequantized(t, torch.bfloat16)
            if not cfg.tie_embeddings or kind is None:
                continue
        if kind is None:
            tensors[t.name] = dequantized(t, dtype)
            continue
        rows, exact = quantized_rows(t, kind, group)
        tensors["output.weight" if t.name == "token_embd.weight" else t.name] = rows
        if not exact:
            requantized.append(f"{t.name} ({t.tensor_type.name})")
    if requantized:
        _note_requantized(path, quant, requantized)
    ours = to_ours(tensors, GGUF_LLAMA, fix=qk_row_fix(cfg), consume=True)
    return cfg, ours, meta


def _note_requantized(path: Path, quant: QuantKind | None, names: list[str]) -> None:
    import sys

    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    print(f"note: {path.name}: {shown} dequantized and quantized again for --dtype {quant} (their blocks do not "
          "repack exactly)", file=sys.stderr)


def qk_row_fix(cfg: ModelConfig) -> Callable[[str, Tensor], Tensor]:
    """The per-tensor fix `to_ours` applies to GGUF tensors: q and k rows back in HF's order."""

    def fix(name: str, w: Tensor) -> Tensor:
        if name.endswith("attn_q.weight"):
            return unpermute_rope_rows(w, cfg.n_head)
        if name.endswith("attn_k.weight"):
            return unpermute_rope_rows(w, cfg.n_kv_head)
        return w

    return fix
