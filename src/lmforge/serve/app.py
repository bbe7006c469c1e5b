"""The FastAPI app: OpenAI's /v1 routes over the scheduler, API keys, the chat page and its feedback file.

Handlers only translate: a request body becomes prompt ids and SamplingParams (every bad value reported by name
before anything runs), the scheduler's engine outputs become OpenAI JSON or server-sent events.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge import __version__
from lmforge.engine import Engine, StepOutput
from lmforge.errors import LmforgeError
from lmforge.model.transformer import Transformer
from lmforge.rag.answer import NOTHING, citations, conversation_with_sources, retrieve_sources
from lmforge.rag.retrieve import Hit
from lmforge.rag.store import Store
from lmforge.sampling import SamplingParams
from lmforge.serve import protocol as p
from lmforge.serve.scheduler import Aborted, Job, Overloaded, Scheduler
from lmforge.tokenizer import Tokenizer

FINGERPRINT = f"lmforge-{__version__}"
MAX_CHOICES = 16
MAX_STOPS = 16


class ApiError(Exception):
    """Answered as OpenAI's error JSON with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {401: "authentication_error", 404: "not_found_error", 503: "server_overloaded"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


@dataclass
class ServeOptions:
    name: str  # the chat model's id in /v1/models and in requests
    embed_name: str | None = None
    api_keys: list[str] = field(default_factory=list)
    max_batch: int = 32
    max_queue: int = 64
    max_tokens: int = 1024  # a request that names no max_tokens gets this (or what is left of the context)
    temperature: float = 0.2  # the chat defaults measured for `lmforge chat`
    top_p: float = 0.9
    max_body: int = 4 * 2**20
    feedback: Path | None = None  # the chat page's thumbs go here (JSONL)
    rag_store: str | None = None  # a RAG store (SQLite file or postgresql:// URL): chat requests may ask for it
    shutdown_grace: float = 30.0


@dataclass
class Served:
    model: Transformer
    tokenizer: Tokenizer
    options: ServeOptions
    scheduler: Scheduler
    encoder: Transformer | None = None
    encoder_tokenizer: Tokenizer | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    feedback_lock: threading.Lock = field(default_factory=threading.Lock)
    store: Store | None = None
    store_lock: threading.Lock = field(default_factory=threading.Lock)  # one store connection, one user at a time


# ---- request checks ------------------------------------------------------------------------------------


def _require(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise ApiError(400, message, param=param)


def _check_model(served: Served, name: str, kind: str) -> None:
    own = served.options.name if kind == "chat" else served.options.embed_name
    if name != own:
        names = ", ".join(n for n in (served.options.name, served.options.embed_name) if n)
        what = "chat/completions model" if kind == "chat" else "embedding model"
        raise ApiError(404, f"model {name!r} is not served here as a {what} (this server serves: {names})",
                       param="model", code="model_not_found")


def _sampling(served: Served, body: p.SamplingFields, prompt_len: int, max_tokens: int | None,
              logprobs: int | None) -> list[SamplingParams]:
    """One SamplingParams per choice; every value checked and named when bad."""
    opts, ctx = served.options, served.model.cfg.max_seq_len
    temperature = opts.temperature if body.temperature is None else body.temperature
    top_p = opts.top_p if body.top_p is None else body.top_p
    _require(0 <= temperature <= 2, f"temperature must be in [0, 2], got {temperature}", "temperature")
    _require(0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}", "top_p")
    _require(body.top_k is None or body.top_k >= 0, f"top_k must be >= 0, got {body.top_k}", "top_k")
    penalty = 1.0 if body.repetition_penalty is None else body.repetition_penalty
    _require(0 < penalty <= 10, f"repetition_penalty must be in (0, 10], got {penalty}", "repetition_penalty")
    for name in ("presence_penalty", "frequency_penalty"):
        _require(not getattr(body, name), f"{name} is not supported (only 0)", name)
    _require(1 <= body.n <= MAX_CHOICES, f"n must be in [1, {MAX_CHOICES}], got {body.n}", "n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    _require(len(stop) <= MAX_STOPS, f"at most {MAX_STOPS} stop strings, got {len(stop)}", "stop")
    _require(all(stop), "stop strings must not be empty", "stop")
    _require(logprobs is None or 0 <= logprobs <= 20, f"logprobs must be in [0, 20], got {logprobs}", "logprobs")
    if prompt_len >= ctx:
        raise ApiError(400, f"context overflow: the prompt has {prompt_len} tokens, the model's context is {ctx}",
                       param="messages", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(opts.max_tokens, ctx - prompt_len)
    _require(max_tokens >= 1, f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
    if prompt_len + max_tokens > ctx:
        raise ApiError(400, f"context overflow: {prompt_len} prompt tokens + max_tokens {max_tokens} exceed the "
                       f"model's context of {ctx}", param="max_tokens", code="context_length_exceeded")
    seed = None if body.seed is None else body.seed % 2**63
    return [
        SamplingParams(
            max_new_tokens=max_tokens, temperature=temperature, top_k=body.top_k or 0, top_p=top_p,
            repetition_penalty=penalty, seed=None if seed is None else (seed + i) % 2**63, stop=stop,
            logprobs=logprobs, ignore_eos=body.ignore_eos,
        )
        for i in range(body.n)
    ]


def _turns(messages: list[p.ChatMessage]) -> list[dict[str, str]]:
    _require(bool(messages), "messages must not be empty", "messages")
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


def _chat_prompt(served: Served, turns: list[dict[str, str]]) -> list[int]:
    tokenizer = served.tokenizer
    if not tokenizer.chat_template:
        raise ApiError(400, f"{served.options.name} has no chat template: use /v1/completions", param="messages")
    try:
        text = tokenizer.apply_chat_template(turns)
    except LmforgeError as e:
        raise ApiError(400, str(e), param="messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


def _completion_prompts(served: Served, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    vocab = served.model.cfg.vocab_size
    if isinstance(prompt, str):
        prompts = [served.tokenizer.encode(prompt)]
    elif prompt and all(isinstance(x, int) for x in prompt):
        prompts = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = [served.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in prompt]  # type: ignore[union-attr]
    _require(bool(prompts) and all(prompts), "prompt must not be empty", "prompt")
    _require(all(0 <= t < vocab for ids in prompts for t in ids),
             f"prompt holds token ids outside the vocabulary (0..{vocab - 1})", "prompt")
    return prompts


# ---- running a job ------------------------------------------------------------------------------------


@dataclass
class Choice:
    """What one choice has produced so far."""

    text: str = ""
    outputs: list[StepOutput] = field(default_factory=list)  # generated tokens (with logprobs when asked)
    finish_reason: str | None = None
    completion_tokens: int = 0


def _finish_reason(out: StepOutput) -> str | None:
    return {"eos": "stop", None: None}.get(out.finish_reason, out.finish_reason)  # type: ignore[arg-type]


def _absorb(choice: Choice, item: StepOutput | Aborted) -> None:
    if isinstance(item, Aborted):
        choice.finish_reason = "abort"
        return
    choice.text += item.text
    if item.token is not None:
        choice.outputs.append(item)
    if item.finish_reason is not None:
        choice.finish_reason = _finish_reason(item)
        choice.completion_tokens = item.usage.completion_tokens if item.usage else len(choice.outputs)


def _submit(served: Served, prompts: list[tuple[list[int], SamplingParams]]) -> Job:
    try:
        return served.scheduler.submit(Job(prompts, asyncio.get_running_loop()))
    except Overloaded as e:
        raise ApiError(503, f"{e}; retry later", code="overloaded") from None


async def _collect(served: Served, job: Job, request: Request) -> list[Choice]:
    """Wait for every choice of a non-streaming job; a client that hangs up gets its job aborted."""
    choices = [Choice() for _ in job.prompts]
    left = len(choices)
    try:
        while left:
            try:
                index, item = await asyncio.wait_for(job.queue.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    return choices
                continue
            if isinstance(item, BaseException):
                raise item
            _absorb(choices[index], item)
            left -= choices[index].finish_reason is not None
    finally:
        if left:
            served.scheduler.abort(job)
    return choices


def _piece(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def _chat_logprobs(tokenizer: Tokenizer, outputs: list[StepOutput]) -> p.ChoiceLogprobs:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        piece = _piece(tokenizer, token)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

    return p.ChoiceLogprobs(content=[
        p.TokenLogprob(**entry(o.token, o.logprob or 0.0), top_logprobs=[p.TopLogprob(**entry(*t)) for t in o.top])
        for o in outputs if o.token is not None
    ])


def _completion_logprobs(tokenizer: Tokenizer, outputs: list[StepOutput], offset: int) -> p.CompletionLogprobs:
    tokens, offsets = [], []
    for o in outputs:
        assert o.token is not None
        tokens.append(_piece(tokenizer, o.token))
        offsets.append(offset)
        offset += len(tokens[-1])
    return p.CompletionLogprobs(
        tokens=tokens, token_logprobs=[o.logprob for o in outputs], text_offset=offsets,
        top_logprobs=[{_piece(tokenizer, t): lp for t, lp in o.top} for o in outputs],
    )


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _events(served: Served, job: Job, head: dict[str, Any],
                  chunk: Callable[[int, Choice, StepOutput | Aborted | None], Any],
                  usage: Callable[[list[Choice]], p.Usage] | None) -> AsyncIterator[str]:
    """A job's outputs as server-sent events: one chunk per choice to start, one per output, usage, [DONE].
    Closing the generator early (the client hung up) aborts whatever of the job still runs."""
    choices = [Choice() for _ in job.prompts]
    left = len(choices)
    try:
        for index, choice in enumerate(choices):
            first = chunk(index, choice, None)
            if first is not None:
                yield _sse(first)
        while left:
            index, item = await job.queue.get()
            if isinstance(item, BaseException):
                message = str(item) if isinstance(item, LmforgeError) else f"internal error: {type(item).__name__}"
                yield _sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
                return
            _absorb(choices[index], item)
            body = chunk(index, choices[index], item)
            if body is not None:
                yield _sse(body)
            left -= choices[index].finish_reason is not None
        if usage is not None:
            yield _sse({**head, "choices": [], "usage": usage(choices).model_dump()})
        yield "data: [DONE]\n\n"
    finally:
        if left:
            served.scheduler.abort(job)


def _stream(served: Served, job: Job, head: dict[str, Any],
            chunk: Callable[[int, Choice, StepOutput | Aborted | None], Any],
            usage: Callable[[list[Choice]], p.Usage] | None) -> StreamingResponse:
    """`head`: the fields every event of this response repeats (id, object, created, model, ...)."""
    return StreamingResponse(_events(served, job, head, chunk, usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- routes ----------------------------------------------------------------------------------------------


def _served(request: Request) -> Served:
    return request.app.state.served


bearer = HTTPBearer(auto_error=False, description="the server's API key (lmforge serve --api-key)")


def _authorize(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    keys = _served(request).options.api_keys
    if not keys:
        return
    given = credentials.credentials if credentials is not None else request.headers.get("x-api-key", "")
    if not any(secrets.compare_digest(given.encode(), k.encode()) for k in keys):
        what = "wrong API key" if given else "missing API key (send Authorization: Bearer KEY)"
        raise ApiError(401, what, code="invalid_api_key")


STREAM_OK = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                   "description": "JSON, or server-sent events with stream: true"}}
GENERATE_ERRORS = p.error_responses(400, 401, 404, 413, 422, 503)

api = APIRouter(prefix="/v1", dependencies=[Depends(_authorize)])


@api.get("/models", response_model=p.ModelList, responses=p.error_responses(401))
def list_models(request: Request) -> p.ModelList:
    served = _served(request)
    cards = [p.ModelCard(id=served.options.name, created=served.created, kind="chat",
                         context_length=served.model.cfg.max_seq_len)]
    if served.encoder is not None and served.options.embed_name:
        cards.append(p.ModelCard(id=served.options.embed_name, created=served.created, kind="embedding",
                                 context_length=served.encoder.cfg.max_seq_len))
    return p.ModelList(data=cards)


@api.get("/models/{model_id:path}", response_model=p.ModelCard, responses=p.error_responses(401, 404))
def get_model(model_id: str, request: Request) -> p.ModelCard:
    for card in list_models(request).data:
        if card.id == model_id:
            return card
    raise ApiError(404, f"model {model_id!r} is not served here", param="model", code="model_not_found")


@api.post("/chat/completions", response_model=p.ChatCompletion, responses={**STREAM_OK, **GENERATE_ERRORS})
async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Any:
    served = _served(request)
    _check_model(served, body.model, "chat")
    _require(body.top_logprobs is None or body.logprobs, "top_logprobs needs logprobs: true", "top_logprobs")
    turns = _turns(body.messages)
    hits: list[Hit] | None = None
    if body.rag:
        hits = await _sources(served, turns, body.rag if isinstance(body.rag, p.RagOptions) else p.RagOptions())
        if not hits:
            return _nothing_found(body)
        turns = conversation_with_sources(turns, hits)
    prompt = _chat_prompt(served, turns)
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = _sampling(served, body, len(prompt), body.max_completion_tokens or body.max_tokens, top)
    job = _submit(served, [(prompt, q) for q in params])
    rid, created, tokenizer = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), served.tokenizer

    def usage(choices: list[Choice]) -> p.Usage:
        done = sum(c.completion_tokens for c in choices)
        return p.Usage(prompt_tokens=len(prompt), completion_tokens=done, total_tokens=len(prompt) + done)

    if not body.stream:
        choices = await _collect(served, job, request)
        return p.ChatCompletion(
            id=rid, created=created, model=body.model, system_fingerprint=FINGERPRINT, usage=usage(choices),
            choices=[p.ChatChoice(index=i, message=p.AssistantMessage(content=c.text), finish_reason=c.finish_reason
                                  or "abort", logprobs=_chat_logprobs(tokenizer, c.outputs) if body.logprobs else None)
                     for i, c in enumerate(choices)],
            citations=_citations(hits, choices[0].text) if hits else None,
        )

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
            "system_fingerprint": FINGERPRINT, **({"usage": None} if include_usage else {})}

    def chunk(index: int, choice: Choice, item: StepOutput | Aborted | None) -> dict[str, Any] | None:
        if item is None:  # the opening chunk of each choice carries the role (and with rag, the sources)
            delta: dict[str, Any] = {"role": "assistant", "content": ""}
            opening = {**head, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]}
            return {**opening, "citations": _citations(hits, "", True)} if hits else opening
        token = isinstance(item, StepOutput) and item.token is not None
        if not (isinstance(item, StepOutput) and item.text) and choice.finish_reason is None and not (
            body.logprobs and token
        ):
            return None  # nothing to show yet (a partial character or a possible stop string is held back)
        logprobs = None
        if body.logprobs and token:
            logprobs = _chat_logprobs(tokenizer, [item]).model_dump()  # type: ignore[list-item]
        delta = {"content": item.text} if isinstance(item, StepOutput) and item.text else {}
        event = {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                      "finish_reason": choice.finish_reason}]}
        if hits and choice.finish_reason is not None:  # the last chunk says which sources the answer cites
            event["citations"] = _citations(hits, choice.text, True)
        return event

    return _stream(served, job, head, chunk, usage if include_usage else None)


async def _sources(served: Served, turns: list[dict[str, str]], options: p.RagOptions) -> list[Hit]:
    """The chunks for the conversation's last user turn, retrieved off the event loop."""
    if served.store is None:
        raise ApiError(400, "this server has no document store (start it with --rag STORE)", param="rag")
    _require(1 <= options.k <= 20, f"rag.k must be in [1, 20], got {options.k}", "rag")
    _require(bool(turns) and turns[-1]["role"] == "user" and turns[-1]["content"].strip(),
             "with rag, the last message must be the user's question", "messages")
    store = served.store

    def retrieve() -> list[Hit]:
        with served.store_lock:
            return retrieve_sources(turns[-1]["content"], store, options.k, options.min_score, None, options.source)

    try:
        return await run_in_threadpool(retrieve)
    except LmforgeError as e:
        raise ApiError(400, str(e), param="rag") from None


def _citations(hits: list[Hit], text: str, as_json: bool = False) -> Any:
    cited = set(citations(text, len(hits)))
    rows = [p.Citation(n=h.rank, source=h.source, title=h.title, text=h.text, start=h.start, end=h.end,
                       score=h.similarity or 0.0, cited=h.rank in cited) for h in hits]
    return [r.model_dump() for r in rows] if as_json else rows


def _nothing_found(body: p.ChatCompletionRequest) -> Any:
    """Nothing relevant was retrieved: say so, without asking the model to guess."""
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        return p.ChatCompletion(
            id=rid, created=created, model=body.model, system_fingerprint=FINGERPRINT, citations=[],
            usage=p.Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0),
            choices=[p.ChatChoice(index=i, message=p.AssistantMessage(content=NOTHING), finish_reason="stop")
                     for i in range(body.n)])
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
            "system_fingerprint": FINGERPRINT}

    async def events() -> AsyncIterator[str]:
        for i in range(body.n):
            yield _sse({**head, "citations": [], "choices": [{"index": i, "delta": {"role": "assistant",
                        "content": NOTHING}, "logprobs": None, "finish_reason": "stop"}]})
        if body.stream_options and body.stream_options.include_usage:
            yield _sse({**head, "choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": 0,
                                                          "total_tokens": 0}})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@api.post("/completions", response_model=p.TextCompletion, responses={**STREAM_OK, **GENERATE_ERRORS})
async def completions(body: p.CompletionRequest, request: Request) -> Any:
    served = _served(request)
    _check_model(served, body.model, "chat")
    _require(body.suffix is None, "suffix is not supported", "suffix")
    _require(not (body.echo and body.logprobs is not None), "echo together with logprobs is not supported", "echo")
    prompts = _completion_prompts(served, body.prompt)
    jobs = []
    for ids in prompts:
        jobs += [(ids, q) for q in _sampling(served, body, len(ids), body.max_tokens, body.logprobs)]
    job = _submit(served, jobs)
    rid, created, tokenizer = f"cmpl-{uuid.uuid4().hex}", int(time.time()), served.tokenizer
    echoes = [tokenizer.decode(ids) if body.echo else "" for ids in prompts]

    def usage(choices: list[Choice]) -> p.Usage:
        read, done = sum(len(ids) for ids in prompts), sum(c.completion_tokens for c in choices)
        return p.Usage(prompt_tokens=read, completion_tokens=done, total_tokens=read + done)

    if not body.stream:
        choices = await _collect(served, job, request)
        return p.TextCompletion(
            id=rid, created=created, model=body.model, system_fingerprint=FINGERPRINT, usage=usage(choices),
            choices=[p.CompletionChoice(
                index=i, text=echoes[i // body.n] + c.text, finish_reason=c.finish_reason or "abort",
                logprobs=_completion_logprobs(tokenizer, c.outputs, 0) if body.logprobs is not None else None)
                for i, c in enumerate(choices)],
        )

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    offsets = [0] * len(jobs)
    head = {"id": rid, "object": "text_completion", "created": created, "model": body.model,
            "system_fingerprint": FINGERPRINT, **({"usage": None} if include_usage else {})}

    def chunk(index: int, choice: Choice, item: StepOutput | Aborted | None) -> dict[str, Any] | None:
        if item is None:
            text = echoes[index // body.n]
            if not text:
                return None
        else:
            text = item.text if isinstance(item, StepOutput) else ""
        token = isinstance(item, StepOutput) and item.token is not None
        if not text and choice.finish_reason is None and not (body.logprobs is not None and token):
            return None
        logprobs = None
        if body.logprobs is not None and token:
            logprobs = _completion_logprobs(tokenizer, [item], offsets[index]).model_dump()  # type: ignore[list-item]
            offsets[index] += len(logprobs["tokens"][0])
        return {**head, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                     "finish_reason": choice.finish_reason if item is not None else None}]}

    return _stream(served, job, head, chunk, usage if include_usage else None)


@api.post("/embeddings", response_model=p.EmbeddingList, responses=GENERATE_ERRORS)
async def embeddings(body: p.EmbeddingRequest, request: Request) -> p.EmbeddingList:
    served = _served(request)
    if served.encoder is None or served.encoder_tokenizer is None:
        raise ApiError(404, "this server has no embedding model (start it with --embed-model)", param="model",
                       code="model_not_found")
    _check_model(served, body.model, "embedding")
    encoder, tokenizer = served.encoder, served.encoder_tokenizer
    _require(body.dimensions is None or body.dimensions == encoder.cfg.d_model,
             f"dimensions: this model gives {encoder.cfg.d_model}, got {body.dimensions}", "dimensions")
    from lmforge.embeddings import embed_ids, max_tokens

    limit, raw = max_tokens(encoder), body.input
    if isinstance(raw, str):
        raw = [raw]
    _require(bool(raw), "input must not be empty", "input")
    if all(isinstance(x, str) for x in raw):
        ids, _ = tokenizer.encode_batch_truncated(list(raw), max_length=limit)  # type: ignore[arg-type]
    else:
        rows = [raw] if all(isinstance(x, int) for x in raw) else raw
        ids = [list(r)[:limit] for r in rows]  # type: ignore[arg-type]
        vocab = encoder.cfg.vocab_size
        _require(all(r and all(0 <= t < vocab for t in r) for r in ids),
                 f"token id inputs must be non-empty and within the vocabulary (0..{vocab - 1})", "input")
    vectors = await run_in_threadpool(embed_ids, encoder, ids, 64, False, tokenizer.pad_id)

    def encode(v: np.ndarray) -> list[float] | str:
        return base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64" else v.tolist()

    n = sum(len(r) for r in ids)
    return p.EmbeddingList(data=[p.Embedding(index=i, embedding=encode(v)) for i, v in enumerate(vectors)],
                           model=body.model, usage=p.Usage(prompt_tokens=n, total_tokens=n))


@api.post("/feedback", response_model=p.FeedbackSaved, responses=p.error_responses(400, 401, 413, 422))
def feedback(body: p.FeedbackRequest, request: Request) -> p.FeedbackSaved:
    """The chat page's thumbs: appended to the feedback JSONL file, one line per rating, flushed to disk."""
    served = _served(request)
    path = served.options.feedback
    if path is None:
        raise ApiError(400, "this server keeps no feedback (start it with --feedback FILE)", param="rating")
    row = {"messages": [{"role": m.role, "content": m.text()} for m in body.messages], "response": body.response,
           "rating": body.rating, "model": served.options.name, "created": int(time.time())}
    line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
    with served.feedback_lock:  # one write per line under O_APPEND: lines never interleave or tear
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    return p.FeedbackSaved(saved=True)


# ---- the app ----------------------------------------------------------------------------------------------


class BodyLimit:
    """413 for a body over `limit` bytes, whether it says so in Content-Length or only sends that much."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"0")
        too_big = ApiError(413, f"request body over {self.limit} bytes", code="body_too_large").response()
        if declared.isdigit() and int(declared) > self.limit:
            return await too_big(scope, receive, send)
        seen, over = 0, False

        async def counted() -> dict[str, Any]:  # past the limit the app is told the client left, and we answer
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                over = True
                return {"type": "http.disconnect"}
            return message

        async def guarded(message: dict[str, Any]) -> None:
            if not over:
                await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not over:
                raise
        if over:
            await too_big(scope, receive, send)


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    first = error.errors()[0] if error.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return "the body is not valid JSON", None
    where = ".".join(loc) or "body"
    return f"malformed request: {where}: {first.get('msg', 'invalid')}", (loc[0] if loc else None)


def create_app(served: Served) -> FastAPI:
    """The server as an ASGI app around a loaded model (tests drive it in-process)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served.scheduler.start()
        yield
        served.scheduler.drain(0)
        await asyncio.to_thread(served.scheduler.stop)
        if served.store is not None:
            served.store.close()

    app = FastAPI(title="lmforge", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API over a local model, with a chat page at /")
    app.state.served = served
    app.include_router(api)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(e)
        return ApiError(422, message, param=param, code="malformed_request").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return ApiError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        message = str(e) if isinstance(e, LmforgeError) else f"internal error ({type(e).__name__})"
        return ApiError(500, message).response()

    @app.get("/health", response_model=p.Health)
    def health() -> p.Health:
        return p.Health(status="draining" if served.scheduler.draining else "ok", rag=served.store is not None,
                        **served.scheduler.stats())

    static = resources.files("lmforge.serve") / "static"

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(static / "index.html"))

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    app.add_middleware(BodyLimit, limit=served.options.max_body)
    return app


def build(model: Transformer, tokenizer: Tokenizer, options: ServeOptions, encoder: Transformer | None = None,
          encoder_tokenizer: Tokenizer | None = None) -> FastAPI:
    # a quantized model computes in fp32 over a bf16 cache by default: converting the keys/values of every row at
    # every step cost more than the attention itself at 32 rows, so the server keeps them in the compute dtype
    engine = Engine(model, tokenizer, max_batch=options.max_batch, kv_dtype=model.act_dtype)
    scheduler = Scheduler(engine, max_queue=options.max_queue)
    store = None
    if options.rag_store is not None:
        from lmforge.rag.store import open_store

        store = open_store(options.rag_store, create=False)
    return create_app(Served(model, tokenizer, options, scheduler, encoder, encoder_tokenizer, store=store))
