"""A remote OpenAI-compatible model (our own `lmforge serve`, vLLM, llama-server, a hosted API) used where a local
one would be: `--api-base URL` on generate and chat. Speaks only the wire format, so any such server works."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from lmforge.engine import Usage
from lmforge.errors import LmforgeError
from lmforge.sampling import SamplingParams


@dataclass
class Delta:
    """A piece of a streamed answer; the last one has finish_reason (and usage, when the server sends it)."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


def api_base(url: str) -> str:
    """http://host:port, http://host:port/ and http://host:port/v1 all mean the same API root."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise LmforgeError(f"--api-base must be an http:// or https:// URL, got {url!r}")
    return url if url.endswith("/v1") else url + "/v1"


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600):
        self.base = api_base(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=10))
        self._model = model

    # ---- plumbing ---------------------------------------------------------------------------------------

    def _fail(self, response: httpx.Response) -> LmforgeError:
        try:
            message = response.json()["error"]["message"]
        except Exception:  # not OpenAI's error shape: show the start of whatever came
            message = response.text[:200] or response.reason_phrase
        return LmforgeError(f"{self.base} answered {response.status_code}: {message}")

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = self.http.request(method, self.base + path, json=body)
        except httpx.HTTPError as e:
            raise LmforgeError(f"cannot reach {self.base}: {e}") from None
        if response.status_code >= 400:
            raise self._fail(response)
        return response.json()

    def _events(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        try:
            with self.http.stream("POST", self.base + path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self._fail(response)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        raise LmforgeError(f"{self.base}: {event['error'].get('message', event['error'])}")
                    yield event
        except httpx.HTTPError as e:
            raise LmforgeError(f"cannot reach {self.base}: {e}") from None

    # ---- the API ------------------------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        return self._request("GET", "/models")["data"]

    @property
    def model(self) -> str:
        """The model named at construction, else the server's first chat model (or first model)."""
        if self._model is None:
            models = self.models()
            if not models:
                raise LmforgeError(f"{self.base} serves no model")
            chat = [m for m in models if m.get("kind", "chat") == "chat"]
            self._model = (chat or models)[0]["id"]
        return self._model

    def _sampling(self, params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": params.max_new_tokens,
                                "temperature": params.temperature, "top_p": params.top_p, "stream": True,
                                "stream_options": {"include_usage": True}}
        if params.stop:
            body["stop"] = params.stop
        if params.seed is not None:
            body["seed"] = params.seed
        if params.top_k:
            body["top_k"] = params.top_k  # extension: vLLM, llama-server and lmforge accept it
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        if params.ignore_eos:
            body["ignore_eos"] = True
        return body

    def stream_chat(self, messages: list[dict[str, str]], params: SamplingParams) -> Iterator[Delta]:
        """Stream the answer to a conversation."""
        return self._stream("/chat/completions", {**self._sampling(params), "messages": messages}, chat=True)

    def stream_text(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        """Stream the continuation of a raw text."""
        return self._stream("/completions", {**self._sampling(params), "prompt": prompt}, chat=False)

    def _stream(self, path: str, body: dict[str, Any], chat: bool) -> Iterator[Delta]:
        start = time.perf_counter()
        first: float | None = None
        reason: str | None = None
        for event in self._events(path, body):
            for choice in event.get("choices") or []:
                text = ((choice.get("delta") or {}).get("content") if chat else choice.get("text")) or ""
                if text and first is None:
                    first = time.perf_counter()
                reason = choice.get("finish_reason") or reason
                if text:
                    yield Delta(text)
            if event.get("usage"):
                u, now = event["usage"], time.perf_counter()
                first = first or now
                yield Delta("", reason, Usage(u["prompt_tokens"], u.get("completion_tokens", 0), first - start,
                                              now - first))
                return
        yield Delta("", reason)  # a server that sends no usage

    def embed(self, texts: list[str], model: str) -> np.ndarray:
        data = self._request("POST", "/embeddings", {"model": model, "input": texts})["data"]
        return np.array([d["embedding"] for d in sorted(data, key=lambda d: d["index"])], dtype=np.float32)
