"""Hybrid retrieval: BM25 and dense top-k lists fused by reciprocal rank (RRF), with a source filter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.errors import LmforgeError
from lmforge.rag.store import Store

Mode = Literal["hybrid", "bm25", "dense"]
RRF_K = 60  # the constant of Cormack et al.'s reciprocal rank fusion: rank 1 counts 1/61, rank 2 1/62, ...


@dataclass
class Hit:
    rank: int
    score: float  # hybrid: the fused RRF score; bm25 / dense: that list's own score
    id: int
    source: str
    title: str
    text: str
    start: int
    end: int
    bm25_rank: int | None = None
    dense_rank: int | None = None
    similarity: float | None = None  # cosine similarity of the query and the chunk (dense list), when known


def search(
    store: Store, query: str, k: int = 5, mode: Mode = "hybrid", source_glob: str | None = None,
    embed_model: str | None = None, depth: int | None = None,
) -> list[Hit]:
    """The k best chunks for `query`. Hybrid fuses the top `depth` (default max(4k, 20)) of each list."""
    from lmforge.embeddings import embed
    from lmforge.rag.index import store_embed_model

    if k < 1:
        raise LmforgeError(f"k must be >= 1, got {k}")
    if not query.strip():
        raise LmforgeError("empty query")
    depth = depth or max(4 * k, 20)
    text = store.text_search(query, depth, source_glob) if mode != "dense" else []
    dense: list[tuple[int, float]] = []
    if mode != "bm25":
        model = store_embed_model(store, embed_model)
        dense = store.vector_search(embed([query], model)[0], depth, source_glob)
    similarity = dict(dense)
    bm25_rank = {cid: r for r, (cid, _) in enumerate(text, 1)}
    dense_rank = {cid: r for r, (cid, _) in enumerate(dense, 1)}
    if mode == "bm25":
        scored = text
    elif mode == "dense":
        scored = dense
    else:
        fused: dict[int, float] = {}
        for ranks in (bm25_rank, dense_rank):
            for cid, r in ranks.items():
                fused[cid] = fused.get(cid, 0.0) + 1.0 / (RRF_K + r)
        scored = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))
    best = scored[:k]
    chunks = {c.id: c for c in store.get([cid for cid, _ in best])}
    return [
        Hit(rank, score, cid, chunks[cid].source, chunks[cid].title, chunks[cid].text, chunks[cid].start,
            chunks[cid].end, bm25_rank.get(cid), dense_rank.get(cid), similarity.get(cid))
        for rank, (cid, score) in enumerate(best, 1) if cid in chunks
    ]
