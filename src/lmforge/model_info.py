"""What a model is, without loading its weights: family, size, context, memory at each precision."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model.transformer import Transformer
from lmforge.weights.gguf import config_from_gguf, is_gguf, metadata, open_gguf
from lmforge.weights.hf import config_from_hf
from lmforge.weights.registry import resolve

# bytes per parameter: int8 with per-row scales (negligible), int4 with one fp16 scale per 32 weights
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5 + 2 / 32}


def read_config(path: Path) -> tuple[ModelConfig, str]:
    """(config, storage description) from a GGUF header or an HF config.json."""
    if path.is_file():
        if path.suffix != ".gguf" and not is_gguf(path):
            raise LmforgeError(f"{path} is neither a GGUF file nor a model folder")
        reader = open_gguf(path)
        types = sorted({t.tensor_type.name for t in reader.tensors})
        return config_from_gguf(metadata(reader), path.stem), f"GGUF ({', '.join(types)})"
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(f"bad or missing config.json in {path}: {e}") from None
    return config_from_hf(hf, path.name), "HF folder"


def count_parameters(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        model = Transformer(cfg)
    return sum(p.numel() for p in model.parameters())


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f} MiB" if n_bytes < 2**30 else f"{n_bytes / 2**30:,.2f} GiB"


def inspect_model(name: str) -> dict[str, Any]:
    path = resolve(name)
    cfg, storage = read_config(path)
    n = count_parameters(cfg)
    info: dict[str, Any] = {
        "model": name, "path": str(path), "storage": storage,
        "family": f"{cfg.family} ({cfg.hf_model_type})", "parameters": f"{n:,} ({n / 1e6:.1f}M)",
        "context length": cfg.max_seq_len, "layers": cfg.n_layer + cfg.n_decoder_layer,
        "d_model / heads / kv heads": f"{cfg.d_model} / {cfg.n_head} / {cfg.n_kv_head}",
        "vocabulary": cfg.vocab_size, "positions": cfg.pos,
    }
    for precision, per_param in BYTES_PER_PARAM.items():
        info[f"memory {precision}"] = _size(n * per_param)
    return info
