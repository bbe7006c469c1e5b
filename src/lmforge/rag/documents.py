"""Files -> documents for retrieval: plain text, markdown, HTML, PDF and JSONL, each read to clean text.

Every document's text has "\\n" newlines, and HTML headings come out as markdown headings, so the chunker
(chunk.py) sees one kind of structure whatever the file was. A file we cannot read is an LmforgeError naming it.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.textio import json_type, jsonl_rows

__all__ = ["SUFFIXES", "Document", "content_hash", "find_files", "html_to_text", "load_documents", "markdown_headings",
           "read_document"]

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".jsonl")
_KINDS = {".txt": "txt", ".md": "md", ".markdown": "md", ".html": "html", ".htm": "html", ".pdf": "pdf",
          ".jsonl": "jsonl"}


@dataclass
class Document:
    path: str  # absolute path of the file; for JSONL "file#line" (1-based)
    text: str
    title: str
    kind: str  # "txt" | "md" | "html" | "pdf" | "jsonl"


def find_files(paths: list[str | Path]) -> list[Path]:
    """The documents to read: named files as they are, folders searched recursively (sorted, supported suffixes
    only, hidden files and folders skipped). Each file appears once, however it was reached."""
    found: list[Path] = []
    seen: set[Path] = set()
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise LmforgeError(f"no such file or folder: {given}")
        if path.is_dir():
            files = _folder_files(path)
            if not files:
                raise LmforgeError(f"{given} holds no supported files ({', '.join(SUFFIXES)})")
        else:
            if _kind(path) is None:
                raise LmforgeError(f"{given}: unsupported file type {path.suffix or '(no suffix)'!r} "
                                   f"(supported: {', '.join(SUFFIXES)})")
            files = [path]
        for f in files:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                found.append(f)
    return found


def _folder_files(folder: Path) -> list[Path]:
    def unreadable(e: OSError) -> None:  # os.walk would skip a folder it cannot list without a word
        raise LmforgeError(f"cannot read {e.filename}: {e.strerror or e}")

    files = []
    # os.walk does not follow symlinked folders, so a link loop cannot make this run forever
    for root, dirs, names in os.walk(folder, onerror=unreadable):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = Path(root, name)
            if not name.startswith(".") and _kind(path) is not None and path.is_file():
                files.append(path)
    return sorted(files, key=lambda p: p.relative_to(folder).parts)


def _kind(path: Path) -> str | None:
    return _KINDS.get(path.suffix.lower())


def load_documents(paths: list[str | Path]) -> list[Document]:
    """find_files + read_document: every document under the given files and folders."""
    return [doc for f in find_files(paths) for doc in read_document(f)]


def read_document(path: str | Path) -> list[Document]:
    """One file -> its documents: one per file, except JSONL, which gives one per non-blank line."""
    path = Path(path)
    kind = _kind(path)
    if kind is None:
        raise LmforgeError(f"{path}: unsupported file type {path.suffix or '(no suffix)'!r} "
                           f"(supported: {', '.join(SUFFIXES)})")
    if kind == "jsonl":
        return _read_jsonl(path)
    data = _read_bytes(path)
    absolute = str(path.resolve())
    if kind == "pdf":
        text, title = _read_pdf(data, path)
        return [Document(absolute, text, title or path.stem, kind)]
    if b"\0" in data:
        raise LmforgeError(f"{path} looks binary (it holds NUL bytes)")
    if kind == "html":
        text, title = html_to_text(_decode_html(data, path))
        return [Document(absolute, text, title or path.stem, kind)]
    text = _newlines(_decode_utf8(data, path).removeprefix("\ufeff"))
    title = _markdown_title(text) if kind == "md" else _first_line(text)
    return [Document(absolute, text, title or path.stem, kind)]


def content_hash(path: str | Path) -> str:
    """sha256 (hex) of the file's bytes: an unchanged hash means the file need not be indexed again."""
    digest = hashlib.sha256()
    try:
        with Path(path).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise LmforgeError(f"cannot read {path}: {e.strerror or e}") from None
    return digest.hexdigest()


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:  # missing, a folder, no permission, a dangling link
        raise LmforgeError(f"cannot read {path}: {e.strerror or e}") from None


def _decode_utf8(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def _newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _first_line(text: str) -> str:
    for line in text.split("\n"):
        if line.strip():
            return line.strip()[:80]
    return ""


_HEADING = re.compile(r"(#{1,6})[ \t]+(.*)")
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
_CLOSING_HASHES = re.compile(r"(?:^|[ \t]+)#+[ \t]*$")


def markdown_headings(text: str) -> Iterator[tuple[int, int, int, str]]:
    """(line start, line end, level, heading text) for each ATX heading line ("# " to "###### "), skipping
    lines inside ``` / ~~~ code fences, where "# " is a shell or Python comment, not a heading."""
    fence = ""
    start = 0
    for line in text.split("\n"):
        end = start + len(line)
        opened = _FENCE.match(line)
        if fence:
            if opened and opened.group(1)[0] == fence[0] and len(opened.group(1)) >= len(fence) \
                    and not line[opened.end():].strip():
                fence = ""
        elif opened:
            fence = opened.group(1)
        elif m := _HEADING.fullmatch(line):
            yield start, end, len(m.group(1)), _CLOSING_HASHES.sub("", m.group(2)).strip()
        start = end + 1


def _markdown_title(text: str) -> str:
    return next((title for _, _, level, title in markdown_headings(text) if level == 1 and title), "")


# HTML ------------------------------------------------------------------------------------------------------------

_SKIPPED = {"script", "style", "noscript", "template", "head", "title", "svg"}  # title: kept as the title only
_PARAGRAPH = {"p", "div", "section", "article", "main", "header", "footer", "nav", "aside", "blockquote", "pre",
              "ul", "ol", "dl", "table", "figure", "figcaption", "form", "fieldset", "address", "hr", "details",
              "summary", "body"}
_LINE = {"br", "li", "tr", "dt", "dd", "caption", "option"}
_CELL = {"td", "th"}
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}


class _TextExtractor(HTMLParser):
    """Visible text of an HTML page, one paragraph per block element, whitespace collapsed within lines
    (except in <pre>), headings as markdown headings and <pre> blocks as ``` fences."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # entities arrive in handle_data already unescaped
        self.parts: list[str] = []
        self.skipping: list[str] = []  # open elements whose content is not shown
        self.pending_break = 0  # newlines owed before the next text
        self.pending_space = False
        self.line_start = True
        self.pre = 0
        self.pre_opened = False  # HTML drops one newline straight after <pre>
        self.heading = 0  # level of the open heading, 0 outside one
        self.heading_text: list[str] = []
        self.heading_marker = ""  # "## " written before the heading's first text, so empty headings vanish
        self.in_title = False
        self.title_done = False  # only the page's own <title>: an inline <svg> has <title>s of its own
        self.title: list[str] = []
        self.first_h1 = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body":  # a page that never closes <head> still shows its body
            self.skipping = [t for t in self.skipping if t != "head"]
        if tag == "title" and not self.title_done and "svg" not in self.skipping:
            self.in_title = True
        if tag in _SKIPPED:
            self.skipping.append(tag)
        if self.skipping:
            return
        if tag in _HEADINGS:
            self._break(2)
            self.heading = _HEADINGS[tag]
            self.heading_marker = "#" * self.heading + " "
            self.heading_text = []
        elif tag == "pre":
            self._break(2)
            self.pre += 1
            if self.pre == 1:
                self._emit("```\n")
                self.pre_opened = True
        elif tag in _PARAGRAPH:
            self._break(2)
        elif tag in _LINE:
            self._break(1)
        elif tag in _CELL:
            self.pending_space = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "title" and self.in_title:
            self.in_title = False
            self.title_done = True
        if tag in _SKIPPED:
            if tag in self.skipping:  # close it and anything left open inside it
                del self.skipping[len(self.skipping) - 1 - self.skipping[::-1].index(tag):]
            return
        if self.skipping:
            return
        if tag in _HEADINGS and self.heading:
            if self.heading == 1 and not self.first_h1:
                self.first_h1 = " ".join("".join(self.heading_text).split())
            self.heading = 0
            self.heading_marker = ""
            self._break(2)
        elif tag == "pre" and self.pre:
            self.pre -= 1
            if not self.pre:
                if not self.line_start:
                    self._emit("\n")
                self._emit("```")
                self._break(2)
        elif tag in _PARAGRAPH:
            self._break(2)
        elif tag in _LINE and tag != "br":  # </br> is no second line break
            self._break(1)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED:  # <script/> opens nothing that a later </script> must close
            return
        self.handle_starttag(tag, attrs)
        if tag not in _LINE:
            self.handle_endtag(tag)

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title.append(data)
        if self.skipping:
            return
        if self.pre:
            data = _newlines(data)
            if self.pre_opened:
                data = data.removeprefix("\n")
                self.pre_opened = False
            self._emit(data)
            return
        if self.heading:
            self.heading_text.append(data)
        words = data.split()
        if data[:1].isspace():
            self.pending_space = True
        if words:
            if self.pending_space and not self.line_start and not self.pending_break:
                self._emit(" ")
            self._emit(self.heading_marker + " ".join(words))
            self.heading_marker = ""
            self.pending_space = data[-1].isspace()

    def _break(self, newlines: int) -> None:
        if self.heading and not self.pre:  # a line break inside a heading would cut the heading line short
            self.pending_space = True
            return
        self.pending_break = max(self.pending_break, newlines)
        self.pending_space = False

    def _emit(self, text: str) -> None:
        if self.pending_break and self.parts:
            self.parts.append("\n" * (self.pending_break - (1 if self.line_start else 0)))
        self.pending_break = 0
        self.pending_space = False
        self.parts.append(text)
        self.line_start = text.endswith("\n")

    def text(self) -> str:
        return "".join(self.parts).strip("\n")


def html_to_text(html: str) -> tuple[str, str]:
    """(visible text, title): the <title>, else the first <h1>, else ""."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    title = " ".join("".join(parser.title).split()) or parser.first_h1
    return parser.text(), title


_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)


def _decode_html(data: bytes, path: Path) -> str:
    """UTF-8, or the charset the page declares in a <meta> tag when it is not UTF-8."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        declared = _CHARSET.search(data[:4096])
        if declared:
            try:
                return data.decode(declared.group(1).decode("ascii"))
            except (LookupError, UnicodeDecodeError):
                pass
    return _decode_utf8(data, path)  # raises, naming the first bad byte


# PDF -------------------------------------------------------------------------------------------------------------


def _read_pdf(data: bytes, path: Path) -> tuple[str, str]:
    """(text of the pages joined by blank lines, metadata title or "")."""
    try:
        import pypdf
    except ImportError:
        raise LmforgeError(f"reading {path} needs pypdf: pip install pypdf") from None
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        # many PDFs are encrypted with an empty user password (only editing is locked): those open as usual
        if reader.is_encrypted and not reader.decrypt(""):
            raise LmforgeError(f"{path} is an encrypted PDF (it needs a password)")
        pages = [page.extract_text() or "" for page in reader.pages]
        meta = reader.metadata
        title = meta.title if meta is not None else None
    except LmforgeError:
        raise
    except pypdf.errors.DependencyError as e:  # AES encryption needs the optional `cryptography` package
        raise LmforgeError(f"{path} is an encrypted PDF pypdf cannot open here: {e}") from None
    except Exception as e:  # a malformed PDF can fail anywhere inside pypdf, with any error type
        raise LmforgeError(f"{path} is not a readable PDF: {e or type(e).__name__}") from None
    title = title.strip() if isinstance(title, str) else ""
    return _newlines("\n\n".join(p.strip("\n") for p in pages)).strip("\n"), title


# JSONL -----------------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[Document]:
    absolute = str(path.resolve())
    docs = []
    for number, row, _ in jsonl_rows(path):
        if "text" not in row:
            raise LmforgeError(f"{path} line {number}: no \"text\" field")
        text = row["text"]
        if not isinstance(text, str):
            raise LmforgeError(f"{path} line {number}: \"text\" must be a string, got {json_type(text)}")
        title = row.get("title")
        title = title.strip() if isinstance(title, str) else ""
        docs.append(Document(f"{absolute}#{number}", _newlines(text), title or f"{path.name} line {number}", "jsonl"))
    return docs
