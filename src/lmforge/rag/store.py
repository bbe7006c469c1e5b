"""Where indexed chunks live, behind one small interface: text search (BM25), vector search (cosine), and
per-file replace/remove in one transaction each, so an interrupted index run leaves every file either as it
was or fully re-indexed.

Two stores: one SQLite file (FTS5 for text, the sqlite-vec extension for vectors; the default, embedded) and
PostgreSQL with pgvector (`postgres.py`, chosen by a postgresql:// URL) when one machine's file is not enough.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    from lmforge.rag.chunk import Chunk


@dataclass
class StoredChunk:
    id: int
    source: str  # the document: a file path, or file#line for a .jsonl row
    title: str
    text: str
    start: int  # character span in the document's text
    end: int


class Store(Protocol):
    def meta(self, key: str) -> str | None: ...
    def set_meta(self, key: str, value: str) -> None: ...
    def file_hashes(self) -> dict[str, str]: ...
    def replace_file(self, path: str, digest: str, chunks: list[Chunk], vectors: np.ndarray) -> None: ...
    def remove_file(self, path: str) -> None: ...
    def text_search(self, query: str, k: int, source_glob: str | None = None) -> list[tuple[int, float]]: ...
    def vector_search(self, vector: np.ndarray, k: int, source_glob: str | None = None) -> list[tuple[int, float]]: ...
    def get(self, ids: list[int]) -> list[StoredChunk]: ...
    def count(self) -> int: ...
    def close(self) -> None: ...


def open_store(spec: str | Path, create: bool = True) -> Store:
    """A SQLite file path, or a postgresql:// URL."""
    text = str(spec)
    if text.startswith(("postgresql://", "postgres://")):
        from lmforge.rag.postgres import PostgresStore

        return PostgresStore(text, create=create)
    return SQLiteStore(Path(text).expanduser(), create=create)


def query_words(query: str) -> list[str]:
    """The words of a search query, lower-cased: what both stores' full-text search ORs together."""
    return list(dict.fromkeys(re.findall(r"\w+", query.lower())))


class SQLiteStore:
    """One SQLite file: chunks + FTS5 (porter-stemmed BM25) + a sqlite-vec vec0 table (cosine KNN)."""

    def __init__(self, path: Path, create: bool = True) -> None:
        import apsw
        import sqlite_vec

        if path.is_dir():
            raise LmforgeError(f"store {path} is a folder; name a file (e.g. {path / 'store.db'})")
        if not path.exists():
            if not create:
                raise LmforgeError(f"no store at {path} (build one with `lmforge rag index PATH --store {path}`)")
            if not path.parent.is_dir():
                raise LmforgeError(f"cannot create store {path}: folder {path.parent} does not exist")
        try:
            self.db = apsw.Connection(str(path))
            self.db.enable_load_extension(True)
            self.db.load_extension(sqlite_vec.loadable_path())
            self.db.enable_load_extension(False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self._schema()
        except apsw.Error as e:
            raise LmforgeError(f"cannot use {path} as a store: {e}") from None
        self.path = path

    def _schema(self) -> None:
        with self.db:
            self.db.execute("""
                CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS files(path TEXT PRIMARY KEY, hash TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS chunks(
                    id INTEGER PRIMARY KEY, file TEXT NOT NULL, source TEXT NOT NULL, title TEXT NOT NULL,
                    text TEXT NOT NULL, start INTEGER NOT NULL, stop INTEGER NOT NULL);
                CREATE INDEX IF NOT EXISTS chunks_by_file ON chunks(file);
                CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(text, title, tokenize='porter unicode61');
            """)

    def _vectors_table(self, dim: int) -> None:
        known = self.meta("dim")
        if known is None:
            self.db.execute(f"CREATE VIRTUAL TABLE chunks_vec USING vec0(embedding float[{dim}] "
                            "distance_metric=cosine)")
            self.set_meta("dim", str(dim))
        elif int(known) != dim:
            raise LmforgeError(f"this store holds {known}-dimensional vectors, not {dim}: index with its own model")

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def file_hashes(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT path, hash FROM files").fetchall())

    def replace_file(self, path: str, digest: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        """The file's old chunks out, its new ones in, its hash recorded: one transaction."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self.db:
            if len(chunks):
                self._vectors_table(vectors.shape[1])
            self._delete(path)
            for chunk, vector in zip(chunks, vectors, strict=True):
                self.db.execute("INSERT INTO chunks(file, source, title, text, start, stop) VALUES (?, ?, ?, ?, ?, ?)",
                                (path, chunk.source, chunk.title, chunk.text, chunk.start, chunk.end))
                rowid = self.db.last_insert_rowid()
                self.db.execute("INSERT INTO chunks_fts(rowid, text, title) VALUES (?, ?, ?)",
                                (rowid, chunk.text, chunk.title))
                self.db.execute("INSERT INTO chunks_vec(rowid, embedding) VALUES (?, ?)", (rowid, vector.tobytes()))
            self.db.execute("INSERT OR REPLACE INTO files(path, hash) VALUES (?, ?)", (path, digest))

    def remove_file(self, path: str) -> None:
        with self.db:
            self._delete(path)
            self.db.execute("DELETE FROM files WHERE path = ?", (path,))

    def _delete(self, path: str) -> None:
        ids = [row[0] for row in self.db.execute("SELECT id FROM chunks WHERE file = ?", (path,))]
        has_vectors = self.meta("dim") is not None
        for rowid in ids:
            self.db.execute("DELETE FROM chunks_fts WHERE rowid = ?", (rowid,))
            if has_vectors:
                self.db.execute("DELETE FROM chunks_vec WHERE rowid = ?", (rowid,))
        self.db.execute("DELETE FROM chunks WHERE file = ?", (path,))

    def text_search(self, query: str, k: int, source_glob: str | None = None) -> list[tuple[int, float]]:
        """(chunk id, BM25 score: higher is better), best first; any query word may match."""
        words = query_words(query)
        if not words:
            return []
        match = " OR ".join('"' + w.replace('"', '""') + '"' for w in words)
        sql = "SELECT f.rowid, -bm25(chunks_fts) AS s FROM chunks_fts f"
        args: list[object] = [match]
        if source_glob:
            sql += " JOIN chunks c ON c.id = f.rowid WHERE chunks_fts MATCH ? AND c.source GLOB ?"
            args.append(source_glob)
        else:
            sql += " WHERE chunks_fts MATCH ?"
        return [(int(i), float(s)) for i, s in self.db.execute(sql + " ORDER BY s DESC LIMIT ?", (*args, k))]

    def vector_search(self, vector: np.ndarray, k: int, source_glob: str | None = None) -> list[tuple[int, float]]:
        """(chunk id, cosine similarity), best first."""
        if self.meta("dim") is None:
            return []
        blob = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
        if source_glob:  # a filtered scan: KNN over the matching rows only, so k results come back when they exist
            rows = self.db.execute(
                "SELECT c.id, vec_distance_cosine(v.embedding, ?) AS d FROM chunks c "
                "JOIN chunks_vec v ON v.rowid = c.id WHERE c.source GLOB ? ORDER BY d LIMIT ?", (blob, source_glob, k))
        else:
            rows = self.db.execute("SELECT rowid, distance FROM chunks_vec WHERE embedding MATCH ? AND k = ? "
                                   "ORDER BY distance", (blob, k))
        return [(int(i), 1.0 - float(d)) for i, d in rows]

    def get(self, ids: list[int]) -> list[StoredChunk]:
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        rows = {r[0]: StoredChunk(*r) for r in self.db.execute(
            f"SELECT id, source, title, text, start, stop FROM chunks WHERE id IN ({marks})", ids)}
        return [rows[i] for i in ids if i in rows]

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM chunks").fetchone()[0])

    def close(self) -> None:
        self.db.close()
