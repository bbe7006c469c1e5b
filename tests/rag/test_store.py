"""The store interface, one suite for every backend: SQLite (FTS5 + sqlite-vec) and PostgreSQL (tsvector +
pgvector, on a real server started for the tests). Exact nearest neighbours, BM25 order, source filters,
per-file replace/remove, and that a failure inside a replace leaves the store as it was."""

from __future__ import annotations

import numpy as np
import pytest
from rag_helpers import STORE_BACKENDS, open_test_store

from lmforge.errors import LmforgeError
from lmforge.rag.chunk import Chunk
from lmforge.rag.store import open_store


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def chunks_of(source: str, texts: list[str]) -> list[Chunk]:
    out, at = [], 0
    for t in texts:
        out.append(Chunk(source=source, title=f"{source} title", text=t, start=at, end=at + len(t)))
        at += len(t) + 2
    return out


TEXTS = {
    "/docs/a.md": ["the cat sat on the mat", "dogs chase cats in the garden", "a quiet afternoon with tea"],
    "/docs/b.md": ["python programming language tutorial", "the mat was red and the cat was black"],
    "/other/c.txt": ["stock markets fell sharply on monday", "cats and dogs rarely agree"],
}


@pytest.fixture(params=STORE_BACKENDS)
def store(request, tmp_path):
    s = open_test_store(request.param, tmp_path)
    yield s
    s.close()


@pytest.fixture
def filled(store):
    rng = np.random.default_rng(0)
    vectors = {}
    for i, (path, texts) in enumerate(TEXTS.items()):
        vecs = unit(rng.normal(size=(len(texts), 16)))
        vectors[path] = vecs
        store.replace_file(path, f"hash{i}", chunks_of(path, texts), vecs)
    return store, vectors


def test_replace_get_and_hashes(filled):
    store, _ = filled
    assert store.count() == 7
    assert store.file_hashes() == {"/docs/a.md": "hash0", "/docs/b.md": "hash1", "/other/c.txt": "hash2"}
    hits = store.text_search("tea afternoon", 5)
    (got,) = store.get([hits[0][0]])
    assert (got.source, got.text, got.title) == ("/docs/a.md", "a quiet afternoon with tea", "/docs/a.md title")
    assert (got.start, got.end) == (55, 81)


def test_vector_search_is_exact_cosine_order(filled):
    store, vectors = filled
    every = np.concatenate(list(vectors.values()))
    query = unit(np.random.default_rng(5).normal(size=(1, 16)))[0]
    want = np.sort(every @ query)[::-1]
    got = store.vector_search(query, 7)
    assert [round(s, 5) for _, s in got] == [round(float(s), 5) for s in want]
    texts = [store.get([i])[0].text for i, _ in got]
    order = np.argsort(-(every @ query))
    flat = [t for ts in TEXTS.values() for t in ts]
    assert texts == [flat[i] for i in order]


def test_text_search_ranks_by_bm25_with_any_word(filled):
    store, _ = filled
    hits = store.text_search("cat mat", 10)
    texts = [store.get([i])[0].text for i, _ in hits]
    # both words beat one; the shorter chunk with both first
    assert texts[:2] == ["the cat sat on the mat", "the mat was red and the cat was black"]
    assert all(a >= b for (_, a), (_, b) in zip(hits, hits[1:], strict=False))
    assert store.text_search("", 5) == [] and store.text_search("zzzunknown", 5) == []
    assert store.text_search('cat" OR "x', 5)  # quotes in a query are words, not syntax


def test_source_filters(filled):
    store, vectors = filled
    only = [store.get([i])[0].source for i, _ in store.text_search("cats", 10, "/other/*")]
    assert only == ["/other/c.txt"]
    got = store.vector_search(vectors["/docs/b.md"][0], 3, "/docs/*")
    assert len(got) == 3 and all(store.get([i])[0].source.startswith("/docs/") for i, _ in got)
    assert store.get([got[0][0]])[0].text == "python programming language tutorial"


def test_replace_and_remove_a_file(filled):
    store, _ = filled
    new = unit(np.ones((1, 16)))
    store.replace_file("/docs/a.md", "hash9", chunks_of("/docs/a.md", ["entirely new text about owls"]), new)
    assert store.count() == 5 and store.file_hashes()["/docs/a.md"] == "hash9"
    assert store.text_search("tea", 5) == []
    (hit,) = store.text_search("owls", 5)
    assert store.vector_search(new[0], 1)[0][0] == hit[0]
    store.remove_file("/docs/a.md")
    assert store.count() == 4 and "/docs/a.md" not in store.file_hashes() and store.text_search("owls", 5) == []


def test_a_failed_replace_leaves_the_file_as_it_was(filled):
    store, _ = filled
    bad = np.ones((2, 16), dtype=np.float32)  # 2 vectors for 1 chunk: fails after the old rows were deleted
    with pytest.raises(ValueError):
        store.replace_file("/docs/b.md", "hash-bad", chunks_of("/docs/b.md", ["x"]), bad)
    assert store.file_hashes()["/docs/b.md"] == "hash1" and store.count() == 7
    assert [store.get([i])[0].source for i, _ in store.text_search("python", 5)] == ["/docs/b.md"]


def test_another_dimension_is_refused(filled):
    store, _ = filled
    with pytest.raises(LmforgeError, match="16-dimensional"):
        store.replace_file("/x.md", "h", chunks_of("/x.md", ["x"]), unit(np.ones((1, 8))))


def test_meta_round_trip(store):
    assert store.meta("embed_model") is None
    store.set_meta("embed_model", "minilm-l6")
    assert store.meta("embed_model") == "minilm-l6"


def test_sqlite_store_errors_are_one_line(tmp_path):
    with pytest.raises(LmforgeError, match="no store at"):
        open_store(tmp_path / "missing.db", create=False)
    with pytest.raises(LmforgeError, match="is a folder"):
        open_store(tmp_path)
    with pytest.raises(LmforgeError, match="does not exist"):
        open_store(tmp_path / "nope" / "s.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(LmforgeError, match="cannot use"):
        open_store(junk)


def test_repeated_sqlite_searches_use_the_in_memory_index_and_follow_changes(tmp_path, monkeypatch):
    from lmforge.rag import store as store_module

    rng = np.random.default_rng(3)
    store = open_store(tmp_path / "many.db")
    centres = rng.normal(size=(60, 384))  # clustered, as embeddings of real text are (random ones have no near
    vectors = unit(centres[rng.integers(0, 60, 3000)] + 0.6 * rng.normal(size=(3000, 384)))  # neighbours to find)
    for f in range(30):
        rows = vectors[f * 100 : (f + 1) * 100]
        store.replace_file(f"/f{f}.md", "h", chunks_of(f"/f{f}.md", [f"chunk {f} {i}" for i in range(100)]), rows)
    queries = unit(vectors[rng.integers(100, 3000, 40)] + 0.1 * rng.normal(size=(40, 384)))

    removed = 0  # the first `removed` rows are no longer in the store

    def exact(q: np.ndarray, k: int = 10) -> list[int]:
        scores = vectors @ q
        scores[:removed] = -np.inf
        return [int(i) + 1 for i in np.argsort(-scores)[:k]]  # chunk ids are 1.. in insertion order

    first = store.vector_search(queries[0], 10)  # sqlite-vec's scan
    second = store.vector_search(queries[0], 10)  # the in-memory index (exact below EXACT_MAX)
    assert store._index is not None
    assert [i for i, _ in second] == [i for i, _ in first] == exact(queries[0])
    np.testing.assert_allclose([s for _, s in second], [s for _, s in first], atol=1e-5)

    # past EXACT_MAX: a bit-code first pass, then exact cosine over the best RESCORE_SHARE of rows
    monkeypatch.setattr(store_module._VectorIndex, "EXACT_MAX", 500)
    monkeypatch.setattr(store_module._VectorIndex, "RESCORE_MIN", 300)
    store.remove_file("/f0.md")  # a change: the next search starts over, without the removed rows
    removed = 100
    store.vector_search(queries[0], 10)
    found = [store.vector_search(q, 10) for q in queries]
    assert store._index is not None and store._index[1].codes is not None
    recall = np.mean([len({i for i, _ in got} & set(exact(q))) / 10 for got, q in zip(found, queries, strict=True)])
    assert recall >= 0.9
    for got, q in zip(found, queries, strict=True):
        assert all(i > 100 for i, _ in got)
        np.testing.assert_allclose([s for _, s in got], [float(vectors[i - 1] @ q) for i, _ in got], atol=1e-5)
    store.close()
