"""Per-request sampling: parameters, and the next token from one row's logits."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmforge.errors import LmforgeError


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: a fresh random seed per request
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # report each token's log-prob and this many top alternatives (0 = just its own)
    ignore_eos: bool = False  # keep going past EOS (benchmarks; vLLM and llama-server accept it too)

    def validate(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise LmforgeError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise LmforgeError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.max_new_tokens < 1:
            raise LmforgeError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise LmforgeError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise LmforgeError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LmforgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise LmforgeError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise LmforgeError("stop strings must not be empty")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise LmforgeError(f"logprobs must be in [0, 20], got {self.logprobs}")


NUCLEUS_CANDIDATES = 256


def sample(
    logits: Tensor, history: Tensor | None, p: SamplingParams, generator: torch.Generator | None
) -> Tensor:
    """(B, V) logits of the next token -> (B,) token ids. `history` (B, n) holds the ids seen so far (needed only
    with a repetition penalty)."""
    logits = logits.float()
    if p.repetition_penalty != 1.0 and history is not None:
        seen = logits.gather(1, history)
        seen = torch.where(seen < 0, seen * p.repetition_penalty, seen / p.repetition_penalty)
        logits = logits.scatter(1, history, seen)
    if p.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if p.top_p >= 1.0:
        return draw(probs, generator)
    # the nucleus is rarely more than a few dozen tokens: look for it among the most likely NUCLEUS_CANDIDATES
    # first; sorting the whole vocabulary (~6 ms for 49k tokens, more than a decode step) only when their mass
    # falls short of top_p
    top, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)  # descending
    if top.shape[-1] < probs.shape[-1] and bool((top.sum(dim=-1) < p.top_p).any()):
        top, order = probs.sort(dim=-1, descending=True)
    # drop a token once the mass before it already reaches top_p (the first one always stays)
    top = top.masked_fill(top.cumsum(dim=-1) - top >= p.top_p, 0.0)
    return order.gather(1, draw(top, generator)[:, None]).squeeze(1)


def draw(weights: Tensor, generator: torch.Generator | None) -> Tensor:
    """(B, n) non-negative weights -> (B,) one index per row, drawn with probability proportional to its weight.
    By the inverse CDF: one uniform number per row (torch.multinomial takes ~1.5 ms over 49k tokens on CPU)."""
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(weights.shape[0], 1, generator=generator, device=weights.device, dtype=cdf.dtype) * total
    index = torch.searchsorted(cdf, u, right=True)
    # u rounds up to the total once in ~10^7 draws: the last entry of positive weight, never a zero-weight one
    return torch.minimum(index, (cdf < total).sum(dim=-1, keepdim=True)).squeeze(1)


def token_logprobs(logits: Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-softmax of the model's raw next-token logits (V,) (before temperature and penalties, as OpenAI and
    vLLM report them): the chosen token's log-prob and the `top` most likely (id, log-prob) pairs."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logp, top) if top else None
    alternatives = list(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else []
    return float(logp[token]), alternatives
