"""Generation for a caller who wants results, not steps: whole completions, streamed text, chat prompts.

All of it drives the one engine (engine.py); nothing here decodes on its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lmforge.engine import Engine, FinishReason, StepOutput, Usage, fit_context
from lmforge.errors import LmforgeError
from lmforge.model.transformer import Transformer
from lmforge.sampling import SamplingParams, sample
from lmforge.textstream import TextStream
from lmforge.tokenizer import Tokenizer

__all__ = [
    "Completion", "SamplingParams", "TextStream", "complete", "completion_dict", "encode_prompt", "fit_context",
    "generate", "sample", "stream", "stream_outputs",
]


@dataclass
class Completion:
    text: str
    finish_reason: FinishReason
    usage: Usage
    tokens: list[StepOutput] = field(default_factory=list)  # each generated token, with logprobs if asked
    eos: int | None = None  # the end-of-sequence id the model chose to stop with (finish_reason "eos")


def encode_prompt(
    tokenizer: Tokenizer, prompt: str, chat: bool = False, system: str | None = None
) -> list[int]:
    """Raw text (special tokens as the tokenizer adds them) or one user turn through the chat template."""
    if not chat:
        return tokenizer.encode(prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)


def _ids(tokenizer: Tokenizer | None, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise LmforgeError("a text prompt needs a tokenizer")
        return tokenizer.encode(prompt)
    return list(prompt)


def stream_outputs(
    model: Transformer, tokenizer: Tokenizer, prompt: str | list[int], params: SamplingParams | None = None,
    truncate: bool = False,
) -> Iterator[StepOutput]:
    """The engine's outputs for one prompt, as they come; the last one has finish_reason and usage."""
    engine = Engine(model, tokenizer, max_batch=1)
    engine.add(_ids(tokenizer, prompt), params, truncate=truncate)
    while engine.has_work():
        yield from engine.step()


def stream(
    model: Transformer, tokenizer: Tokenizer, prompt: str | list[int], params: SamplingParams | None = None,
    truncate: bool = False,
) -> Iterator[str]:
    """Generate for one prompt, yielding text as it becomes final."""
    for out in stream_outputs(model, tokenizer, prompt, params, truncate):
        if out.text:
            yield out.text


def complete(
    model: Transformer, tokenizer: Tokenizer | None, prompts: list[str] | list[list[int]],
    params: SamplingParams | list[SamplingParams] | None = None, truncate: bool = False, max_batch: int = 32,
    eos_ids: list[int] | None = None,
) -> list[Completion]:
    """Generate for many prompts at once (up to max_batch decoding together); results in prompt order. `params`
    is shared, or one per prompt (e.g. each sample of a self-consistency vote with its own seed). Without a
    tokenizer the prompts are token ids and the texts stay empty."""
    if isinstance(params, list) and len(params) != len(prompts):
        raise LmforgeError(f"{len(params)} sampling parameter sets for {len(prompts)} prompts")
    each = params if isinstance(params, list) else [params] * len(prompts)
    engine = Engine(model, tokenizer, max_batch=max_batch, eos_ids=eos_ids)
    order = [engine.add(_ids(tokenizer, p), q, truncate=truncate) for p, q in zip(prompts, each, strict=True)]
    texts: dict[int, list[str]] = {i: [] for i in order}
    tokens: dict[int, list[StepOutput]] = {i: [] for i in order}
    done: dict[int, Completion] = {}
    while engine.has_work():
        for out in engine.step():
            texts[out.request_id].append(out.text)
            if out.token is not None:
                tokens[out.request_id].append(out)
            if out.finish_reason is not None:
                assert out.usage is not None
                rid = out.request_id
                done[rid] = Completion("".join(texts[rid]), out.finish_reason, out.usage, tokens[rid], out.eos)
    return [done[i] for i in order]


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[str] | list[list[int]],
    params: SamplingParams | None = None,
    truncate: bool = False,
) -> list[str]:
    """Generate for a batch of prompts of any lengths at once; returns each completion's text."""
    return [c.text for c in complete(model, tokenizer, prompts, params, truncate)]


def completion_dict(completion: Completion, tokenizer: Tokenizer, logprobs: bool) -> dict[str, Any]:
    """A completion as the JSON object `lmforge generate --format json` prints (OpenAI-like field names)."""

    def piece(i: int) -> str:
        return tokenizer.decode([i], skip_special_tokens=False)

    tokens = []
    for out in completion.tokens:
        assert out.token is not None
        entry: dict[str, Any] = {"id": out.token, "token": piece(out.token)}
        if logprobs:
            entry["logprob"] = out.logprob
            entry["top"] = [{"id": i, "token": piece(i), "logprob": lp} for i, lp in out.top]
        tokens.append(entry)
    usage = completion.usage
    return {
        "text": completion.text, "finish_reason": completion.finish_reason,
        "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                  "total_tokens": usage.prompt_tokens + usage.completion_tokens},
        "tokens": tokens,
    }
