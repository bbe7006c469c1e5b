"""THE generation loop, step-driven: add(request) / step() / abort(id).

Each request owns a KV-cache slot, its sampling parameters and its own random generator, so what it generates
never depends on what else runs beside it. A step first advances the prefill of newly added requests (one chunk
each), then decodes one token for every running request in a single batched forward over the cache's slots
0..k: that forward reads each weight once for all rows, which is where throughput comes from. `generate()`,
`stream()`, chat, evaluation and the server's scheduler all drive this one loop.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.model.cache import CacheStep, KVCache
from lmforge.model.transformer import Transformer
from lmforge.sampling import SamplingParams, sample, token_logprobs
from lmforge.textstream import TextStream
from lmforge.tokenizer import Tokenizer

FinishReason = Literal["stop", "length", "eos"]


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    prefill_seconds: float  # from the first prefill chunk to the first token
    decode_seconds: float  # from the first token to the last


@dataclass
class StepOutput:
    """One request's news from one step: a new token (with the text it made final), or its end."""

    request_id: int
    token: int | None  # None: this output only says the request ended on EOS
    text: str = ""  # text that became final with this token (needs a tokenizer; stop strings are cut)
    logprob: float | None = None  # of `token`, when the request asked for logprobs
    top: list[tuple[int, float]] = field(default_factory=list)  # (id, logprob) alternatives
    finish_reason: FinishReason | None = None
    usage: Usage | None = None  # on the request's last output
    eos: int | None = None  # the end-of-sequence id that ended the request (finish_reason "eos")


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    budget: int  # tokens it may generate
    generator: torch.Generator
    text: TextStream | None
    slot: int = -1
    prefilled: int = 0  # prompt tokens in the cache (decoder) / 1 once encoded (encoder-decoder)
    pending: int | None = None  # sampled, handed out, not yet in the cache
    generated: list[int] = field(default_factory=list)
    t_start: float = 0.0
    t_first: float = 0.0

    @property
    def length(self) -> int:
        """Tokens of this row in the cache = the position of its pending token."""
        return self.prefilled + max(len(self.generated) - 1, 0)


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


def decode_step(model: Transformer, tokens: Tensor, positions: Tensor, cache: CacheStep) -> Tensor:
    """One token for each of B rows -> (B, V) next-token logits. No host syncs: torch.compile takes it whole."""
    if model.cfg.family == "encoder-decoder":
        return model(None, positions, cache, decoder_tokens=tokens, read_at=0)
    return model(tokens, positions, cache, read_at=0)


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None = None,
        max_batch: int = 8,
        max_len: int | None = None,  # cache columns per slot; grows on demand up to the context
        prefill_chunk: int = 512,
        eos_ids: list[int] | None = None,
        compile: bool = False,
        prefill_tokens: int = 4096,  # a step prefills several requests together, up to this many (padded) tokens
        kv_dtype: torch.dtype | None = None,  # default: the model's (see Transformer.new_cache)
    ) -> None:
        cfg = model.cfg
        if cfg.family == "encoder":
            raise LmforgeError(f"{cfg.name} is an encoder-only model: it embeds text (lmforge embed), it cannot "
                               "generate")
        if max_batch < 1 or prefill_chunk < 1:
            raise LmforgeError("max_batch and prefill_chunk must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.prefill_chunk, self.prefill_tokens = max_batch, prefill_chunk, prefill_tokens
        self.kv_dtype = kv_dtype
        self.eos = set(cfg.eos_token_ids if eos_ids is None else eos_ids)
        self.device = model.tok_emb.weight.device
        self.cache: KVCache | None = None
        self.max_len = max_len or 0
        self.waiting: deque[_Request] = deque()
        self.running: dict[int, _Request] = {}  # by slot
        self.ids = itertools.count()
        self.decode = torch.compile(decode_step, dynamic=True) if compile else decode_step

    # ---- requests ------------------------------------------------------------------------------

    def add(
        self, prompt: list[int], params: SamplingParams | None = None, truncate: bool = False
    ) -> int:
        """Queue a request (prompt token ids + its own sampling parameters); returns its id."""
        params = params or SamplingParams()
        params.validate()
        cfg = self.model.cfg
        prompt = fit_context(self.model, list(prompt), params.max_new_tokens, truncate)
        if any(not 0 <= t < cfg.vocab_size for t in prompt):
            raise LmforgeError(f"prompt holds token ids outside the model's vocabulary (0..{cfg.vocab_size - 1})")
        if params.stop and self.tokenizer is None:
            raise LmforgeError("stop strings need the engine to have a tokenizer")
        budget = params.max_new_tokens
        if cfg.family == "decoder":  # each row may generate until its own context is full
            budget = min(budget, cfg.max_seq_len - len(prompt))
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        text = TextStream(self.tokenizer, params.stop) if self.tokenizer is not None else None
        request = _Request(next(self.ids), prompt, params, budget, generator, text)
        self.waiting.append(request)
        return request.id

    def abort(self, request_id: int) -> bool:
        """Drop a request, waiting or running; its slot is free for the next one. False if unknown."""
        for r in self.waiting:
            if r.id == request_id:
                self.waiting.remove(r)
                return True
        for r in self.running.values():
            if r.id == request_id:
                self._finish(r)
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def n_running(self) -> int:
        return len(self.running)

    # ---- the step --------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Admit waiting requests, advance prefills by one chunk, decode one token for every running row."""
        out: list[StepOutput] = []
        self._admit()
        decoding = [r for r in self.running.values() if r.pending is not None]
        prefilling = [r for r in self.running.values() if r.pending is None]
        if len(prefilling) > 1 and self.model.cfg.family == "decoder":
            for r, logits in self._prefill_together(prefilling):
                r.t_first = time.perf_counter()
                out.append(self._emit(r, logits))
        for r in prefilling if len(prefilling) == 1 or self.model.cfg.family != "decoder" else []:
            logits = self._prefill_chunk(r)
            if logits is not None:
                r.t_first = time.perf_counter()
                out.append(self._emit(r, logits))
        if decoding:
            logits = self._decode_rows(decoding)
            for r in decoding:
                out.append(self._emit(r, logits[r.slot]))
        return out

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            r = self.waiting[0]
            need = r.budget + 1 if self.model.cfg.family == "encoder-decoder" else len(r.prompt) + r.budget
            self._ensure_cache(need)
            assert self.cache is not None
            self.waiting.popleft()
            r.slot = self.cache.alloc()
            r.t_start = time.perf_counter()
            self.running[r.slot] = r

    def _ensure_cache(self, need: int) -> None:
        """A cache with max_batch slots of at least `need` columns; a bigger one takes over the rows in use."""
        if self.cache is not None and self.cache.max_len >= need:
            return
        cols = max(need, self.max_len)
        cols = min(-(-cols // 64) * 64, max(need, self.model.cfg.max_seq_len))  # whole 64s, within the context
        new = self.model.new_cache(self.max_batch, cols, dtype=self.kv_dtype)
        old = self.cache
        if old is not None:  # rare: rows keep their slots and contents
            new.k[:, :, :, : old.max_len] = old.k
            new.v[:, :, :, : old.max_len] = old.v
            if old.memory_k is not None and new.memory_k is not None and new.memory_valid is not None:
                new.memory_k.copy_(old.memory_k)
                new.memory_v.copy_(old.memory_v)  # type: ignore[union-attr]
                new.memory_valid.copy_(old.memory_valid)  # type: ignore[arg-type]
            new.lengths, new.in_use, new.memory_lengths = old.lengths, old.in_use, old.memory_lengths
        self.cache, self.max_len = new, cols

    def _prefill_chunk(self, r: _Request) -> Tensor | None:
        """Feed the next chunk of r's prompt; at the last one return the next-token logits (V,)."""
        assert self.cache is not None
        model = self.model
        if model.cfg.family == "encoder-decoder":  # encode the whole input, then the decoder's start token
            enc = torch.tensor([r.prompt], device=self.device)
            start = model.cfg.decoder_start_token_id
            first = torch.tensor([[start if start is not None else model.cfg.pad_token_id or 0]], device=self.device)
            positions = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            view = self.cache.step(r.slot, positions, kv_len=1, start=0)
            logits = model(enc, positions, view, decoder_tokens=first, read_at=0)
            r.prefilled = 1
            self.cache.lengths[r.slot] = 1
            return logits[0]
        begin = r.prefilled
        end = min(len(r.prompt), begin + self.prefill_chunk)
        tokens = torch.tensor([r.prompt[begin:end]], device=self.device)
        positions = torch.arange(begin, end, device=self.device)[None]
        view = self.cache.step(r.slot, positions, kv_len=end, start=begin)
        r.prefilled = end
        self.cache.lengths[r.slot] = end
        if end < len(r.prompt):
            model.decoder_forward(tokens, positions, view)
            return None
        return model(tokens, positions, view, read_at=end - begin - 1)[0]

    def _prefill_together(self, rows: list[_Request]) -> list[tuple[_Request, Tensor]]:
        """The next chunk of several requests' prompts in one forward, padded to the longest: a pad sits after its
        row's real tokens, at the next positions of the row's own slot, and is overwritten before it is read (as
        decode's dummy rows). Rows past the step's token budget wait for the next step. -> (request, (V,) logits)
        for each request whose prompt is now all in the cache."""
        assert self.cache is not None
        group: list[tuple[_Request, int, int]] = []
        width = 0
        for r in rows:
            begin = r.prefilled
            end = min(len(r.prompt), begin + self.prefill_chunk)
            wider = max(width, end - begin)
            fits = all(b + wider <= self.cache.max_len for _, b, _ in group) and begin + wider <= self.cache.max_len
            if group and (not fits or wider * (len(group) + 1) > self.prefill_tokens):
                continue
            group.append((r, begin, end))
            width = wider
        tokens = torch.zeros(len(group), width, dtype=torch.long)
        for i, (r, begin, end) in enumerate(group):
            tokens[i, : end - begin] = torch.tensor(r.prompt[begin:end])
        starts = torch.tensor([begin for _, begin, _ in group])
        positions = (starts[:, None] + torch.arange(width)[None]).to(self.device)
        view = self.cache.gather([r.slot for r, _, _ in group], positions, kv_len=int(starts.max()) + width)
        last = torch.tensor([end - begin - 1 for _, begin, end in group], device=self.device)
        logits = self.model(tokens.to(self.device), positions, view, read_at=last)
        done = []
        for i, (r, _, end) in enumerate(group):
            r.prefilled = end
            self.cache.lengths[r.slot] = end
            if end == len(r.prompt):
                done.append((r, logits[i]))
        return done

    def _decode_rows(self, rows: list[_Request]) -> Tensor:
        """One batched forward over slots 0..max slot: rows not decoding now (free, or prefilled this step) ride
        along as dummies that write at their own next free column, which is overwritten before it is read."""
        assert self.cache is not None
        n = max(r.slot for r in rows) + 1
        tokens = [0] * n
        positions = [self.cache.lengths[s] if self.cache.in_use[s] else 0 for s in range(n)]
        for r in rows:
            tokens[r.slot], positions[r.slot] = r.pending, r.length  # type: ignore[assignment]
        kv_len = max(r.length for r in rows) + 1
        tok = torch.tensor(tokens, device=self.device)[:, None]
        pos = torch.tensor(positions, device=self.device)[:, None]
        start = positions[0] if n == 1 else None  # one row: a slice write, cheaper than a scatter
        logits = self.decode(self.model, tok, pos, self.cache.step(0, pos, kv_len=kv_len, start=start))
        for r in rows:
            self.cache.lengths[r.slot] = r.length + 1
        return logits

    def _emit(self, r: _Request, logits: Tensor) -> StepOutput:
        """Sample r's next token from its (V,) logits and say what it means: a token, text, an end."""
        p = r.params
        history = None
        if p.repetition_penalty != 1.0:
            history = torch.tensor(r.prompt + r.generated, device=self.device)[None]
        token = int(sample(logits[None], history, p, r.generator)[0])
        logprob, top = token_logprobs(logits, token, p.logprobs) if p.logprobs is not None else (None, [])
        if token in self.eos and not p.ignore_eos:
            return StepOutput(r.id, None, self._tail(r), logprob, top, "eos", self._finish(r), eos=token)
        r.generated.append(token)
        r.pending = token
        text = r.text.push(token) if r.text is not None else ""
        out = StepOutput(r.id, token, text, logprob, top)
        if r.text is not None and r.text.stopped:
            out.finish_reason, out.usage = "stop", self._finish(r)
        elif len(r.generated) >= r.budget:
            out.text += self._tail(r)
            out.finish_reason, out.usage = "length", self._finish(r)
        return out

    @staticmethod
    def _tail(r: _Request) -> str:
        return r.text.finish() if r.text is not None else ""

    def _finish(self, r: _Request) -> Usage:
        assert self.cache is not None
        self.running.pop(r.slot, None)
        self.cache.release(r.slot)
        now = time.perf_counter()
        first = r.t_first or now
        return Usage(len(r.prompt), len(r.generated), first - r.t_start, now - first)
