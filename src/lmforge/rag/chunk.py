"""Documents -> chunks small enough to embed, cut where the text's own structure allows.

A document is cut into sections at its markdown headings (markdown and HTML, whose headings documents.py writes as
markdown), each section into paragraphs at blank lines, and consecutive paragraphs are packed into chunks of at most
`size` tokens. Only a paragraph too long for one chunk is cut inside: at sentence ends, else between words, else (one
enormous "word") between characters. Neighbouring chunks of a section share about `overlap` tokens, so a fact that
straddles a cut is still whole in one of them. Every chunk is an exact slice of the document's text.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from lmforge.errors import LmforgeError
from lmforge.rag.documents import Document, markdown_headings

__all__ = ["Chunk", "chunk_document"]

Span = tuple[int, int]
Piece = tuple[int, int, int]  # start, end, tokens

_STRUCTURED = {"md", "html"}  # kinds whose "# " lines are headings; in plain text they are just text
# a sentence ends at . ! or ? (closing quotes/brackets included) before whitespace, at CJK full stops, or at a newline
_SENTENCE_END = re.compile(r"[.!?][\"'”’»)\]]*(?=\s)|[。！？]|\n")
_WORD = re.compile(r"\S+")


@dataclass
class Chunk:
    source: str  # Document.path
    title: str  # the heading path the chunk is under ("Install > From source"), else the document's title
    text: str  # exactly document.text[start:end]
    start: int
    end: int


def chunk_document(
    doc: Document, count_tokens: Callable[[str], int], size: int = 200, overlap: int = 40
) -> list[Chunk]:
    """doc -> chunks of at most `size` tokens (as count_tokens counts them), neighbours in a section sharing about
    `overlap` tokens; no chunk crosses a heading, and a heading line opens its section's first chunk."""
    if size < 16:
        raise LmforgeError(f"chunk size must be at least 16 tokens, got {size}")
    if not 0 <= overlap < size // 2:
        raise LmforgeError(f"overlap must be from 0 to {size // 2 - 1} tokens for chunks of {size}, got {overlap}")
    cutter = _Cutter(doc.text, count_tokens, size, overlap)
    chunks = []
    for start, end, title, heading in _sections(doc):
        for s, e in cutter.pack(cutter.pieces(start, end, heading)):
            if doc.text[s:e].strip():
                chunks.append(Chunk(doc.path, title, doc.text[s:e], s, e))
    return chunks


def _sections(doc: Document) -> Iterator[tuple[int, int, str, bool]]:
    """(start, end, heading path, whether it opens with a heading line) for each section of doc."""
    text = doc.text
    headings = list(markdown_headings(text)) if doc.kind in _STRUCTURED else []
    first = headings[0][0] if headings else len(text)
    if first > 0:
        yield 0, first, doc.title, False
    path: list[tuple[int, str]] = []  # (level, heading) of the headings the section is under
    for i, (start, _, level, heading) in enumerate(headings):
        while path and path[-1][0] >= level:
            path.pop()
        path.append((level, heading))
        end = headings[i + 1][0] if i + 1 < len(headings) else len(text)
        yield start, end, " > ".join(h for _, h in path if h) or doc.title, True


def _trim(text: str, start: int, end: int) -> Span:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


class _Cutter:
    """Cuts one document's text; spans are (start, end) offsets into it, pieces (start, end, tokens)."""

    def __init__(self, text: str, count_tokens: Callable[[str], int], size: int, overlap: int) -> None:
        self.text = text
        self.count = count_tokens
        self.size = size
        self.overlap = overlap
        self.rate = 0.25  # tokens per character, relearned from every count: where the next search looks first

    def tokens(self, start: int, end: int) -> int:
        n = self.count(self.text[start:end])
        if end > start and n > 0:
            self.rate = n / (end - start)
        return n

    def longest(self, n: int, span: Callable[[int], Span], limit: int) -> tuple[int, int]:
        """(k, its tokens) for the largest k < n whose span(k) has at most `limit` tokens, (-1, 0) if none;
        span(k) must grow with k. Each probe goes where the tokens-per-character rate says the limit falls, so a
        search costs a few counts where bisection would cost log2(n); after 4 such probes it bisects."""

        def length(k: int) -> int:
            a, b = span(k)
            return b - a

        good, bad, best = -1, n, 0
        if n == 0:
            return good, best
        k = bisect.bisect_right(range(n), limit / self.rate, key=length) - 1
        for probe in itertools.count():
            k = min(max(k, good + 1), bad - 1)
            a, b = span(k)
            tokens = self.tokens(a, b)
            if tokens <= limit:
                good, best = k, tokens
            else:
                bad = k
            if bad - good <= 1:
                return good, best
            if probe < 4:
                k = bisect.bisect_right(range(n), (b - a) * limit / max(tokens, 1), good + 1, bad, key=length) - 1
            else:
                k = (good + bad) // 2
        raise AssertionError("unreachable")

    def pieces(self, start: int, end: int, heading: bool) -> list[Piece]:
        """The section's units of packing, in order, each at most size tokens: its heading line, then its
        paragraphs, a paragraph too long for a chunk cut into sentences (and those, if need be, into words)."""
        pieces: list[Piece] = []
        if heading:
            newline = self.text.find("\n", start, end)
            line = _trim(self.text, start, end if newline < 0 else newline)
            pieces += self._fitted(*line)
            start = line[1]
        for paragraph in self._paragraphs(start, end):
            pieces += self._fitted(*paragraph)
        return pieces

    def _paragraphs(self, start: int, end: int) -> Iterator[Span]:
        """Runs of non-blank lines, from the first line's start (its indentation kept) to the last's last
        non-space character."""
        text = self.text
        first = last = -1
        pos = start
        while pos < end:
            newline = text.find("\n", pos, end)
            line_end = end if newline < 0 else newline
            s, stop = _trim(text, pos, line_end)
            if s < stop:
                first = pos if first < 0 else first
                last = stop
            elif first >= 0:
                yield first, last
                first = -1
            pos = line_end + 1
        if first >= 0:
            yield first, last

    def _fitted(self, start: int, end: int) -> list[Piece]:
        if start >= end:
            return []
        tokens = self.tokens(start, end)
        if tokens <= self.size:
            return [(start, end, tokens)]
        pieces: list[Piece] = []
        whole = _trim(self.text, start, end)
        for s, e in self._sentences(start, end):
            # a paragraph that is one sentence was just counted: too long
            tokens = self.tokens(s, e) if (s, e) != whole else self.size + 1
            pieces += [(s, e, tokens)] if tokens <= self.size else self._words(s, e)
        return pieces

    def _sentences(self, start: int, end: int) -> Iterator[Span]:
        pos = start
        for m in _SENTENCE_END.finditer(self.text, start, end):
            s, e = _trim(self.text, pos, m.end())
            if s < e:
                yield s, e
            pos = m.end()
        s, e = _trim(self.text, pos, end)
        if s < e:
            yield s, e

    def _words(self, start: int, end: int) -> list[Piece]:
        """Greedy runs of whole words of at most size - overlap tokens, so that a chunk has room for one of them
        after the overlap it repeats (a sliding window over text with no sentence ends); a word longer than
        that is cut between characters."""
        limit = self.size - self.overlap
        words = [m.span() for m in _WORD.finditer(self.text, start, end)]
        pieces: list[Piece] = []
        i = 0
        while i < len(words):
            s = words[i][0]
            k, tokens = self.longest(len(words) - i, lambda k, s=s, i=i: (s, words[i + k][1]), limit)
            if k >= 0:
                pieces.append((s, words[i + k][1], tokens))
                i += k + 1
                continue
            word_end = words[i][1]
            k, tokens = self.longest(word_end - s, lambda k, s=s: (s, s + 1 + k), limit)
            cut = s + 1 + max(k, 0)
            pieces.append((s, cut, tokens if k >= 0 else self.tokens(s, cut)))
            words[i] = (cut, word_end)
        return pieces

    def pack(self, pieces: list[Piece]) -> list[Span]:
        """Consecutive pieces -> chunks of at most size tokens, each after the first starting early enough to
        repeat about `overlap` tokens of the one before."""
        # token counts add up over text joined at whitespace, exactly for BERT-style tokenizers and nearly for
        # byte-level BPE: so the sums of the pieces' counts say how far a chunk reaches, and one count checks it
        sums = list(itertools.accumulate((p[2] for p in pieces), initial=0))
        chunks: list[Span] = []
        i = 0
        start, carry = (pieces[0][0], 0) if pieces else (0, 0)  # carry: tokens repeated from the chunk before
        while i < len(pieces):
            last = max(bisect.bisect_right(sums, sums[i] + self.size - carry, i + 1) - 2, i)
            tokens = self.tokens(start, pieces[last][1])
            if tokens > self.size:
                k, tokens = self.longest(last - i, lambda k, start=start, i=i: (start, pieces[i + k][1]), self.size)
                if k < 0 and start != pieces[i][0]:  # the repeated text leaves no room for piece i after all
                    start, carry = pieces[i][0], 0
                    continue
                if k < 0:  # piece i alone was counted within size: only a counter that is not
                    k, tokens = 0, pieces[i][2]  # monotone in the text's length gets here
                last = i + k
            chunks.append((start, pieces[last][1]))
            first, i = i, last + 1
            if i < len(pieces):
                start, carry = self._overlap_start(chunks[-1], tokens, pieces[first:i], pieces[i])
        return chunks

    def _overlap_start(self, previous: Span, tokens: int, inside: list[Piece], following: Piece) -> tuple[int, int]:
        """(start, tokens repeated) for the chunk that goes on with the `following` piece: the earliest sentence
        (failing that, word) start in the previous chunk that leaves at most min(overlap, half its tokens) of it
        to repeat, and room for the following piece; the following piece's own start when none does."""
        text = self.text
        first, end = previous
        limit = min(self.overlap, tokens // 2)
        if limit <= 0:
            return following[0], 0
        sentences = {p[0] for p in inside if p[0] > first}
        for m in _SENTENCE_END.finditer(text, first, end):
            s, _ = _trim(text, m.end(), end)
            if first < s < end:
                sentences.add(s)
        words = [m.start() for m in _WORD.finditer(text, first, end) if m.start() > first]
        for starts in (sorted(sentences), words):
            # k counts back from the last start, so spans grow with k: the largest k that fits is wanted
            k, repeated = self.longest(len(starts), lambda k, starts=starts: (starts[-1 - k], end), limit)
            if k >= 0 and repeated + following[2] > self.size:  # by the sums; pack() checks what they allow
                room, _ = self.longest(k + 1, lambda k, starts=starts: (starts[-1 - k], following[1]), self.size)
                if room >= 0:
                    k, repeated = room, self.tokens(starts[-1 - room], end)
                else:
                    k = -1
            if k >= 0:
                return starts[-1 - k], repeated
        return following[0], 0
