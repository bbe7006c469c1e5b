"""Token-level perplexity of a decoder over a text: the whole text in one window when it fits, else a sliding
window whose every token after the first window is scored with at least `window - stride` tokens of context."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.model.transformer import Transformer


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # summed negative log-likelihood (nats)
    tokens: int  # tokens scored (every token but the first)


@torch.inference_mode()
def perplexity(model: Transformer, ids: list[int], window: int | None = None, stride: int | None = None) -> Perplexity:
    """exp(mean -log p(token | everything before it in its window)) over ids[1:]."""
    if model.cfg.family != "decoder":
        raise LmforgeError("perplexity needs a decoder-only model")
    if len(ids) < 2:
        raise LmforgeError("perplexity needs at least two tokens of text")
    window = min(window or model.cfg.max_seq_len, model.cfg.max_seq_len)
    stride = stride or window // 2
    if not 0 < stride <= window:
        raise LmforgeError(f"stride must be in 1..{window}, got {stride}")
    device = model.tok_emb.weight.device
    nll, scored, begin = 0.0, 1, 0  # tokens [0, scored) are done: the first token has no prediction
    while scored < len(ids):
        end = min(begin + window, len(ids))
        tokens = torch.tensor([ids[begin:end]], device=device)
        logits = model(tokens, torch.arange(end - begin, device=device)[None]).float()  # (1, T, V)
        first = scored - begin  # score targets from index `first` of this window on
        targets = tokens[0, first:]
        nll += F.cross_entropy(logits[0, first - 1 : -1], targets, reduction="sum").item()
        scored = end
        begin = max(end - window + stride, begin + stride) if end < len(ids) else end
        begin = min(begin, scored - 1)
    n = len(ids) - 1
    return Perplexity(math.exp(nll / n), nll, n)
