"""Text input for the command-line shells: stdin, files and arguments, decoded as strict UTF-8.

Bytes that are not UTF-8 are bad input (a one-line LmforgeError naming the first bad byte), never a
UnicodeError later on, nor lone surrogates written back out. Imports nothing heavy: `lmforge.text` uses it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError


def decode_utf8(data: bytes, source: str) -> str:
    """Strict UTF-8 -> str; a bad byte is an LmforgeError that says where."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{source} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_stdin() -> str:
    """All of stdin as text, with newlines normalised the way text-mode reading does (\\r\\n and \\r -> \\n)."""
    stream = sys.stdin
    if stream is None:
        return ""
    buffer = getattr(stream, "buffer", None)
    if buffer is None:  # an in-memory text stream (tests, embedding applications): already decoded
        return check_text(stream.read(), "stdin")
    text = decode_utf8(buffer.read(), "stdin")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file; missing, unreadable or not UTF-8 -> LmforgeError."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise LmforgeError(f"no such file: {path}") from None
    except OSError as e:
        raise LmforgeError(f"cannot read {path}: {e.strerror or e}") from None
    return decode_utf8(data, str(path))


def check_text(text: str, source: str) -> str:
    """A str that came from outside decoded with surrogateescape (command-line arguments, os.environ):
    refuse the lone surrogates that stand for bytes that were not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        errors = "surrogateescape" if _escaped_only(text) else "surrogatepass"
        decode_utf8(text.encode("utf-8", errors), source)  # the bytes as given: raises, naming the first bad one
        raise LmforgeError(f"{source} is not valid UTF-8") from None
    return text


def check_arguments(texts: list[str]) -> list[str]:
    """Command-line arguments: each must be valid UTF-8."""
    for i, text in enumerate(texts, 1):
        check_text(text, f"argument {i}" if len(texts) > 1 else "the argument")
    return texts


def _escaped_only(text: str) -> bool:
    """Whether every surrogate in text is one surrogateescape makes (U+DC80..U+DCFF)."""
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def jsonl_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any], int]]:
    """(line number, row, the line's bytes) for every non-blank line of a JSONL file, read as a stream; a line
    that is not UTF-8 or not a JSON object is an LmforgeError naming the file and line."""
    path = Path(path)
    if path.is_dir():
        raise LmforgeError(f"{path} is a folder, not a JSONL file")
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise LmforgeError(f"no such file: {path}") from None
    except OSError as e:
        raise LmforgeError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        for number, raw in enumerate(f, 1):
            where = f"{path} line {number}"
            line = decode_utf8(raw, where).removeprefix("\ufeff").strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmforgeError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise LmforgeError(f"{where}: expected a JSON object, got {json_type(row)}")
            yield number, row, len(raw)


def json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
