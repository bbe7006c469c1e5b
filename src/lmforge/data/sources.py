"""Corpus sources for `lmforge data prepare`: files and folders -> one stream of raw documents, in a fixed order.

A .txt or .md file is one document; a .jsonl file is one document per non-blank line (the text in a field);
a .parquet file is one document per row (the text in a column), read one row-group batch at a time. Folders
are walked recursively in sorted path order, skipping hidden entries and files of other types. Nothing here
holds more than one document (or one parquet batch) in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.textio import jsonl_rows, read_text_file

EXTENSIONS = (".txt", ".md", ".jsonl", ".parquet")
PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Doc:
    text: str
    nbytes: int  # the share of its file's bytes this document stands for: progress is shown in bytes


def find_files(sources: list[str | Path], exclude: Path | None = None) -> list[Path]:
    """The corpus files named by `sources` (files, or folders walked recursively), each once, in a fixed order."""
    if not sources:
        raise LmforgeError("no sources given: pass files or folders of .txt, .md, .jsonl or .parquet")
    skip = exclude.resolve() if exclude is not None else None
    found: dict[Path, None] = {}  # resolved path -> None: ordered and without repeats
    for source in sources:
        path = Path(source)
        if path.is_dir():
            for file in _walk(path):
                resolved = file.resolve()
                if skip is None or not resolved.is_relative_to(skip):  # never read our own output
                    found.setdefault(resolved)
        elif path.is_file():
            if path.suffix.lower() not in EXTENSIONS:
                raise LmforgeError(f"{path}: unknown file type {path.suffix or '(no extension)'!r} "
                                   f"(expected {', '.join(EXTENSIONS)})")
            found.setdefault(path.resolve())
        else:
            raise LmforgeError(f"no such file or folder: {path}")
    if not found:
        raise LmforgeError(f"no {', '.join(EXTENSIONS)} files in {', '.join(map(str, sources))}")
    return list(found)


def _walk(folder: Path) -> list[Path]:
    files = []
    for path in folder.rglob("*"):
        parts = path.relative_to(folder).parts
        if path.is_file() and path.suffix.lower() in EXTENSIONS and not any(p.startswith(".") for p in parts):
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def check_files(files: list[Path], field: str) -> None:
    """What can be checked before any output is written: every file opens, and parquet files have the column."""
    for path in files:
        try:
            with path.open("rb"):
                pass
        except OSError as e:
            raise LmforgeError(f"cannot read {path}: {e.strerror or e}") from None
        if path.suffix.lower() == ".parquet":
            _open_parquet(path, field).close()


def read_docs(files: list[Path], field: str) -> Iterator[Doc]:
    """Every document of every file, streamed in order."""
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl_docs(path, field)
        elif suffix == ".parquet":
            yield from _parquet_docs(path, field)
        else:
            yield _text_doc(path)


def _text_doc(path: Path) -> Doc:
    text = read_text_file(path)  # strict UTF-8: an error names the file and the first bad byte
    nul = text.find("\x00")
    if nul >= 0:  # valid UTF-8 can still be binary data (UTF-16 text, images saved as .txt)
        raise LmforgeError(f"{path} looks like a binary file (NUL byte at offset {len(text[:nul].encode())})")
    return Doc(text.removeprefix("\ufeff"), os.path.getsize(path))


def _jsonl_docs(path: Path, field: str) -> Iterator[Doc]:
    for number, row, nbytes in jsonl_rows(path):
        where = f"{path} line {number}"
        if field not in row:
            raise LmforgeError(f"{where} has no field {field!r} (use --field to pick the text field)")
        value = row[field]
        if value is not None and not isinstance(value, str):
            raise LmforgeError(f"{where}: field {field!r} is {type(value).__name__}, not text")
        yield Doc(value or "", nbytes)


def _open_parquet(path: Path, field: str) -> Any:
    """An open pyarrow ParquetFile whose `field` column holds text (pyarrow is imported only for parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise LmforgeError(f"{path} is not a readable parquet file ({str(e).splitlines()[0]})") from None
    schema = parquet.schema_arrow
    if field not in schema.names:
        parquet.close()
        raise LmforgeError(f"{path} has no column {field!r} (columns: {', '.join(schema.names)}; use --field)")
    kind = schema.field(field).type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)):
        parquet.close()
        raise LmforgeError(f"{path}: column {field!r} is {kind}, not text")
    return parquet


def _parquet_docs(path: Path, field: str) -> Iterator[Doc]:
    import pyarrow as pa

    parquet = _open_parquet(path, field)
    try:
        rows = max(parquet.metadata.num_rows, 1)
        share = os.path.getsize(path) // rows
        try:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
                for value in batch.column(0).to_pylist():
                    yield Doc(value or "", share)  # a null is an empty document: the length filter drops it
        except UnicodeDecodeError:
            raise LmforgeError(f"{path}: column {field!r} holds text that is not valid UTF-8") from None
        except (OSError, pa.ArrowException) as e:
            raise LmforgeError(f"cannot read {path} ({str(e).splitlines()[0]})") from None
    finally:
        parquet.close()
