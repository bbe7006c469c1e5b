"""`lmforge data prepare`: text corpora -> memory-mapped token shards for pre-training (read by shards.py).

Each document goes, in corpus order: read (sources.py) -> clean -> quality filters -> exact dedup -> near dedup
(clean.py) -> its tokens followed by the separator -> train or val, by the hash of its text -> that split's
shards, each exactly `shard_tokens` tokens but the last. Worker processes do the per-document work (clean,
filter, hash, MinHash, tokenise) on batches; the main process takes their results in corpus order, makes the
dedup decisions and fills the shards, so the output does not depend on --workers or on timing.

Resume: before a document's tokens can reach a shard, the main process appends one fixed-size record for it
to OUT/.prepare/journal.bin (its fate, split, token count, hash and LSH band keys). A shard is written to a
temporary file and renamed, so a shard that exists is whole. Rerunning an interrupted run with the same
arguments rebuilds the dedup index and the counts from the journal, skips the documents already in finished
shards, tokenises again only those whose tokens had not reached one, and writes byte for byte the output of
an uninterrupted run. meta.json is written last: a folder with meta.json is a finished dataset.

Memory holds one shard per split, a few batches per worker and the dedup index (a hash and a few band keys
per document), never the corpus.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import tempfile
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.clean import REASONS, Filters, clean_text, exact_key, filter_reason, minhash_bands, split_value
from lmforge.data.shards import FORMAT, SPLITS
from lmforge.data.sources import Doc, check_files, find_files, read_docs
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

DEFAULT_SHARD_TOKENS = 2**24
NUM_PERM = 128
PIPELINE_VERSION = 1  # bump when the same inputs would give other shards, so an older run is not resumed
SEPARATORS = ("[SEP]", "</s>", "<|endoftext|>")  # tried in order when the tokenizer names no eos token
BATCH_DOCS, BATCH_CHARS = 256, 1 << 20
WORK = ".prepare"  # in-progress state inside OUT: state.json + journal.bin
OUR_FILES = ("train", "val", WORK, "meta.json", "stats.json", "tokenizer.json", "tokenizer_config.json")
KEPT = 0  # record reasons: 0 = kept (or, from a worker, passed the filters), i + 1 = REASONS[i]
EXACT, NEAR = REASONS.index("exact_duplicate") + 1, REASONS.index("near_duplicate") + 1
RESTART = "; its unfinished output was removed: run the command again to start over"  # see prepare()'s except


def default_workers() -> int:
    return min(os.cpu_count() or 1, 4)


def prepare(
    sources: list[str | Path], tokenizer: str | Path, out: str | Path, *, field: str = "text",
    val_fraction: float = 0.01, shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int | None = None,
    min_chars: int = 20, min_words: int = 4, max_dup_line_fraction: float = 0.3,
    max_top_ngram_fraction: float = 0.2, near_dup_threshold: float | None = 0.8, overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Clean, filter, dedup and tokenise `sources` into OUT (see the module docstring); returns the stats.

    near_dup_threshold=None turns near dedup off. Rerunning with the same arguments resumes an interrupted
    run, or returns the stats of a finished one; OUT holding a dataset made otherwise is refused unless
    overwrite. Bad input raises LmforgeError and leaves no partial output behind."""
    workers = default_workers() if workers is None else workers
    filters = Filters(min_chars, min_words, max_dup_line_fraction, max_top_ngram_fraction)
    _check_options(field, val_fraction, shard_tokens, workers, filters, near_dup_threshold)
    out = Path(out)
    files = find_files(sources, exclude=out)
    check_files(files, field)
    info = load_tokenizer(tokenizer)
    near = None if near_dup_threshold is None else float(near_dup_threshold)
    # as JSON, normalised: 0 and 0.0 must not make the same run look like another one
    options = {"field": field, "val_fraction": float(val_fraction), "shard_tokens": int(shard_tokens),
               "min_chars": int(min_chars), "min_words": int(min_words),
               "max_dup_line_fraction": float(max_dup_line_fraction),
               "max_top_ngram_fraction": float(max_top_ngram_fraction), "near_dup_threshold": near,
               "num_perm": NUM_PERM, "pipeline": PIPELINE_VERSION}
    identity = {"format": FORMAT, "sources": [str(f) for f in files], "sources_sha256": _sources_sha256(files),
                "tokenizer_sha256": info.sha256, "options": options}
    bands, rows = _lsh_params(near_dup_threshold)
    job = _Job(out, files, field, identity, info, filters, val_fraction, shard_tokens, workers, bands, rows, progress)
    existed = out.exists()
    with _exclusive(out):
        if _open_out(out, identity, overwrite) == "done":
            shutil.rmtree(out / WORK, ignore_errors=True)  # an interrupt between meta.json and the cleanup
            return json.loads((out / "stats.json").read_text())
        try:
            return _run(job)
        except LmforgeError:  # bad input found mid-way: this output can never be finished, so leave none
            _discard(out, remove_folder=not existed)
            raise


def _check_options(field: str, val_fraction: float, shard_tokens: int, workers: int, filters: Filters,
                   near_dup_threshold: float | None) -> None:
    if not field:
        raise LmforgeError("--field must not be empty")
    if not 0 <= val_fraction < 1:
        raise LmforgeError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1 or workers < 1:
        raise LmforgeError(f"--shard-tokens and --workers must be >= 1, got {shard_tokens} and {workers}")
    if filters.min_chars < 0 or filters.min_words < 0:
        raise LmforgeError("--min-chars and --min-words must be >= 0")
    for name in ("max_dup_line_fraction", "max_top_ngram_fraction"):
        if not 0 < getattr(filters, name) <= 1:
            raise LmforgeError(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(filters, name)}")
    if near_dup_threshold is not None and not 0 < near_dup_threshold < 1:
        raise LmforgeError(f"--near-dup-threshold must be in (0, 1), got {near_dup_threshold}")


def _lsh_params(threshold: float | None) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH picks for this Jaccard threshold; (0, 0) = off."""
    if threshold is None:
        return 0, 0
    from datasketch import MinHashLSH

    try:
        lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    except ValueError as e:
        raise LmforgeError(f"--near-dup-threshold {threshold}: {e}") from None
    return lsh.b, lsh.r


def _sources_sha256(files: list[Path]) -> str:
    """Names and sizes: enough to notice a corpus edited between an interrupted run and its resumption."""
    listing = [[str(f), f.stat().st_size] for f in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


# ---- tokenizer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerInfo:
    files: dict[str, bytes]  # name in OUT -> content: tokenizer.json, and tokenizer_config.json if given
    sep_id: int
    vocab_size: int  # largest id + 1
    dtype: str
    sha256: str


def load_tokenizer(spec: str | Path) -> TokenizerInfo:
    """A tokenizer.json (or a folder holding one, with its tokenizer_config.json), loaded by lmforge's
    Tokenizer; its separator: the eos token, else the first of SEPARATORS it has."""
    path = Path(spec)
    json_path = path / "tokenizer.json" if path.is_dir() else path
    if not json_path.is_file():
        raise LmforgeError(f"no tokenizer.json in {path}" if path.is_dir() else f"no such tokenizer file: {path}")
    files = {"tokenizer.json": _read_bytes(json_path)}
    config = json_path.parent / "tokenizer_config.json"
    if config.is_file():
        files["tokenizer_config.json"] = _read_bytes(config)
    tokenizer = _tokenizer_from(files, json_path)
    sep = next((i for i in map(tokenizer.token_id, (tokenizer.eos_token, *SEPARATORS)) if i is not None), None)
    if sep is None:
        raise LmforgeError(f"tokenizer {path} has no document separator: no eos token and none of "
                           f"{', '.join(SEPARATORS)}")
    vocab_size = max([tokenizer.vocab_size - 1, *tokenizer.backend.get_vocab(with_added_tokens=True).values()]) + 1
    digest = hashlib.sha256(b"".join(name.encode() + b"\0" + data for name, data in sorted(files.items())))
    return TokenizerInfo(files, sep, vocab_size, "uint16" if vocab_size <= 2**16 else "uint32", digest.hexdigest())


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise LmforgeError(f"cannot read {path}: {e.strerror or e}") from None


def _tokenizer_from(files: dict[str, bytes], json_path: Path) -> Tokenizer:
    if json_path.name == "tokenizer.json":
        return Tokenizer.from_dir(json_path.parent)
    # Tokenizer.from_dir wants the name tokenizer.json: load a copy under that name, report the real one
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        try:
            return Tokenizer.from_dir(Path(tmp))
        except LmforgeError as e:
            raise LmforgeError(str(e).replace(tmp, str(json_path))) from None


# ---- the output folder -------------------------------------------------------------------------


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """OUT, created if need be and locked for this process: two runs writing one folder would mix their shards."""
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LmforgeError(f"cannot create {out}: {e.strerror or e}") from None
    if fcntl is None:  # no flock (Windows): unguarded
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the OS however this process ends
        except BlockingIOError:
            raise LmforgeError(f"another `lmforge data prepare` is writing {out}: let it finish, or use another "
                               "--out") from None
        yield
    finally:
        os.close(fd)


def _open_out(out: Path, identity: dict[str, Any], overwrite: bool) -> str:
    """'done' (a finished dataset made the same way), 'resume' (an interrupted one) or 'fresh'."""
    for marker, what in ((out / "meta.json", "a dataset"), (out / WORK / "state.json", "an unfinished dataset")):
        if not marker.is_file():
            continue
        difference = _difference(marker, identity)
        if difference is None:
            return "done" if marker.name == "meta.json" else "resume"
        if not overwrite:
            raise LmforgeError(f"{out} holds {what} made with different {difference}: use another --out, or "
                               "--overwrite to replace it")
        _discard(out, remove_folder=False)
        return "fresh"
    if out.is_dir() and any(out.iterdir()):
        raise LmforgeError(f"{out} is not empty and holds no lmforge dataset: choose a new or empty folder")
    return "fresh"


def _difference(marker: Path, identity: dict[str, Any]) -> str | None:
    """What differs between the run recorded in `marker` and this one (None: nothing)."""
    try:
        old = json.loads(marker.read_text())
    except (OSError, ValueError):
        return f"settings ({marker.name} is unreadable)"
    if not isinstance(old, dict) or old.get("format") != identity["format"]:
        return "format"
    for key, what in (("sources", "sources"), ("sources_sha256", "source files (their sizes changed)"),
                      ("tokenizer_sha256", "tokenizer")):
        if old.get(key) != identity[key]:
            return what
    before, now = old.get("options") or {}, identity["options"]
    changed = sorted(k for k in {*before, *now} if before.get(k) != now.get(k))
    return f"options ({', '.join(changed)})" if changed else None


def _discard(out: Path, remove_folder: bool) -> None:
    """Remove what prepare writes in OUT (and nothing else)."""
    for name in OUR_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    if remove_folder and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _write_atomic(path: Path, data: bytes | np.ndarray) -> None:
    """Whole or not at all: an interrupted write leaves only a .tmp file, which a rerun replaces."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data.tobytes() if isinstance(data, np.ndarray) else data)
    os.replace(tmp, path)


def _write_json(path: Path, value: Any) -> None:
    _write_atomic(path, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode())


# ---- journal, dedup index, shard writers -------------------------------------------------------


def _record_dtype(bands: int) -> np.dtype:
    fields: list[tuple[Any, ...]] = [("reason", "u1"), ("split", "u1"), ("length", "<u4"), ("key", "V16")]
    if bands:
        fields.append(("bands", "<u8", (bands,)))
    return np.dtype(fields)


class _Journal:
    """One record per document read, in corpus order, appended before the document's tokens can reach a
    shard: so the journal is never behind the shards."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.dtype = path, dtype
        size = path.stat().st_size if path.exists() else 0
        self.count = size // dtype.itemsize
        if size != self.count * dtype.itemsize:
            os.truncate(path, self.count * dtype.itemsize)  # a record torn by the interrupt: not written
        self._file = path.open("ab")

    def records(self, chunk: int = 1 << 18) -> Iterator[np.ndarray]:
        """All records, a chunk at a time (the journal can be larger than memory wants)."""
        if self.count == 0:
            return
        data = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.count,))
        for start in range(0, self.count, chunk):
            yield np.array(data[start : start + chunk])

    def append(self, records: np.ndarray) -> None:
        self._file.write(records.tobytes())
        self._file.flush()  # into the OS before any shard holding these documents is written
        self.count += len(records)

    def close(self) -> None:
        self._file.close()


class _Dedup:
    """Exact keys of every document that passed the filters; LSH band keys of every kept one."""

    def __init__(self, bands: int) -> None:
        self.seen: set[bytes] = set()
        self.index: list[set[int]] = [set() for _ in range(bands)]

    def decide(self, key: bytes, bands: np.ndarray | None) -> int:
        """KEPT, EXACT or NEAR for the next document in corpus order (remembering it)."""
        if key in self.seen:
            return EXACT
        self.seen.add(key)
        if bands is None or not bands.any():  # near dedup off, or a text without words
            return KEPT
        keys = bands.tolist()
        if any(k in band for k, band in zip(keys, self.index, strict=True)):
            return NEAR  # shares a whole band with an earlier document: likely Jaccard >= the threshold
        for k, band in zip(keys, self.index, strict=True):
            band.add(k)
        return KEPT

    def replay(self, journal: _Journal) -> None:
        """Rebuild the index from the journal of an interrupted run."""
        for chunk in journal.records():
            for record in chunk:
                reason = int(record["reason"])
                if reason in (KEPT, EXACT, NEAR):
                    self.seen.add(record["key"].tobytes())
                if reason == KEPT and self.index and record["bands"].any():
                    for k, band in zip(record["bands"].tolist(), self.index, strict=True):
                        band.add(k)


class _ShardWriter:
    """One split's token stream -> shards of exactly `size` tokens (the last one shorter), written whole."""

    def __init__(self, out: Path, split: str, dtype: str, size: int) -> None:
        self.folder, self.split, self.dtype, self.size = out / split, split, np.dtype(dtype).newbyteorder("<"), size
        self.folder.mkdir(parents=True, exist_ok=True)
        self.finished = self._finished_shards()
        self.shards = [(f"{split}/{self._name(i)}", size) for i in range(self.finished)]
        self.parts: list[np.ndarray] = []
        self.filled = 0

    @staticmethod
    def _name(i: int) -> str:
        return f"{i:05d}.bin"

    def _finished_shards(self) -> int:
        """Full shards already written by an interrupted run; anything else in the folder is removed."""
        n = 0
        while (self.folder / self._name(n)).is_file():
            if (self.folder / self._name(n)).stat().st_size != self.size * self.dtype.itemsize:
                break  # the last shard of a run stopped before meta.json: it is written again
            n += 1
        keep = {self._name(i) for i in range(n)}
        for path in self.folder.iterdir():
            if path.name not in keep:
                path.unlink()
        return n

    def push(self, tokens: np.ndarray) -> None:
        self.parts.append(tokens)
        self.filled += len(tokens)
        if self.filled < self.size:
            return
        data = np.concatenate(self.parts)
        start = 0
        while len(data) - start >= self.size:
            self._write(data[start : start + self.size])
            start += self.size
        self.parts = [data[start:]] if start < len(data) else []
        self.filled = len(data) - start

    def finish(self) -> None:
        if self.filled:
            self._write(np.concatenate(self.parts))
            self.parts, self.filled = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        name = self._name(len(self.shards))
        _write_atomic(self.folder / name, tokens.astype(self.dtype, copy=False))
        self.shards.append((f"{self.split}/{name}", len(tokens)))

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.shards)


# ---- workers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _WorkerConfig:
    tokenizer_dir: str
    filters: Filters
    dtype: str
    bands: int
    rows: int


@dataclass
class _Batch:
    """A worker's results for a batch of documents."""

    reasons: np.ndarray  # uint8 per document: 0 = passed the filters, else 1 + its index in REASONS
    keys: list[bytes]  # exact keys (zeros for documents that failed the filters)
    bands: np.ndarray  # (documents, bands) uint64 LSH band keys
    lengths: np.ndarray  # int64 tokens per document (0 for documents that failed the filters)
    tokens: np.ndarray  # every passing document's tokens, concatenated, no separators


_WORKER: dict[str, Any] = {}


def _init_worker(config: _WorkerConfig, one_thread: bool) -> None:
    if one_thread:  # a pool worker
        # parallelism comes from the processes; Rust threads in each would oversubscribe the cores
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        # Ctrl-C reaches the whole process group: the main process stops the pool, workers print no tracebacks
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    tokenizer = Tokenizer.from_dir(Path(config.tokenizer_dir))
    tokenizer.backend.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is text, not a sep
    _WORKER.update(config=config, tokenizer=tokenizer)


def _process(texts: list[str]) -> _Batch:
    config: _WorkerConfig = _WORKER["config"]
    tokenizer: Tokenizer = _WORKER["tokenizer"]
    cleaned = [clean_text(t) for t in texts]
    reasons = np.zeros(len(texts), dtype=np.uint8)
    for i, text in enumerate(cleaned):
        reason = filter_reason(text, config.filters)
        reasons[i] = 0 if reason is None else REASONS.index(reason) + 1
    passed = np.flatnonzero(reasons == 0)
    texts_passed = [cleaned[i] for i in passed]
    bands = np.zeros((len(texts), config.bands), dtype=np.uint64)
    if config.bands and len(passed):
        bands[passed] = minhash_bands(texts_passed, NUM_PERM, config.bands, config.rows)
    encoded = tokenizer.encode_batch(texts_passed, add_special_tokens=False) if texts_passed else []
    lengths = np.zeros(len(texts), dtype=np.int64)
    lengths[passed] = [len(ids) for ids in encoded]
    tokens = np.fromiter(chain.from_iterable(encoded), dtype=config.dtype, count=int(lengths.sum()))
    keys = [exact_key(t) if r == 0 else bytes(16) for t, r in zip(cleaned, reasons, strict=True)]
    return _Batch(reasons, keys, bands, lengths, tokens)


Items = list[tuple[int, Doc]]  # (ordinal in the corpus, document)


class _Workers:
    """Batches -> (batch, results) in submission order, with at most two batches per worker in flight, so
    reading never runs ahead of tokenising by more than that."""

    def __init__(self, workers: int, config: _WorkerConfig) -> None:
        self.workers, self.pool = workers, None
        if workers == 1:
            _init_worker(config, one_thread=False)
            return
        # fork where there is one: no re-import of the __main__ module, and workers start at once. The pool is
        # made before any other thread (the progress bar's) exists
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self.pool = multiprocessing.get_context(method).Pool(workers, _init_worker, (config, True))

    def map(self, batches: Iterator[Items]) -> Iterator[tuple[Items, _Batch]]:
        if self.pool is None:
            for batch in batches:
                yield batch, _process([doc.text for _, doc in batch])
            return
        pending: deque[tuple[Items, Any]] = deque()
        for batch in batches:
            pending.append((batch, self.pool.apply_async(_process, ([doc.text for _, doc in batch],))))
            if len(pending) >= 2 * self.workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


# ---- progress ----------------------------------------------------------------------------------


class _Progress:
    """A rich bar over the corpus bytes, with documents read, kept and tokens written."""

    def __init__(self, enabled: bool, total_bytes: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

        fields = "{task.fields[docs]:,} docs, {task.fields[kept]:,} kept, {task.fields[tokens]:,} tokens"
        console = Console(stderr=True)
        # off when stderr is no terminal: even a transient bar leaves a blank line in a log or a pipe
        self.bar = Progress(TextColumn("preparing"), BarColumn(), TaskProgressColumn(), TextColumn(fields),
                            TimeRemainingColumn(), console=console, transient=True,
                            disable=not (enabled and console.is_terminal))
        self.task = self.bar.add_task("prepare", total=max(total_bytes, 1), docs=0, kept=0, tokens=0)
        self.docs = self.kept = self.tokens = 0

    def __enter__(self) -> _Progress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def advance(self, nbytes: int, docs: int, kept: int = 0, tokens: int = 0) -> None:
        self.docs, self.kept, self.tokens = self.docs + docs, self.kept + kept, self.tokens + tokens
        self.bar.update(self.task, advance=nbytes, docs=self.docs, kept=self.kept, tokens=self.tokens)


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class _Job:
    out: Path
    files: list[Path]
    field: str
    identity: dict[str, Any]
    tokenizer: TokenizerInfo
    filters: Filters
    val_fraction: float
    shard_tokens: int
    workers: int
    bands: int
    rows: int
    progress: bool


@dataclass
class _Pending:
    """A kept document of an interrupted run whose tokens had not all reached a finished shard."""

    split: int
    length: int
    skip: int  # of its tokens (separator included), how many the finished shards already hold


def _run(job: _Job) -> dict[str, Any]:
    work = job.out / WORK
    work.mkdir(parents=True, exist_ok=True)
    _write_json(work / "state.json", job.identity)  # first: marks OUT as this run's, for a resume
    for name, data in job.tokenizer.files.items():
        _write_atomic(job.out / name, data)
    journal = _Journal(work / "journal.bin", _record_dtype(job.bands))
    writers = [_ShardWriter(job.out, split, job.tokenizer.dtype, job.shard_tokens) for split in SPLITS]
    dedup = _Dedup(job.bands)
    dedup.replay(journal)
    pending = _pending(journal, [w.finished * job.shard_tokens for w in writers])
    config = _WorkerConfig(str(job.out), job.filters, job.tokenizer.dtype, job.bands, job.rows)
    total_bytes = sum(f.stat().st_size for f in job.files)
    with _Workers(job.workers, config) as pool, _Progress(job.progress, total_bytes) as bar:
        read, journaled = [0], journal.count
        batches = _batches(read_docs(job.files, job.field), journaled, pending, bar, read)
        for batch, result in pool.map(batches):
            _take(job, batch, result, journaled, journal, dedup, pending, writers, bar)
    if read[0] < journal.count:
        raise LmforgeError(f"the sources hold fewer documents than when this run was interrupted{RESTART}")
    for writer in writers:
        writer.finish()
    stats = _stats(journal, writers)
    journal.close()
    _check_output(stats, job.val_fraction)
    _write_json(job.out / "stats.json", stats)
    _write_json(job.out / "meta.json", _meta(job, writers))  # last: the dataset is finished
    shutil.rmtree(work)
    return stats


def _pending(journal: _Journal, finished: list[int]) -> dict[int, _Pending]:
    """Journaled kept documents whose tokens run past the finished shards of their split, by ordinal."""
    offsets, out, base = [0, 0], {}, 0
    for chunk in journal.records():
        kept = chunk["reason"] == KEPT
        for split in (0, 1):
            rows = np.flatnonzero(kept & (chunk["split"] == split))
            sizes = chunk["length"][rows].astype(np.int64) + 1  # + the separator
            ends = offsets[split] + np.cumsum(sizes)
            for row, end, size in zip(rows, ends, sizes, strict=True):
                if end > finished[split]:
                    start = int(end - size)
                    out[base + int(row)] = _Pending(split, int(size) - 1, max(0, finished[split] - start))
            offsets[split] = int(ends[-1]) if len(ends) else offsets[split]
        base += len(chunk)
    if any(o < f for o, f in zip(offsets, finished, strict=True)):
        raise LmforgeError(f"the unfinished output's journal is behind its shards{RESTART}")
    return out


def _batches(docs: Iterator[Doc], journaled: int, pending: dict[int, _Pending], bar: _Progress,
             read: list[int]) -> Iterator[Items]:
    """(ordinal, document) batches of what still needs a worker: the new documents, and the journaled ones
    whose tokens are not all in finished shards. read[0] counts the documents read."""
    batch: Items = []
    chars = 0
    for ordinal, doc in enumerate(docs):
        read[0] = ordinal + 1
        if ordinal < journaled and ordinal not in pending:
            bar.advance(doc.nbytes, 1)
            continue
        batch.append((ordinal, doc))
        chars += len(doc.text)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _take(job: _Job, batch: Items, result: _Batch, journaled: int, journal: _Journal, dedup: _Dedup,
          pending: dict[int, _Pending], writers: list[_ShardWriter], bar: _Progress) -> None:
    """Decide the new documents' fates in corpus order and journal them, then send kept tokens to the shards.
    Documents below `journaled` were decided by the interrupted run: only their missing tokens are written."""
    new = [j for j, (ordinal, _) in enumerate(batch) if ordinal >= journaled]
    records = np.zeros(len(new), dtype=journal.dtype)
    fates = {j: pending[ordinal] for j, (ordinal, _) in enumerate(batch) if ordinal < journaled}
    for r, j in enumerate(new):
        reason, key = int(result.reasons[j]), result.keys[j]
        if reason == KEPT:
            reason = dedup.decide(key, result.bands[j] if job.bands else None)
        split = int(reason == KEPT and split_value(key) < job.val_fraction)
        records["reason"][r], records["split"][r], records["key"][r] = reason, split, key
        if job.bands:
            records["bands"][r] = result.bands[j]
        if reason == KEPT:
            records["length"][r] = result.lengths[j]
            fates[j] = _Pending(split, int(result.lengths[j]), 0)
    journal.append(records)
    ends = np.cumsum(result.lengths)
    sep = np.array([job.tokenizer.sep_id], dtype=job.tokenizer.dtype)
    written = 0
    for j in sorted(fates):  # corpus order
        fate = fates[j]
        if result.reasons[j] != KEPT or result.lengths[j] != fate.length:
            raise LmforgeError(f"a source document changed since this run was interrupted{RESTART}")
        tokens = np.concatenate([result.tokens[ends[j] - fate.length : ends[j]], sep])[fate.skip :]
        writers[fate.split].push(tokens)
        written += len(tokens)
    bar.advance(sum(doc.nbytes for _, doc in batch), len(batch), int((records["reason"] == KEPT).sum()), written)


def _stats(journal: _Journal, writers: list[_ShardWriter]) -> dict[str, Any]:
    """docs in/out, dropped by reason, docs/tokens/shards per split (tokens include the separators)."""
    counts = np.zeros(len(REASONS) + 1, dtype=np.int64)
    docs, tokens = [0, 0], [0, 0]
    for chunk in journal.records():
        counts += np.bincount(chunk["reason"], minlength=len(REASONS) + 1)
        kept = chunk["reason"] == KEPT
        for split in (0, 1):
            rows = kept & (chunk["split"] == split)
            docs[split] += int(rows.sum())
            tokens[split] += int((chunk["length"][rows].astype(np.int64) + 1).sum())
    if tokens != [w.tokens for w in writers]:
        raise RuntimeError(f"shards hold {[w.tokens for w in writers]} tokens, the journal says {tokens}")
    return {
        "docs_in": journal.count,
        "docs_out": int(counts[KEPT]),
        "dropped": {reason: int(counts[i + 1]) for i, reason in enumerate(REASONS)},
        "splits": {name: {"docs": docs[i], "tokens": tokens[i], "shards": len(writers[i].shards)}
                   for i, name in enumerate(SPLITS)},
    }


def _check_output(stats: dict[str, Any], val_fraction: float) -> None:
    if stats["docs_out"] == 0:
        dropped = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in stats["dropped"].items() if n)
        raise LmforgeError(f"no documents left: all {stats['docs_in']} were dropped ({dropped or 'none read'})")
    if stats["splits"]["train"]["docs"] == 0:
        raise LmforgeError(f"all {stats['docs_out']} documents fell into the validation split "
                           f"(--val-fraction {val_fraction}): lower it or add documents")


def _meta(job: _Job, writers: list[_ShardWriter]) -> dict[str, Any]:
    info = job.tokenizer
    splits = {w.split: {"shards": [name for name, _ in w.shards], "tokens": [n for _, n in w.shards]}
              for w in writers}
    return {"format": FORMAT, "dtype": info.dtype, "vocab_size": info.vocab_size, "sep_id": info.sep_id,
            "splits": splits, **{k: v for k, v in job.identity.items() if k != "format"}}
