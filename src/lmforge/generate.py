"""The one generation loop: prefill once, then one token per step from the KV cache.

Decoder-only and encoder-decoder models share it; only the prefill differs (an encoder-decoder
encodes the prompt and starts its decoder from the start token). Rows of a batch are left-padded
and carry their own positions, so batched output equals one-by-one output.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.model.cache import pad_batch
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

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


def sample(logits: Tensor, history: Tensor, p: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """(B, V) logits of the next token -> (B,) token ids. `history` (B, n) holds ids seen so far."""
    logits = logits.float()
    if p.repetition_penalty != 1.0:
        seen = logits.gather(1, history)
        seen = torch.where(seen < 0, seen * p.repetition_penalty, seen / p.repetition_penalty)
        logits = logits.scatter(1, history, seen)
    if p.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the mass before it already reaches top_p (the first one always stays)
        drop = probs.cumsum(dim=-1) - probs >= p.top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def fit_context(model: Transformer, prompt: list[int], max_new_tokens: int, truncate: bool) -> list[int]:
    """A prompt that does not fit the context is an error; with `truncate`, a decoder's prompt loses its
    oldest tokens until it leaves room for max_new_tokens (an encoder input loses its end)."""
    ctx = model.cfg.max_seq_len
    if not prompt:
        raise LmforgeError("empty prompt: nothing to continue from")
    if model.cfg.family == "encoder-decoder":
        if len(prompt) > ctx and not truncate:
            raise LmforgeError(f"context overflow: input has {len(prompt)} tokens, the model's limit is {ctx}")
        return prompt[:ctx]
    if truncate and len(prompt) + max_new_tokens > ctx:
        return prompt[-max(1, ctx - max_new_tokens) :]
    if len(prompt) >= ctx:
        raise LmforgeError(f"context overflow: prompt has {len(prompt)} tokens, the model's context is {ctx}")
    return prompt


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_ids: list[int] | None = None,
    truncate: bool = False,
) -> Iterator[list[int | None]]:
    """Yield, per step, each row's new token id (None once that row has ended on EOS)."""
    params.validate()
    cfg = model.cfg
    if cfg.family == "encoder":
        raise LmforgeError(f"{cfg.name} is an encoder-only model: it embeds text (lmforge embed), it cannot generate")
    eos = set(cfg.eos_token_ids if eos_ids is None else eos_ids)
    prompts = [fit_context(model, p, params.max_new_tokens, truncate) for p in prompts]
    if any(not 0 <= t < cfg.vocab_size for p in prompts for t in p):
        raise LmforgeError(f"prompt holds token ids outside the model's vocabulary (0..{cfg.vocab_size - 1})")
    B = len(prompts)
    # each row may generate until its own context is full, whatever the other rows' lengths
    budget = torch.tensor([params.max_new_tokens] * B)
    tokens, mask = pad_batch(prompts, pad_id=cfg.pad_token_id or 0, left=True)
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None

    if cfg.family == "encoder-decoder":
        memory = model.encode(tokens, mask)
        max_new = params.max_new_tokens
        cache = model.new_cache(B, max_new + 1)
        start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id or 0
        first = torch.full((B, 1), start, dtype=torch.long)
        hidden = model.decode(first, cache, memory=memory, memory_mask=mask)
        history = first
    else:
        budget = budget.clamp(max=cfg.max_seq_len - torch.tensor([len(p) for p in prompts]))
        max_new = int(budget.max())
        cache = model.new_cache(B, tokens.shape[1] + max_new)
        hidden = model.decode(tokens, cache, attention_mask=mask if not bool(mask.all()) else None)
        # pads repeat the row's first token so the repetition penalty counts nothing extra
        history = torch.where(mask.bool(), tokens, tokens.gather(1, (1 - mask).sum(1, keepdim=True)))

    alive = torch.arange(B)  # the prompt row of each batch row still generating
    for step in range(max_new):
        next_ids = sample(model.lm_logits(hidden[:, -1]), history, params, generator)
        new = next_ids.tolist()
        out: list[int | None] = [None] * B
        for row, token in zip(alive.tolist(), new, strict=True):
            out[row] = None if token in eos else token
        yield out
        ended = torch.tensor([t in eos for t in new]) | (budget[alive] <= step + 1)
        if bool(ended.all()) or step == max_new - 1:
            return
        if bool(ended.any()):  # finished rows leave the batch; the others are unaffected (own masks, positions)
            keep = (~ended).nonzero().squeeze(1)
            cache.select(keep)
            alive, history, next_ids = alive[keep], history[keep], next_ids[keep]
        history = torch.cat([history, next_ids[:, None]], dim=1)
        hidden = model.decode(next_ids[:, None], cache)


class TextStream:
    """Token ids -> text deltas that are safe to show: no half UTF-8 characters, no partial stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.prefix, self.read = 0, 0  # decode from `prefix` so merged spaces come out right
        self.text = ""  # decoded so far
        self.shown = 0  # characters of self.text already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        now = self.tokenizer.decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        if self.read < len(self.ids) and not self.stopped:
            before = self.tokenizer.decode(self.ids[self.prefix : self.read])
            self.text += self.tokenizer.decode(self.ids[self.prefix :])[len(before) :]
            self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [i for i in (self.text.find(s, max(0, self.shown - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            end = len(self.text)
        elif final:
            end = len(self.text)
        else:  # hold back a tail that could still grow into a stop string
            hold = max((k for s in self.stop for k in range(len(s) - 1, 0, -1) if self.text.endswith(s[:k])), default=0)
            end = len(self.text) - hold
        delta, self.shown = self.text[self.shown : end], max(self.shown, end)
        return delta


def encode_prompt(
    tokenizer: Tokenizer, prompt: str, chat: bool = False, system: str | None = None
) -> list[int]:
    """Raw text (special tokens as the tokenizer adds them) or one user turn through the chat template."""
    if not chat:
        return tokenizer.encode(prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)


def stream(
    model: Transformer, tokenizer: Tokenizer, prompt: str | list[int], params: SamplingParams | None = None,
    truncate: bool = False,
) -> Iterator[str]:
    """Generate for one prompt, yielding text as it becomes final."""
    params = params or SamplingParams()
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    text = TextStream(tokenizer, params.stop)
    for (token,) in generate_tokens(model, [ids], params, truncate=truncate):
        if token is None:
            break
        delta = text.push(token)
        if delta:
            yield delta
        if text.stopped:
            return
    tail = text.finish()
    if tail:
        yield tail


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[str] | list[list[int]],
    params: SamplingParams | None = None,
    truncate: bool = False,
) -> list[str]:
    """Generate for a batch of prompts of any lengths at once; returns each completion's text."""
    params = params or SamplingParams()
    if not prompts:
        return []
    ids = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    texts = [TextStream(tokenizer, params.stop) for _ in ids]
    for step in generate_tokens(model, ids, params, truncate=truncate):
        for text, token in zip(texts, step, strict=False):
            if token is not None and not text.stopped:
                text.push(token)
        if all(t.stopped for t in texts):
            break
    for text in texts:
        text.finish()
    return [t.text for t in texts]
