"""What a model is, without loading its weights: family, size, context, memory at each precision.

The weights are still checked, from their headers: every tensor the config needs is there with the right
shape, and the files hold all the bytes their headers promise (see weights/check.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.weights.check import GgufHeader, check_gguf, check_hf_folder, meta_model, scan_gguf
from lmforge.weights.gguf import config_from_gguf, is_gguf
from lmforge.weights.hf import config_from_hf
from lmforge.weights.registry import resolve


def read_config(path: Path) -> tuple[ModelConfig, str]:
    """(config, storage description) from a GGUF header or an HF config.json."""
    cfg, storage, _ = _read_config(path)
    return cfg, storage


def _read_config(path: Path) -> tuple[ModelConfig, str, GgufHeader | None]:
    if path.is_file():
        _require_gguf(path)
        header = scan_gguf(path)  # checks every count and size, and is much quicker than gguf-py's reader
        return config_from_gguf(header.metadata, path.stem), f"GGUF ({', '.join(header.type_names())})", header
    return config_from_hf(_hf_config(path), path.name), "HF folder", None


def _require_gguf(path: Path) -> None:
    if path.suffix != ".gguf" and not is_gguf(path):
        raise LmforgeError(f"{path} is neither a GGUF file nor a model folder")


def _hf_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON, bad UTF-8, numbers too long to convert
        raise LmforgeError(f"bad or missing config.json in {folder}: {str(e).splitlines()[0][:200]}") from None


def read_config_file(path: Path) -> ModelConfig:
    """Our own ModelConfig fields as JSON, or an HF config.json."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"cannot read config file {path}: {e}") from None
    if not isinstance(raw, dict):
        raise LmforgeError(f"config file {path} must hold a JSON object")
    if "model_type" in raw:
        return config_from_hf(raw, name=path.stem)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise LmforgeError(f"config file {path}: unknown field(s) {', '.join(unknown)}")
    try:
        return ModelConfig(**raw)
    except TypeError as e:
        raise LmforgeError(f"config file {path}: {e}") from None


def memory_table(
    model: str | None, config: str | None, dtype: str, context: int | None, batch: int, budget_gib: float
) -> Any:
    """`lmforge inspect --memory`: a rich table of memory.plan for a model (its header) or a config."""
    from rich.table import Table

    from lmforge.memory import plan

    if (model is None) == (config is None):
        raise LmforgeError("give a model or --config (a preset such as llama2-7b, or a config.json), not both")
    if config is not None:
        cfg = read_config_file(Path(config)) if config.endswith(".json") else ModelConfig.from_name(config)
    else:
        cfg = read_config(resolve(model))[0]  # type: ignore[arg-type]
    p = plan(cfg, dtype, context, batch)
    context = context or cfg.max_seq_len
    table = Table(title=f"{cfg.name} at {dtype}, {context:,} tokens x {batch}", show_header=False)
    for label, value in (("weights", p.weights), ("KV cache", p.kv_cache), ("activations", p.activations),
                         ("runtime (PyTorch, tokenizer)", p.runtime)):
        table.add_row(label, _size(value))
    verdict = "fits" if p.total <= budget_gib * 2**30 else "does NOT fit"
    table.add_row("total", f"{_size(p.total)}: {verdict} in {budget_gib:g} GiB")
    return table


def model_family(name: str) -> str:
    """'decoder', 'encoder' or 'encoder-decoder', from the config alone: no weights are read."""
    return _family(name)[0]


def _family(name: str) -> tuple[str, str]:
    path = resolve(name)
    if path.is_file():
        _require_gguf(path)
        return "decoder", "llama"  # the GGUF architectures we read are all decoders
    cfg = config_from_hf(_hf_config(path), path.name)
    return cfg.family, cfg.hf_model_type


def require_generator(name: str) -> None:
    """Refuse an encoder-only model for generate/chat before its weights are loaded."""
    family, kind = _family(name)
    if family == "encoder":
        raise LmforgeError(f"{name} is an encoder-only model ({kind}): it embeds text, use `lmforge embed`")


def count_parameters(cfg: ModelConfig) -> int:
    """Built on the meta device: nothing is allocated."""
    return sum(p.numel() for p in meta_model(cfg).parameters())


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f} MiB" if n_bytes < 2**30 else f"{n_bytes / 2**30:,.2f} GiB"


def inspect_model(name: str) -> dict[str, Any]:
    path = resolve(name)
    cfg, storage, header = _read_config(path)
    # the weights, from their headers: every tensor the config needs, of the right shape, all bytes present
    expected = check_gguf(header, cfg, str(path)) if header is not None else check_hf_folder(path, cfg)
    n = sum(math.prod(shape) for shape in expected.values())  # = count_parameters(cfg): tied copies left out
    info: dict[str, Any] = {
        "model": name, "path": str(path), "storage": storage,
        "family": f"{cfg.family} ({cfg.hf_model_type})", "parameters": f"{n:,} ({n / 1e6:.1f}M)",
        "context length": cfg.max_seq_len, "layers": cfg.n_layer + cfg.n_decoder_layer,
        "d_model / heads / kv heads": f"{cfg.d_model} / {cfg.n_head} / {cfg.n_kv_head}",
        "vocabulary": cfg.vocab_size, "positions": cfg.pos,
    }
    from lmforge.memory import weight_bytes

    for precision in ("float32", "bfloat16", "int8", "int4"):  # the weights as load holds them (memory.py)
        info[f"weights {precision}"] = _size(weight_bytes(cfg, precision))
    return info
