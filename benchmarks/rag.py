"""RAG store at scale: index N synthetic chunks into the SQLite store, then query latency and recall@10 of its
vector search, its BM25 text search and hybrid retrieval, against FAISS flat (exact) on the same vectors.

Synthetic corpus (seeded, so every run with the same settings sees the same data), shaped like sentence
embeddings rather than uniform noise: Gaussian directions with a decaying spectrum (dimension i's scale ~ i^-0.5,
then a random rotation), --clusters centres, every chunk a centre plus 1.5x as much noise, all sharing one
offset direction (two random chunks have cosine ~0.3, as real embeddings are not centred), normalised. Texts:
40-120 words from a fixed vocabulary of --vocab pseudo-words, Zipf-distributed, a quarter of them drawn from
the chunk's cluster's own 30 topic words. Chunks are spread over N / --per-file files, each indexed by one
`replace_file` call (one transaction, like `lmforge rag index`), which gives the indexing rate.

Queries: --queries random chunks, each a vector near the chunk's (as much noise again as the vector: the
nearest chunk has cosine ~0.7 and the 10th ~0.6, close to all-MiniLM-L6-v2 on real text) and 3 of its rarer
words as text. Ground truth is numpy brute force over all N vectors (exact cosine top-10): recall@10 is
the overlap of an engine's 10 ids with it. "source hit@10" is how often the chunk a query came from is among
the 10 (the only yardstick BM25 and hybrid have here). Hybrid is `lmforge.rag.retrieve.search(mode="hybrid")`
as `lmforge rag query` runs it (BM25 top-40 and vector top-40 fused by RRF, then the chunks fetched), with the
query embedding looked up instead of computed, so it times retrieval, not the encoder. Each query runs every
engine back to back, so a busy host slows all of them alike; one untimed warm-up query first. The store's first
two vector searches in a process (a one-off query's cost, then the set-up of repeated ones: SQLiteStore keeps
the vectors in memory from the second on) are timed on their own and reported, not in the rows.

The store is built once per settings under .cache/rag-bench/ and reused by later runs (the header says which,
and the indexing rate shown is then the one measured when it was built); --rebuild indexes afresh. FAISS
(faiss-cpu, `IndexFlatIP`: exact inner product, brute force) is a peer for this benchmark only; without it its
row is skipped with a note. It runs on --faiss-threads OpenMP threads (default 1: one query at a time is what
is measured, and on a busy 2-core host 2 threads made its single queries ~2.5x slower).

    .venv/bin/python benchmarks/rag.py [--n 100000] [--dim 384] [--queries 200] [--format table|json] [--rebuild]
                                       [--clusters 1000] [--vocab 4000] [--per-file 100] [--faiss-threads 1]

Goal (issue 22): store vector search p50 <= 20 ms at 100k x 384, recall@10 >= 0.95.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from host import load_average, machine
from rich.console import Console
from rich.table import Table

from lmforge.rag.store import SQLiteStore, open_store

try:
    from lmforge.rag.chunk import Chunk
except ImportError:  # the chunker is younger than the store: any object with these five fields will do
    @dataclass
    class Chunk:  # type: ignore[no-redef]
        source: str
        title: str
        text: str
        start: int
        end: int

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "rag-bench"
DATA_VERSION = 2  # bump when the synthetic corpus changes, so stale cached stores are not reused
K = 10
GOAL_P50_MS = 20.0
GOAL_RECALL = 0.95
TOPIC_WORDS = 30  # per cluster
TOPIC_SHARE = 0.25  # of a chunk's words
CHUNK_NOISE = 1.5  # norm of a chunk's noise relative to its (unit) centre
QUERY_NOISE = 1.0  # norm of a query's noise relative to its (unit) chunk
OFFSET = 0.7  # norm of the direction every vector shares, relative to its unit part
SPECTRUM = 0.5  # dimension i of the raw Gaussians is scaled by i^-SPECTRUM before the rotation


# ---- synthetic corpus -----------------------------------------------------------------------------------


@dataclass
class Settings:
    n: int
    dim: int
    clusters: int
    vocab: int
    per_file: int
    seed: int

    def key(self) -> str:
        return (f"n{self.n}-d{self.dim}-c{self.clusters}-v{self.vocab}-f{self.per_file}-s{self.seed}"
                f"-data{DATA_VERSION}")


def unit_rows(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


class Shape:
    """Gaussian directions with a decaying spectrum in a random basis, so no axis is special."""

    def __init__(self, dim: int, rng: np.random.Generator) -> None:
        scale = np.arange(1, dim + 1, dtype=np.float64) ** -SPECTRUM
        self.scale = (scale / np.sqrt((scale**2).mean())).astype(np.float32)
        self.rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)

    def directions(self, count: int, rng: np.random.Generator) -> np.ndarray:
        out = np.empty((count, len(self.scale)), dtype=np.float32)
        for lo in range(0, count, 16384):  # in blocks: the raw Gaussians of 100k x 384 would be another 150 MB
            hi = min(lo + 16384, count)
            out[lo:hi] = unit_rows((rng.standard_normal((hi - lo, len(self.scale)), dtype=np.float32) * self.scale)
                                   @ self.rotation)
        return out


def noisy(rows: np.ndarray, scale: float, shape: Shape, rng: np.random.Generator) -> np.ndarray:
    """Each row plus a random direction of norm `scale`, normalised."""
    return unit_rows(rows + np.float32(scale) * shape.directions(len(rows), rng))


def vocabulary(size: int, rng: np.random.Generator) -> list[str]:
    """`size` distinct pronounceable pseudo-words of 1-4 syllables (no real word, so no stop-word luck)."""
    onsets = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st", "tr", "pl", "gr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou"]
    words: dict[str, None] = {}
    while len(words) < size:
        syllables = int(rng.integers(1, 5))
        word = "".join(onsets[rng.integers(len(onsets))] + vowels[rng.integers(len(vowels))] for _ in range(syllables))
        words.setdefault(word + ("n" if rng.random() < 0.3 else ""), None)
    return list(words)


@dataclass
class Corpus:
    vectors: np.ndarray  # (n, dim) float32, unit rows
    shape: Shape
    texts: list[str]
    files: list[tuple[str, int, int]]  # (source path, first chunk, end chunk)
    words: list[list[int]]  # each text's word ids: id = Zipf rank, so a higher id is a rarer word
    vocab: list[str]


def corpus(s: Settings) -> Corpus:
    rng = np.random.default_rng(s.seed)
    shape = Shape(s.dim, rng)
    centres = shape.directions(s.clusters, rng)
    label = rng.integers(0, s.clusters, s.n)
    vectors = noisy(centres[label], CHUNK_NOISE, shape, rng)
    vectors = unit_rows(vectors + np.float32(OFFSET) * shape.directions(1, rng))
    vocab = vocabulary(s.vocab, rng)
    zipf = 1.0 / np.arange(1, s.vocab + 1) ** 1.07
    zipf /= zipf.sum()
    topics = rng.integers(s.vocab // 20, s.vocab, (s.clusters, TOPIC_WORDS))  # mid/low-frequency words
    lengths = rng.integers(40, 121, s.n)
    general = rng.choice(s.vocab, size=int(lengths.sum()), p=zipf)
    topical = rng.random(int(lengths.sum())) < TOPIC_SHARE
    topic_pick = rng.integers(0, TOPIC_WORDS, int(lengths.sum()))
    texts, words, at = [], [], 0
    for i, length in enumerate(lengths):
        ids = np.where(topical[at:at + length], topics[label[i], topic_pick[at:at + length]], general[at:at + length])
        at += length
        words.append(ids.tolist())
        text = " ".join(vocab[w] for w in ids)
        texts.append(text[0].upper() + text[1:] + ".")
    files = [(f"/bench/docs/d{f // 100:03d}/file{f:05d}.md", start, min(start + s.per_file, s.n))
             for f, start in enumerate(range(0, s.n, s.per_file))]
    return Corpus(vectors, shape, texts, files, words, vocab)


def chunks_of(c: Corpus, source: str, start: int, end: int) -> list[Chunk]:
    out, at = [], 0
    for i in range(start, end):
        text = c.texts[i]
        out.append(Chunk(source=source, title=f"{Path(source).stem} part {i - start}", text=text, start=at,
                         end=at + len(text)))
        at += len(text) + 2  # a blank line between chunks of one document
    return out


def queries(c: Corpus, count: int, seed: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(query vectors, query texts, the chunk each came from): 3 words of the chunk's 12 rarest as text."""
    rng = np.random.default_rng(seed + 1)
    origin = rng.choice(len(c.texts), size=count, replace=False)
    vectors = noisy(c.vectors[origin], QUERY_NOISE, c.shape, rng)
    texts = []
    for i in origin:
        rare = sorted(set(c.words[i]), reverse=True)[:12]
        pick = rng.choice(len(rare), size=min(3, len(rare)), replace=False)
        texts.append(" ".join(c.vocab[rare[j]] for j in sorted(pick)))
    return vectors, texts, origin


# ---- the store ------------------------------------------------------------------------------------------


@dataclass
class Build:
    path: Path
    reused: bool
    seconds: float  # indexing time (when built, possibly by an earlier run)
    built_at: str
    chunks_per_s: float
    files_per_s: float
    megabytes: float


def remove_store(path: Path) -> None:
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        p.unlink(missing_ok=True)


def build_store(s: Settings, c: Corpus, rebuild: bool, console: Console) -> tuple[SQLiteStore, Build]:
    """The store for these settings: reused when a complete one is cached, else indexed now (one file a call)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"store-{s.key()}.db"
    if path.exists() and not rebuild:
        store = open_store(path, create=False)
        done = store.meta("bench_build")
        if done is not None and store.count() == s.n:
            info = json.loads(done)
            return store, Build(path, True, info["seconds"], info["built_at"], s.n / info["seconds"],
                                len(c.files) / info["seconds"], path.stat().st_size / 1e6)
        store.close()  # an interrupted build: start again
    remove_store(path)
    store = open_store(path)
    store.set_meta("embed_model", f"synthetic-{s.dim}")  # what retrieve.search checks; nothing here embeds
    with console.status(f"indexing {s.n:,} chunks into {path.name} ...") as status:
        start = time.perf_counter()
        for f, (source, lo, hi) in enumerate(c.files):
            digest = hashlib.sha256(f"{s.key()}:{source}".encode()).hexdigest()
            store.replace_file(source, digest, chunks_of(c, source, lo, hi), c.vectors[lo:hi])
            if f % 50 == 0:
                status.update(f"indexing {s.n:,} chunks into {path.name} ... {hi:,}")
        seconds = time.perf_counter() - start
    built_at = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    store.set_meta("bench_build", json.dumps({"seconds": seconds, "built_at": built_at}))
    # a checkpoint now, so the first timed queries do not also fold the WAL back into the file
    with contextlib.suppress(Exception):
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return store, Build(path, False, seconds, built_at, s.n / seconds, len(c.files) / seconds,
                        path.stat().st_size / 1e6)


def id_map(store: SQLiteStore, c: Corpus) -> Callable[[list[int]], list[int]]:
    """Store chunk ids -> corpus indices (via each chunk's source and position, so any id scheme works)."""
    starts = {}
    for source, lo, hi in c.files:
        at = 0
        for i in range(lo, hi):
            starts[(source, at)] = i
            at += len(c.texts[i]) + 2
    known: dict[int, int] = {}

    def to_corpus(ids: list[int]) -> list[int]:
        missing = [i for i in ids if i not in known]
        for chunk in store.get(missing):
            known[chunk.id] = starts[(chunk.source, chunk.start)]
        return [known[i] for i in ids]

    return to_corpus


# ---- measuring ------------------------------------------------------------------------------------------


@dataclass
class Row:
    engine: str
    search: str
    p50_ms: float | None = None
    p95_ms: float | None = None
    mean_ms: float | None = None
    recall: float | None = None  # recall@10 against exact brute force
    source_hit: float | None = None  # share of queries whose own chunk is in the top 10
    note: str = ""


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def row_of(engine: str, search: str, times: list[float], recalls: list[float] | None, hits: list[bool],
           note: str = "") -> Row:
    ms = [t * 1e3 for t in times]
    return Row(engine, search, percentile(ms, 50), percentile(ms, 95), statistics.fmean(ms),
               statistics.fmean(recalls) if recalls is not None else None, statistics.fmean(hits), note)


def exact_top(vectors: np.ndarray, qs: np.ndarray, k: int) -> np.ndarray:
    """Exact cosine top-k corpus indices per query, best first (numpy brute force, in blocks of queries)."""
    out = np.empty((len(qs), k), dtype=np.int64)
    for lo in range(0, len(qs), 64):
        scores = qs[lo:lo + 64] @ vectors.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1)
        out[lo:lo + 64] = np.take_along_axis(part, order, 1)
    return out


def faiss_index(vectors: np.ndarray, threads: int) -> tuple[Any, float, str] | str:
    try:
        import faiss
    except ImportError:
        return "FAISS rows skipped: faiss is not installed (pip install faiss-cpu; a benchmark-only peer)"
    faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index, time.perf_counter() - start, f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads"


def measure(store: SQLiteStore, c: Corpus, qv: np.ndarray, qt: list[str], origin: np.ndarray, faiss_threads: int,
            console: Console) -> tuple[list[Row], list[str], dict[str, Any]]:
    from lmforge.rag import retrieve

    notes: list[str] = []
    extra: dict[str, Any] = {}
    to_corpus = id_map(store, c)
    truth = exact_top(c.vectors, qv, K)
    truth_sets = [set(t.tolist()) for t in truth]

    peer = faiss_index(c.vectors, faiss_threads)
    if isinstance(peer, str):
        notes.append(peer)
        index = None
    else:
        index, faiss_add_s, faiss_note = peer
        notes.append(f"{faiss_note}: IndexFlatIP built in {faiss_add_s:.2f} s ({len(c.vectors) / faiss_add_s:,.0f} "
                     "vectors/s, in memory only)")

    current: dict[str, int] = {}

    def lookup_embed(texts: list[str], model: Any = None, **_: Any) -> np.ndarray:  # the encoder, stubbed
        return qv[[current["i"]]]

    # the store's first two vector searches in this process, alone: whatever it sets up is paid there
    set_up = []
    for _ in range(2):
        start = time.perf_counter()
        store.vector_search(qv[0], K)
        set_up.append((time.perf_counter() - start) * 1e3)
    extra["first_vector_searches_ms"] = set_up
    notes.append(f"store's first two vector_search calls in this process: {set_up[0]:,.0f} ms and {set_up[1]:,.0f} ms"
                 " (a one-off search, then the set-up of repeated ones; not in the rows above)")

    names = ("vector", "vec0", "text", "hybrid", "faiss", "numpy")
    times: dict[str, list[float]] = {name: [] for name in names}
    recalls: dict[str, list[float]] = {name: [] for name in ("vector", "vec0", "faiss", "numpy")}
    hits: dict[str, list[bool]] = {name: [] for name in times}
    with mock.patch("lmforge.embeddings.embed", lookup_embed), console.status("querying ...") as status:
        for i in range(-1, len(qv)):  # -1: one untimed warm-up of every engine
            j = max(i, 0)
            current["i"] = j
            q = qv[j]
            runs: dict[str, list[int]] = {}

            # sqlite-vec's own exact KNN scan, as the store runs it for a one-off search (and ran every one before).
            # First: its 100+ ms also outlast the busy-waiting of the BLAS threads the previous query's numpy row
            # woke, which would otherwise steal the second core from whatever came next.
            start = time.perf_counter()
            ids = [cid for cid, _ in store.db.execute(
                "SELECT rowid, distance FROM chunks_vec WHERE embedding MATCH ? AND k = ? ORDER BY distance",
                (q.tobytes(), K))]
            t_vec0 = time.perf_counter() - start
            runs["vec0"] = to_corpus(ids)

            start = time.perf_counter()
            ids = [cid for cid, _ in store.vector_search(q, K)]
            t_vector = time.perf_counter() - start
            runs["vector"] = to_corpus(ids)

            start = time.perf_counter()
            ids = [cid for cid, _ in store.text_search(qt[j], K)]
            t_text = time.perf_counter() - start
            runs["text"] = to_corpus(ids)

            start = time.perf_counter()
            hybrid = retrieve.search(store, qt[j], k=K, mode="hybrid")
            t_hybrid = time.perf_counter() - start
            runs["hybrid"] = to_corpus([h.id for h in hybrid])

            t_faiss = 0.0
            if index is not None:
                start = time.perf_counter()
                _, found = index.search(q[None, :], K)
                t_faiss = time.perf_counter() - start
                runs["faiss"] = [int(x) for x in found[0] if x >= 0]

            start = time.perf_counter()
            scores = c.vectors @ q
            top = np.argpartition(-scores, K - 1)[:K]
            runs["numpy"] = top[np.argsort(-scores[top])].tolist()
            t_numpy = time.perf_counter() - start

            if i < 0:
                continue
            for name, t in (("vector", t_vector), ("vec0", t_vec0), ("text", t_text), ("hybrid", t_hybrid),
                            ("faiss", t_faiss), ("numpy", t_numpy)):
                if name not in runs:
                    continue
                times[name].append(t)
                hits[name].append(int(origin[j]) in runs[name])
                if name in recalls:
                    recalls[name].append(len(set(runs[name]) & truth_sets[j]) / K)
            if i % 20 == 0:
                status.update(f"querying ... {i + 1}/{len(qv)}")

    rows = [
        row_of("lmforge SQLiteStore", "vector_search k=10", times["vector"], recalls["vector"], hits["vector"]),
        row_of("sqlite-vec vec0 KNN", "vector k=10 (exact scan)", times["vec0"], recalls["vec0"], hits["vec0"],
               "the store's one-off search"),
        row_of("lmforge SQLiteStore", "text_search k=10 (BM25)", times["text"], None, hits["text"]),
        row_of("lmforge retrieve.search", "hybrid k=10 (RRF of 40+40)", times["hybrid"], None, hits["hybrid"],
               "embedding lookup stubbed"),
    ]
    if index is not None:
        rows.append(row_of("FAISS IndexFlatIP", "vector k=10 (exact)", times["faiss"], recalls["faiss"],
                           hits["faiss"]))
    rows.append(row_of("numpy brute force", "vector k=10 (exact: the truth)", times["numpy"], recalls["numpy"],
                       hits["numpy"]))
    return rows, notes, extra


# ---- report ---------------------------------------------------------------------------------------------


def versions() -> str:
    import apsw
    import sqlite_vec

    db = apsw.Connection(":memory:")
    db.enable_load_extension(True)
    db.load_extension(sqlite_vec.loadable_path())
    vec = db.execute("SELECT vec_version()").fetchone()[0]
    return f"SQLite {apsw.sqlite_lib_version()}, sqlite-vec {vec}, apsw {apsw.apsw_version()}, numpy {np.__version__}"


def print_table(header: dict[str, Any], rows: list[Row], notes: list[str], console: Console) -> None:
    for key, value in header.items():
        console.print(f"[bold]{key}:[/bold] {value}")
    table = Table(title=f"Query latency at {header['settings']['n']:,} chunks x {header['settings']['dim']} dims, "
                        f"{header['settings']['queries']} queries, k={K}",
                  caption=f"goal: store vector_search p50 <= {GOAL_P50_MS:.0f} ms and recall@10 >= {GOAL_RECALL}")
    for col in ("engine", "search", "p50 ms", "p95 ms", "mean ms", "recall@10", "source hit@10", "note"):
        table.add_column(col, justify="left" if col in ("engine", "search", "note") else "right")

    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    for r in rows:
        table.add_row(r.engine, r.search, fmt(r.p50_ms, ",.2f"), fmt(r.p95_ms, ",.2f"), fmt(r.mean_ms, ",.2f"),
                      fmt(r.recall, ".3f"), fmt(r.source_hit, ".3f"), r.note)
    console.print(table)
    for note in notes:
        console.print(note)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="chunks to index")
    ap.add_argument("--dim", type=int, default=384, help="vector dimensions")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--clusters", type=int, default=1000, help="vector cluster centres")
    ap.add_argument("--vocab", type=int, default=4000, help="distinct words in the texts")
    ap.add_argument("--per-file", type=int, default=100, help="chunks per indexed file (one replace_file call)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--faiss-threads", type=int, default=1, help="OpenMP threads for the FAISS peer")
    ap.add_argument("--rebuild", action="store_true", help="index afresh even when a cached store fits")
    ap.add_argument("--format", choices=["table", "json"], default="table")
    args = ap.parse_args()
    if min(args.n, args.dim, args.queries, args.clusters, args.per_file) < 1 or args.vocab < 100:
        ap.error("--n, --dim, --queries, --clusters and --per-file must be >= 1, --vocab >= 100")
    if args.queries > args.n:
        ap.error("--queries must be <= --n (each query comes from a distinct chunk)")
    settings = Settings(args.n, args.dim, args.clusters, args.vocab, args.per_file, args.seed)
    console = Console(width=150, stderr=args.format == "json")

    with console.status("generating the corpus ..."):
        start = time.perf_counter()
        c = corpus(settings)
        gen_s = time.perf_counter() - start
        qv, qt, origin = queries(c, args.queries, args.seed)
    store, build = build_store(settings, c, args.rebuild, console)
    try:
        rows, notes, extra = measure(store, c, qv, qt, origin, args.faiss_threads, console)
    finally:
        store.close()

    vector = rows[0]
    met = vector.p50_ms is not None and vector.p50_ms <= GOAL_P50_MS and (vector.recall or 0) >= GOAL_RECALL
    notes.insert(0, f"goal {'met' if met else 'NOT met'}: store vector_search p50 {vector.p50_ms:.2f} ms "
                    f"(<= {GOAL_P50_MS:.0f}), recall@10 {vector.recall:.3f} (>= {GOAL_RECALL})")
    how = (f"reused (indexed {build.built_at}; --rebuild to index again)" if build.reused
           else f"indexed now, {build.built_at}")
    header = {
        "machine": machine(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load average": load_average(),
        "versions": versions(),
        "settings": {"n": args.n, "dim": args.dim, "queries": args.queries, "clusters": args.clusters,
                     "vocab": args.vocab, "per_file": args.per_file, "files": len(c.files), "seed": args.seed},
        "store": f"{build.path} ({build.megabytes:,.1f} MB), {how}",
        "indexing": f"{build.chunks_per_s:,.0f} chunks/s ({build.files_per_s:,.1f} replace_file calls/s of "
                    f"{args.per_file} chunks; {build.seconds:,.1f} s for {args.n:,})"
                    + (", measured when built" if build.reused else ""),
        "corpus": f"generated in {gen_s:.1f} s (not indexing time)",
    }
    if args.format == "json":
        print(json.dumps({"header": header, "rows": [asdict(r) for r in rows], "notes": notes,
                          "build": {**asdict(build), "path": str(build.path)}, **extra}, indent=2))
    else:
        print_table(header, rows, notes, console)
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
