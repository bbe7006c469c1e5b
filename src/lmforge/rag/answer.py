"""Grounded answers: retrieve, put the chunks in the prompt as numbered sources, generate, then check each
answer sentence against the sources and report which are unsupported (the groundedness rate)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from lmforge.rag.retrieve import Hit, search
from lmforge.rag.store import Store

if TYPE_CHECKING:
    from lmforge.client import Client
    from lmforge.model.transformer import Transformer
    from lmforge.sampling import SamplingParams
    from lmforge.tokenizer import Tokenizer

SYSTEM = ("Answer the question using only the numbered sources. Cite each source you use as [n]. If the sources "
          "do not contain the answer, say that you do not know.")
NOTHING = "I could not find anything about that in the indexed documents."

Generator = Callable[[list[dict[str, str]]], Iterable[str]]  # chat messages -> the answer, piece by piece


@dataclass
class SentenceCheck:
    text: str
    supported: bool
    similarity: float  # the best cosine similarity to a retrieved chunk
    overlap: float  # the share of the sentence's words found in that chunk
    source: int | None  # the number of that chunk in the prompt (1-based)


@dataclass
class Answer:
    question: str
    text: str
    sources: list[Hit]
    cited: list[int] = field(default_factory=list)  # source numbers the answer cites, in order of first citation
    sentences: list[SentenceCheck] = field(default_factory=list)
    found: bool = True  # False: nothing relevant was retrieved and nothing was generated

    @property
    def groundedness(self) -> float:
        return sum(s.supported for s in self.sentences) / len(self.sentences) if self.sentences else 1.0


def prompt_messages(question: str, hits: list[Hit], system: str = SYSTEM) -> list[dict[str, str]]:
    sources = "\n\n".join(f"[{h.rank}] {h.title}\n{h.text.strip()}" for h in hits)
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"Sources:\n\n{sources}\n\nQuestion: {question}"}]


def citations(text: str, n_sources: int) -> list[int]:
    """The source numbers cited as [n] (also [1, 3] or [1][2]), first citation first; out-of-range ones dropped."""
    found: list[int] = []
    for group in re.findall(r"\[(\d+(?:\s*,\s*\d+)*)\]", text):
        for n in (int(x) for x in group.split(",")):
            if 1 <= n <= n_sources and n not in found:
                found.append(n)
    return found


CITATION = re.compile(r"\[\d+(?:\s*,\s*\d+)*\]")


def sentences(text: str) -> list[str]:
    """The answer's sentences; a citation standing after a sentence's full stop stays with that sentence."""
    out: list[str] = []
    for part in re.split(r"(?<=[.!?])\s+|\n+", text.strip()):
        part = part.strip()
        if out and part and not re.search(r"\w", CITATION.sub("", part)):
            out[-1] += " " + part
        elif re.search(r"\w", CITATION.sub("", part)):
            out.append(part)
    return out


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"\w+", text.lower()) if len(w) > 2}


def check_grounding(text: str, hits: list[Hit], embed_model: str, min_similarity: float = 0.6,
                    min_overlap: float = 0.6) -> list[SentenceCheck]:
    """Each sentence is supported when some retrieved chunk is close to it in embedding space or holds most of its
    words (citation marks aside)."""
    from lmforge.embeddings import embed

    said = sentences(text)
    if not said or not hits:
        return [SentenceCheck(s, False, 0.0, 0.0, None) for s in said]
    bare = [CITATION.sub("", s).strip() for s in said]
    vectors = embed(bare + [h.text for h in hits], embed_model)
    similarity = vectors[: len(bare)] @ vectors[len(bare) :].T  # (sentences, hits): embeddings are unit length
    checks = []
    for i, sentence in enumerate(said):
        words = _words(bare[i])
        overlaps = [len(words & _words(h.text)) / len(words) if words else 0.0 for h in hits]
        best = int(np.argmax(similarity[i] + np.array(overlaps)))
        sim, over = float(similarity[i, best]), overlaps[best]
        checks.append(SentenceCheck(sentence, sim >= min_similarity or over >= min_overlap, sim, over,
                                    hits[best].rank))
    return checks


def retrieve_sources(question: str, store: Store, k: int = 4, min_score: float = 0.25,
                     embed_model: str | None = None, source_glob: str | None = None) -> list[Hit]:
    """The k chunks for a question, each with its cosine similarity to it; [] when even the best is below
    min_score: nothing relevant, so nothing should be generated."""
    from lmforge.embeddings import embed
    from lmforge.rag.index import store_embed_model

    model = store_embed_model(store, embed_model)
    hits = search(store, question, k, "hybrid", source_glob, model)
    if not hits:
        return []
    vectors = embed([question] + [h.text for h in hits], model)
    for h, sim in zip(hits, vectors[1:] @ vectors[0], strict=True):
        h.similarity = float(sim)
    return hits if max(h.similarity or 0.0 for h in hits) >= min_score else []


def conversation_with_sources(messages: list[dict[str, str]], hits: list[Hit]) -> list[dict[str, str]]:
    """A chat whose last user turn is answered from `hits`: the grounding instructions join any system prompt,
    and the sources go into that last turn (earlier turns stay as they were)."""
    system = "\n\n".join([m["content"] for m in messages if m["role"] == "system"] + [SYSTEM])
    turns = [m for m in messages if m["role"] != "system"]
    question = turns[-1]["content"] if turns else ""
    head, last = prompt_messages(question, hits, system)
    return [head, *turns[:-1], last]


def answer(
    question: str, store: Store, generate: Generator, k: int = 4, min_score: float = 0.25,
    embed_model: str | None = None, source_glob: str | None = None, on_text: Callable[[str], None] | None = None,
    min_support: float = 0.6,
) -> Answer:
    """Retrieve k chunks, and answer from them when the best is relevant enough (cosine >= min_score to the
    question); otherwise say nothing was found rather than let the model guess. An answer sentence counts as
    supported when a chunk is within cosine `min_support` of it or holds most of its words."""
    from lmforge.rag.index import store_embed_model

    model = store_embed_model(store, embed_model)
    hits = retrieve_sources(question, store, k, min_score, model, source_glob)
    if not hits:
        if on_text is not None:
            on_text(NOTHING)
        return Answer(question, NOTHING, [], found=False)
    pieces = []
    for piece in generate(prompt_messages(question, hits)):
        pieces.append(piece)
        if on_text is not None:
            on_text(piece)
    text = "".join(pieces).strip()
    return Answer(question, text, hits, citations(text, len(hits)), check_grounding(text, hits, model, min_support))


def local_generator(model: Transformer, tokenizer: Tokenizer, params: SamplingParams) -> Generator:
    """Answers from a loaded chat model through the one engine."""
    from lmforge.generate import stream

    def generate(messages: list[dict[str, str]]) -> Iterator[str]:
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
        yield from stream(model, tokenizer, ids, params, truncate=True)

    return generate


def remote_generator(client: Client, params: SamplingParams) -> Generator:
    """Answers from an OpenAI-compatible server."""

    def generate(messages: list[dict[str, str]]) -> Iterator[str]:
        for delta in client.stream_chat(messages, params):
            yield delta.text

    return generate
