"""The PostgreSQL store: the same interface and answers as SQLiteStore, on a server that many machines can share.

Full text is a `tsvector` column (GIN index) under a stemming configuration without stop words, so that what
matches is what SQLite's porter tokenizer matches; vectors are a pgvector column (HNSW index, cosine). Three
tables in the URL's database (its default schema: pick another with `?options=-csearch_path%3Dname`):
lmforge_meta, lmforge_files, lmforge_chunks.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.rag.store import StoredChunk, query_words

if TYPE_CHECKING:
    from lmforge.rag.chunk import Chunk

TS_CONFIG = "lmforge_english"
# below this many candidates an HNSW scan that visits ef_search nodes sees every row, so its order is exact
EF_SEARCH = 100
EF_SEARCH_MAX = 1000  # pgvector's ceiling; a larger k is answered by an exact scan
SCHEMA_LOCK = 0x6C6D66  # pg_advisory_xact_lock key: two processes creating the same store take turns


def _password(url: str) -> str | None:
    rest = url.partition("://")[2]
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
    userinfo, at, _ = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return None
    return userinfo.partition(":")[2] or None


def redact(url: str) -> str:
    """The URL without its password, for messages (parsed by hand: a malformed URL must still be shown)."""
    password = _password(url)
    return url if password is None else url.replace(":" + password + "@", ":***@", 1)


def one_line(error: BaseException, url: str) -> str:
    """The first line of a driver error, with the URL's password blanked (libpq quotes bad URL parts back)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    password = _password(url)
    if password:
        for form in {password, unquote(password)}:
            text = text.replace(form, "***")
    return text


def glob_to_regex(glob: str) -> str:
    """SQLite GLOB (case-sensitive; * any run, ? one character, [...] a class, [^...] its complement) as an
    anchored PostgreSQL regular expression, every other character literal."""
    out, i, n = ["^"], 0, len(glob)
    while i < n:
        c = glob[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            cls, i = _glob_class(glob, i + 1)
            if cls is None:  # no closing ]: SQLite matches nothing
                return "^(?!)"
            out.append(cls)
        elif c in "\\^$.|+()[]{}":
            out.append("\\" + c)
        else:
            out.append(c)
        i += 1
    out.append("$")
    return "".join(out)


def _glob_class(glob: str, j: int) -> tuple[str | None, int]:
    """The class that starts at glob[j] (just past its [) as a regex, and the index of its closing ]. Follows
    SQLite's reading: a leading ] is a member, a - is a range between its neighbours unless nothing precedes it
    or ] follows it, and a reversed range matches nothing."""
    n = len(glob)
    negate = j < n and glob[j] == "^"
    j += negate
    singles: list[str] = []
    ranges: list[tuple[str, str]] = []
    prior = ""
    if j < n and glob[j] == "]":
        singles.append("]")
        j += 1
    while j < n and glob[j] != "]":
        c = glob[j]
        if c == "-" and prior and j + 1 < n and glob[j + 1] != "]":
            hi = glob[j + 1]
            if prior <= hi:
                ranges.append((prior, hi))
            j += 2
            prior = ""
            continue
        singles.append(c)
        prior = c
        j += 1
    if j >= n:
        return None, j

    def char(ch: str) -> str:  # a character-entry escape: no member can be read as bracket syntax
        return ch if ch.isalnum() and ch.isascii() else f"\\U{ord(ch):08x}"

    members = "".join(char(c) for c in singles) + "".join(f"{char(lo)}-{char(hi)}" for lo, hi in ranges)
    if not members:  # only reversed ranges: [...] matches nothing, [^...] any one character
        return ("." if negate else "(?!)"), j
    return "[" + ("^" if negate else "") + members + "]", j


def vector_literal(vector: np.ndarray) -> str:
    # 9 significant digits bring every float32 back bit for bit
    return "[" + ",".join(format(float(x), ".9g") for x in vector) + "]"


def words_text(*texts: str) -> str:
    """The words SQLite's unicode61 tokenizer would see, space-separated: both the indexed text and the query go
    through this, so a path like docs/a.md is the words docs, a, md on both sides."""
    return " ".join(re.findall(r"\w+", " ".join(texts).lower()))


class PostgresStore:
    """PostgreSQL + pgvector: chunks with a tsvector (GIN, ts_rank_cd) and a vector(dim) column (HNSW, cosine)."""

    def __init__(self, url: str, create: bool = True) -> None:
        try:
            import psycopg
            from psycopg.conninfo import conninfo_to_dict
        except ImportError:
            raise LmforgeError("a postgresql:// store needs psycopg: pip install 'psycopg[binary]'") from None
        self.url = url
        shown = redact(url)
        try:
            params = conninfo_to_dict(url)
            params.setdefault("connect_timeout", 10)  # an unreachable host fails in seconds, not minutes
            self.db = psycopg.connect(**params, autocommit=True)
        except psycopg.Error as e:
            raise LmforgeError(f"cannot connect to {shown}: {one_line(e, url)}") from None
        try:
            if create:
                self._schema()
            elif self.db.execute("SELECT to_regclass('lmforge_chunks')").fetchone()[0] is None:
                raise LmforgeError(f"no store at {shown} (build one with `lmforge rag index PATH --store URL`)")
            self.db.execute(f"SET hnsw.ef_search = {EF_SEARCH}")
        except psycopg.Error as e:
            self.db.close()
            raise LmforgeError(f"cannot use {shown} as a store: {one_line(e, url)}") from None
        except LmforgeError:
            self.db.close()
            raise

    def _schema(self) -> None:
        import psycopg

        with self.db.transaction():
            self.db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            if self.db.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone() is None:
                try:
                    with self.db.transaction():
                        self.db.execute("CREATE EXTENSION vector")
                except psycopg.Error as e:
                    why = one_line(e, self.url)
                    raise LmforgeError(f"{redact(self.url)} has no usable pgvector extension ({why}): install "
                                       "pgvector there, or have a superuser CREATE EXTENSION vector") from None
            if self.db.execute("SELECT to_regclass('lmforge_chunks')").fetchone()[0] is not None:
                return
            if not self.db.execute("SELECT EXISTS(SELECT 1 FROM pg_ts_config WHERE cfgname = %s "
                                   "AND pg_ts_config_is_visible(oid))", (TS_CONFIG,)).fetchone()[0]:
                # snowball english with no stop word list: stems like SQLite's porter tokenizer and, like it,
                # keeps "the" searchable
                self.db.execute(f"CREATE TEXT SEARCH DICTIONARY {TS_CONFIG}_stem "
                                "(TEMPLATE = snowball, Language = english)")
                self.db.execute(f"CREATE TEXT SEARCH CONFIGURATION {TS_CONFIG} (COPY = english)")
                self.db.execute(f"ALTER TEXT SEARCH CONFIGURATION {TS_CONFIG} ALTER MAPPING FOR asciiword, "
                                f"asciihword, hword_asciipart, word, hword, hword_part WITH {TS_CONFIG}_stem")
            self.db.execute("CREATE TABLE IF NOT EXISTS lmforge_meta(key text PRIMARY KEY, value text NOT NULL)")
            self.db.execute("CREATE TABLE IF NOT EXISTS lmforge_files(path text PRIMARY KEY, hash text NOT NULL)")
            self.db.execute("""
                CREATE TABLE lmforge_chunks(
                    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, file text NOT NULL, source text NOT NULL,
                    title text NOT NULL, text text NOT NULL, start integer NOT NULL, stop integer NOT NULL,
                    tsv tsvector NOT NULL)""")
            self.db.execute("CREATE INDEX lmforge_chunks_by_file ON lmforge_chunks(file)")
            self.db.execute("CREATE INDEX lmforge_chunks_tsv ON lmforge_chunks USING gin(tsv)")

    def _vectors_column(self, dim: int) -> None:
        """Inside replace_file's transaction, so a failed first replace leaves no column behind either."""
        known = self.meta("dim")
        if known is None:  # only the first writer takes the lock; the others see "dim" once it commits
            self.db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            known = self.meta("dim")
        if known is None:
            self.db.execute(f"ALTER TABLE lmforge_chunks ADD COLUMN embedding vector({int(dim)})")
            self.db.execute("CREATE INDEX lmforge_chunks_hnsw ON lmforge_chunks "
                            "USING hnsw(embedding vector_cosine_ops)")
            self.set_meta("dim", str(dim))
        elif int(known) != dim:
            raise LmforgeError(f"this store holds {known}-dimensional vectors, not {dim}: index with its own model")

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM lmforge_meta WHERE key = %s", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO lmforge_meta(key, value) VALUES (%s, %s) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))

    def file_hashes(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT path, hash FROM lmforge_files").fetchall())

    def replace_file(self, path: str, digest: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        """The file's old chunks out, its new ones in, its hash recorded: one transaction."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self.db.transaction():
            if len(chunks):
                self._vectors_column(vectors.shape[1])
            self.db.execute("DELETE FROM lmforge_chunks WHERE file = %s", (path,))
            rows = ((path, c.source, c.title, c.text, c.start, c.end, words_text(c.text, c.title), vector_literal(v))
                    for c, v in zip(chunks, vectors, strict=True))
            with self.db.cursor() as cur:
                cur.executemany(
                    "INSERT INTO lmforge_chunks(file, source, title, text, start, stop, tsv, embedding) "
                    f"VALUES (%s, %s, %s, %s, %s, %s, to_tsvector('{TS_CONFIG}', %s), %s::vector)", rows)
            self.db.execute("INSERT INTO lmforge_files(path, hash) VALUES (%s, %s) "
                            "ON CONFLICT (path) DO UPDATE SET hash = excluded.hash", (path, digest))

    def remove_file(self, path: str) -> None:
        with self.db.transaction():
            self.db.execute("DELETE FROM lmforge_chunks WHERE file = %s", (path,))
            self.db.execute("DELETE FROM lmforge_files WHERE path = %s", (path,))

    def text_search(self, query: str, k: int, source_glob: str | None = None) -> list[tuple[int, float]]:
        """(chunk id, ts_rank_cd score: higher is better, length-normalised like BM25), best first; any query
        word may match."""
        words = query_words(query)
        if not words:
            return []
        # one plainto_tsquery per word, OR-ed: a word is data, never tsquery syntax
        q = " || ".join([f"plainto_tsquery('{TS_CONFIG}', %s)"] * len(words))
        sql = (f"SELECT id, ts_rank_cd(tsv, q, 1) AS s FROM lmforge_chunks, ({'SELECT ' + q} AS q) w "
               "WHERE tsv @@ q")
        args: list[Any] = list(words)
        if source_glob:
            sql += " AND source ~ %s"
            args.append(glob_to_regex(source_glob))
        rows = self.db.execute(sql + " ORDER BY s DESC, id LIMIT %s", (*args, k))
        return [(int(i), float(s)) for i, s in rows]

    def vector_search(self, vector: np.ndarray, k: int, source_glob: str | None = None) -> list[tuple[int, float]]:
        """(chunk id, cosine similarity), best first."""
        known = self.meta("dim")
        if known is None:
            return []
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if len(vector) != int(known):
            raise LmforgeError(f"this store holds {known}-dimensional vectors, not {len(vector)}: "
                               "search with the model it was indexed with")
        literal = vector_literal(vector)
        if source_glob or k > EF_SEARCH_MAX:
            # ordering by the similarity, not by `embedding <=> q`, keeps the planner off the HNSW index: an exact
            # scan over the matching rows, so k results come back whenever k rows match
            rows = self.db.execute(
                "SELECT id, 1 - (embedding <=> %s::vector) AS s FROM lmforge_chunks WHERE source ~ %s "
                "ORDER BY s DESC, id LIMIT %s", (literal, glob_to_regex(source_glob or "*"), k)).fetchall()
        else:
            with self.db.transaction():
                self.db.execute(f"SET LOCAL hnsw.ef_search = {max(EF_SEARCH, k)}")
                rows = self.db.execute(
                    "SELECT id, 1 - (embedding <=> %s::vector) FROM lmforge_chunks "
                    "ORDER BY embedding <=> %s::vector LIMIT %s", (literal, literal, k)).fetchall()
        return [(int(i), float(s)) for i, s in rows]

    def get(self, ids: list[int]) -> list[StoredChunk]:
        if not ids:
            return []
        rows = {r[0]: StoredChunk(*r) for r in self.db.execute(
            "SELECT id, source, title, text, start, stop FROM lmforge_chunks WHERE id = ANY(%s)",
            ([int(i) for i in ids],))}
        return [rows[i] for i in ids if i in rows]

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM lmforge_chunks").fetchone()[0])

    def close(self) -> None:
        self.db.close()
