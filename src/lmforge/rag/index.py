"""`lmforge rag index`: files -> documents -> chunks -> embeddings -> the store, incrementally.

A file whose bytes are unchanged (same sha256) is skipped, a changed one re-indexed, and a file that was indexed
under one of the given folders but is gone is removed. Each file is replaced in one store transaction, so an
interrupted run leaves a consistent store and the next run picks up where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.rag.chunk import chunk_document
from lmforge.rag.documents import content_hash, find_files, read_document
from lmforge.rag.store import Store
from lmforge.weights.registry import DEFAULT_EMBED_MODEL


@dataclass
class IndexReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    chunks: int = 0  # chunks written by this run
    total: int = 0  # chunks in the store afterwards


def store_embed_model(store: Store, embed_model: str | None) -> str:
    """The embedding model a store was built with (recorded on first use); another one is refused."""
    known = store.meta("embed_model")
    if known is not None and embed_model is not None and embed_model != known:
        raise LmforgeError(f"this store was indexed with {known!r}, not {embed_model!r}: keep to one embedding model")
    return known or embed_model or DEFAULT_EMBED_MODEL


def _under(path: str, roots: list[Path]) -> bool:
    p = Path(path.split("#", 1)[0])
    return any(p == r or r in p.parents for r in roots)


def index_paths(
    paths: list[str | Path], store: Store, embed_model: str | None = None, size: int = 200, overlap: int = 40,
    progress: bool = False,
) -> IndexReport:
    from rich.console import Console
    from rich.progress import Progress

    from lmforge.embeddings import embed, load_encoder

    files = find_files(paths)  # every path checked before the store is touched
    model = store_embed_model(store, embed_model)
    _, tokenizer = load_encoder(model)

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    known = store.file_hashes()
    report = IndexReport()
    seen = {str(f.resolve()) for f in files}
    roots = [Path(p).expanduser().resolve() for p in paths]
    # every changed file is read (and so checked) before anything is written: a bad file stops the run with the
    # store untouched
    todo = []
    for f in files:
        path, digest = str(f.resolve()), content_hash(f)
        if known.get(path) == digest:
            report.unchanged += 1
        else:
            todo.append((path, digest, read_document(f)))
    if store.meta("embed_model") is None:
        store.set_meta("embed_model", model)
    for gone in sorted(p for p in known if p not in seen and _under(p, roots)):
        store.remove_file(gone)
        report.removed.append(gone)
    with Progress(console=Console(stderr=True), transient=True, disable=not progress) as bar:
        task = bar.add_task("indexing", total=len(todo))
        for path, digest, docs in todo:
            chunks = [c for doc in docs for c in chunk_document(doc, count_tokens, size, overlap)]
            vectors = embed([c.text for c in chunks], model) if chunks else np.zeros((0, 1), np.float32)
            store.replace_file(path, digest, chunks, vectors)
            (report.updated if path in known else report.added).append(path)
            report.chunks += len(chunks)
            bar.advance(task)
    report.total = store.count()
    return report
