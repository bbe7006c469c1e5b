"""The OpenAI wire format: request and response bodies (they are also the server's OpenAPI schema).

Requests declare only types, not value ranges: a body of the wrong shape is malformed (422), while a value out
of range is a bad parameter that the handler reports by name (400), as OpenAI does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What chat and text completions share. Unset fields take the server's defaults."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, description="extension: keep the k most likely tokens (0 = off)")
    repetition_penalty: float | None = Field(None, description="extension: 1 = off")
    presence_penalty: float | None = Field(None, description="accepted only as 0 (not supported)")
    frequency_penalty: float | None = Field(None, description="accepted only as 0 (not supported)")
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="extension (as vLLM and llama-server): keep going past EOS")
    user: str | None = None


class RagOptions(BaseModel):
    k: int = Field(4, description="chunks put in the prompt")
    source: str | None = Field(None, description="only chunks whose source path matches this glob")
    min_score: float = Field(0.25, description="below this similarity of the best chunk, answer that nothing was "
                             "found instead of generating")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    rag: bool | RagOptions | None = Field(None, description="extension: answer from the server's document store "
                                          "(lmforge serve --rag); the response carries the sources as `citations`")


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


class EmbeddingRequest(BaseModel):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class FeedbackRequest(BaseModel):
    """A thumbs-up/down from the chat page: the conversation before the answer, the answer, the rating."""

    messages: list[ChatMessage]
    response: str
    rating: Literal[-1, 1]


# ---- responses ---------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Citation(BaseModel):
    """A retrieved chunk that was put in the prompt as source [n]."""

    n: int
    source: str
    title: str
    text: str
    start: int
    end: int
    score: float
    cited: bool = Field(description="whether the answer cites it as [n]")


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage
    citations: list[Citation] | None = Field(None, description="extension: with rag, the sources given to the model")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmforge"
    kind: Literal["chat", "embedding"] = Field(description="extension: what the model is served for")
    context_length: int = Field(description="extension: the model's context in tokens")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "draining"]
    rag: bool = Field(False, description="whether chat requests may ask for retrieval (`rag`)")
    running: int
    waiting: int
    capacity: int


class FeedbackSaved(BaseModel):
    saved: bool


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer with (all in OpenAI's error shape)."""
    text = {400: "bad parameter or context overflow", 401: "missing or wrong API key", 404: "unknown model",
            413: "body too large", 422: "malformed body", 503: "overloaded or shutting down"}
    return {s: {"model": ErrorResponse, "description": text[s]} for s in statuses}
