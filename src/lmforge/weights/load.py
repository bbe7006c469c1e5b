"""Load any supported checkpoint into the one Transformer, and export it as an HF folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.weights.gguf import is_gguf, load_gguf
from lmforge.weights.hf import load_hf_folder, save_hf_folder
from lmforge.weights.registry import resolve

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LmforgeError(f"unknown dtype {dtype!r} (use one of: {', '.join(DTYPES)})")
    return DTYPES[dtype]


def build(cfg: ModelConfig, state: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> Transformer:
    """Config + our state dict -> an eval-mode model, without a wasted random initialisation."""
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = set(model.state_dict())
    state = {k: v for k, v in state.items() if k in expected or not k.startswith("pooler.")}  # BERT's unused pooler
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        what = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise LmforgeError(f"weights do not fit the config: {what}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(model.get_parameter(name).shape):
            raise LmforgeError(f"wrong shape for {name}: {tuple(tensor.shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    model.init_buffers()
    return model.eval().requires_grad_(False)


def load(name: str | Path, dtype: str | torch.dtype = torch.float32) -> tuple[Transformer, Tokenizer]:
    """A short name, GGUF file or HF folder -> (model, tokenizer)."""
    path = resolve(str(name))
    dt = parse_dtype(dtype)
    if path.is_file():
        if path.suffix != ".gguf" and not is_gguf(path):
            raise LmforgeError(f"{path} is neither a GGUF file nor a model folder")
        cfg, state, meta = load_gguf(path)
        tokenizer = Tokenizer.from_gguf(meta)
    else:
        cfg, state = load_hf_folder(path)
        tokenizer = Tokenizer.from_dir(path)
        _apply_sentence_config(cfg, path)
    return build(cfg, state, dt), tokenizer


# sentence-transformers' pooling switches, old style (one bool each) -> the mode names of its newer configs
_ST_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken",
}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(f"bad {path.name} in {path.parent}: {e}") from None


def _apply_sentence_config(cfg: ModelConfig, folder: Path) -> None:
    """sentence-transformers folders say how to pool, whether to normalise and where to truncate; follow them,
    and refuse a module we do not implement (Dense, max pooling, ...) rather than return different vectors."""
    pooling_dir = folder / "1_Pooling"
    if (folder / "modules.json").exists():
        for module in _read_json(folder / "modules.json"):
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            if kind == "Pooling":
                pooling_dir = folder / module.get("path", "1_Pooling")
            elif kind == "Normalize":
                cfg.normalize_embeddings = True
            elif kind != "Transformer":
                raise LmforgeError(f"sentence-transformers module {module.get('type')!r} in {folder} is not "
                                   "supported (Transformer, Pooling, Normalize)")
    if (pooling_dir / "config.json").exists():
        spec = _read_json(pooling_dir / "config.json")
        mode = spec.get("pooling_mode") or [m for flag, m in _ST_POOLING_FLAGS.items() if spec.get(flag)]
        modes = [mode] if isinstance(mode, str) else list(mode)
        if modes not in (["mean"], ["cls"]):
            raise LmforgeError(f"pooling {'+'.join(modes) or 'none'} in {pooling_dir} is not supported (mean, cls)")
        cfg.pooling = modes[0]
    elif cfg.family == "encoder":
        cfg.pooling = "mean"  # what sentence-transformers does with a plain transformers encoder
    limit = None
    if (folder / "sentence_bert_config.json").exists():
        limit = _read_json(folder / "sentence_bert_config.json").get("max_seq_length")
    if limit is None and cfg.family == "encoder" and (folder / "tokenizer_config.json").exists():
        # sentence-transformers 5+ keeps the limit only here, as the tokenizer's model_max_length
        limit = _read_json(folder / "tokenizer_config.json").get("model_max_length")
    if isinstance(limit, int) and 0 < limit < cfg.max_seq_len:
        cfg.truncate_len = limit


def export_hf(model: Transformer, tokenizer: Tokenizer, folder: Path) -> None:
    """Write config.json + model.safetensors + tokenizer files that transformers (and we) load; an
    embedding model also gets the sentence-transformers files that say how it pools and truncates."""
    folder = Path(folder)
    save_hf_folder(model.cfg, dict(model.state_dict()), folder)
    tokenizer.save(folder, model_max_length=model.cfg.max_seq_len)
    if model.cfg.family == "encoder" and model.cfg.pooling != "none":
        _write_sentence_config(model.cfg, folder)


def _write_sentence_config(cfg: ModelConfig, folder: Path) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if cfg.normalize_embeddings:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (folder / "1_Pooling").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": cfg.d_model, "pooling_mode_cls_token": cfg.pooling == "cls",
               "pooling_mode_mean_tokens": cfg.pooling == "mean"}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")
    limit = cfg.truncate_len or cfg.max_seq_len
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": limit}) + "\n")


def default_dtype() -> str:
    """float32: measured with benchmarks/decode.py on an AVX512-BF16 CPU, bf16 prefills faster but decodes
    slower (its matrix-vector kernels do not reach the memory bandwidth fp32's do), and decode is what a
    chat waits on. Models run on the CPU for now; a device-aware default comes with GPU support."""
    return "float32"
