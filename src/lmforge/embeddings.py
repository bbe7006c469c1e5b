"""Sentence embeddings from an encoder checkpoint (all-MiniLM-L6-v2 by default), the way
sentence-transformers computes them: tokenize, encode, pool (mean or [CLS]) and optionally L2-normalise,
all as the checkpoint's sentence-transformers config says. `lmforge embed` (embed_cli.py) is the
command-line shell.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.weights.registry import DEFAULT_EMBED_MODEL

if TYPE_CHECKING:  # torch and the model load on first use: `lmforge --help` and other commands stay quick
    import torch

    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer import Tokenizer

__all__ = ["embed", "embed_ids", "load_encoder", "max_tokens"]


def _not_a_decoder(model: str) -> None:
    """Refuse a decoder-only model from its config alone, before its weights are read."""
    from lmforge.model_info import model_family

    if model_family(model) == "decoder":
        raise LmforgeError(f"{model} is a decoder-only model; embeddings need an encoder such as {DEFAULT_EMBED_MODEL}")


@functools.lru_cache(maxsize=4)
def _load_cached(model: str, dtype: str | torch.dtype) -> tuple[Transformer, Tokenizer]:
    from lmforge.weights.load import load

    _not_a_decoder(model)
    return load(model, dtype)


def load_encoder(model: str | Path = DEFAULT_EMBED_MODEL, dtype: str | torch.dtype = "float32") -> tuple[
    Transformer, Tokenizer
]:
    """The (model, tokenizer) `embed` uses, loaded once per process for each (model, dtype)."""
    return _load_cached(str(model), dtype)


def max_tokens(model: Transformer) -> int:
    """Inputs are cut to this many tokens: sentence-transformers' max_seq_length, else the model's context."""
    cfg = model.cfg
    return min(cfg.truncate_len, cfg.max_seq_len) if cfg.truncate_len else cfg.max_seq_len


def embed(
    texts: list[str] | str,
    model: str | Path = DEFAULT_EMBED_MODEL,
    batch_size: int = 64,
    dtype: str | torch.dtype = "float32",
    progress: bool = False,
) -> np.ndarray:
    """Texts -> (n, dim) float32 sentence embeddings, in input order.

    Texts longer than the model's limit are truncated, with one warning per call saying how many.
    `progress` shows a progress bar on stderr (the CLI turns it on).
    """
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list | tuple) or not all(isinstance(t, str) for t in texts):
        raise LmforgeError("embed() takes a string or a list of strings")
    if batch_size < 1:
        raise LmforgeError(f"batch_size must be >= 1, got {batch_size}")
    encoder, tokenizer = load_encoder(model, dtype)
    dim = encoder.cfg.d_model
    if not texts:
        return np.zeros((0, dim), dtype=np.float32)

    limit = max_tokens(encoder)
    ids, truncated = tokenizer.encode_batch_truncated(list(texts), max_length=limit)
    if any(truncated):
        warnings.warn(
            f"{sum(truncated)} of {len(texts)} texts were longer than {limit} tokens and were truncated",
            stacklevel=2,
        )

    return embed_ids(encoder, ids, batch_size, progress, tokenizer.pad_id)


def embed_ids(
    encoder: Transformer, ids: list[list[int]], batch_size: int = 64, progress: bool = False, pad_id: int | None = None
) -> np.ndarray:
    """Token ids (already cut to `max_tokens`) -> (n, dim) float32 sentence embeddings, in input order. The pad
    id only fills masked positions: the config's, else the tokenizer's `pad_id`, else 0."""
    import torch
    from rich.console import Console
    from rich.progress import Progress

    if encoder.cfg.pad_token_id is not None:
        pad_id = encoder.cfg.pad_token_id
    # longest first, so each batch pads only to its own longest row and the largest batch is met first
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = np.empty((len(ids), encoder.cfg.d_model), dtype=np.float32)
    bar = Progress(console=Console(stderr=True), transient=True, disable=not progress)
    # not around load_encoder: cached weights must stay usable with autograd
    with torch.inference_mode(), bar:
        task = bar.add_task("embedding", total=len(order))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            out[rows] = _embed_batch(encoder, [ids[i] for i in rows], pad_id or 0)
            bar.advance(task, len(rows))
    return out


def _embed_batch(encoder: Transformer, batch: list[list[int]], pad_id: int) -> np.ndarray:
    from lmforge.data.collate import pad_batch

    tokens, mask = pad_batch(batch, pad_id)
    device = encoder.tok_emb.weight.device
    return encoder(tokens.to(device), attention_mask=mask.to(device), head="pool").float().cpu().numpy()
