"""Word tokenisation and sentence splitting.

Words come from simplemma's tokenizer regex: it is well kept, knows many languages, keeps contractions
("Don't", "l'homme"), URLs and numbers whole and emits punctuation as tokens. On top of it we make sure
no character is lost: simplemma silently drops emoji and other symbols, which we keep as tokens, and
we split Han ideographs one per token because no Chinese/Japanese word segmenter is bundled and
unsegmented text would otherwise come out as one sentence-long "word".
"""

import re
import unicodedata

from simplemma import split_sentences as _simplemma_split_sentences
from simplemma.tokenizer import TOKREGEX

from lmforge.text.languages import check_language

Span = tuple[int, int]

_CHUNK = re.compile(r"\S+")
# URLs and e-mail addresses are matched before simplemma sees them: its URL rule swallows trailing
# punctuation ("https://x.org," keeps the comma) and it has no e-mail rule at all.
_URL_OR_EMAIL = re.compile(
    r"(?:https?://|www\.)\S+?(?=[.,;:!?)\]}'\"»”’]*$)"
    r"|[\w.+-]+@[\w-]+(?:\.[\w-]+)+"
)
# What simplemma's regex leaves between its tokens: a flag (two regional indicators), or one character
# with the emoji modifiers, variation selectors, keycap mark, tag characters and ZWJ-joined partners
# that belong to it, so "👩‍💻" or "👍🏽" stay one token.
_SYMBOL = re.compile(
    r"[\U0001F1E6-\U0001F1FF]{2}"
    r"|.(?:[\uFE0E\uFE0F\u20E3\U0001F3FB-\U0001F3FF\U000E0020-\U000E007F]|\u200D.)*",
    re.DOTALL,
)
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_HAN_OR_REST = re.compile(f"[{_HAN}]|[^{_HAN}]+")
_HAS_HAN = re.compile(f"[{_HAN}]")
# CJK full stops are not followed by a space, so simplemma's splitter never sees a boundary there.
_CJK_SENTENCE_END = re.compile(r"(?<=[。！？])(?![。！？」』）〕”’])")


def tokenize(text: str) -> list[str]:
    """Split text into words, numbers, URLs, punctuation and symbols; whitespace is the only thing dropped."""
    return [text[start:end] for start, end in token_spans(text)]


def token_spans(text: str) -> list[Span]:
    """(start, end) character offsets of each token of `tokenize(text)`, in order and non-overlapping."""
    spans: list[Span] = []
    for chunk in _CHUNK.finditer(text):
        spans.extend(_chunk_spans(text, chunk.start(), chunk.end()))
    return _split_han(text, _glue_marks(text, spans))


def split_sentences(text: str, lang: str = "en") -> list[str]:
    """Split text into stripped sentences, minding the language's abbreviations where simplemma knows them."""
    code = check_language(lang)
    return [part for sentence in _simplemma_split_sentences(text, code) for part in _split_cjk(sentence)]


def _chunk_spans(text: str, start: int, end: int) -> list[Span]:
    """Tokens of one whitespace-free chunk: URLs and e-mails whole, the rest through simplemma."""
    spans: list[Span] = []
    pos = start
    for match in _URL_OR_EMAIL.finditer(text, start, end):
        spans.extend(_word_spans(text, pos, match.start()))
        spans.append(match.span())
        pos = match.end()
    spans.extend(_word_spans(text, pos, end))
    return spans


def _word_spans(text: str, start: int, end: int) -> list[Span]:
    """simplemma's matches plus the symbols it skipped between them."""
    spans: list[Span] = []
    pos = start
    for match in TOKREGEX.finditer(text, start, end):
        spans.extend(_symbol_spans(text, pos, match.start()))
        spans.append(match.span())
        pos = match.end()
    spans.extend(_symbol_spans(text, pos, end))
    return spans


def _symbol_spans(text: str, start: int, end: int) -> list[Span]:
    return [m.span() for m in _SYMBOL.finditer(text, start, end)] if start < end else []


def _glue_marks(text: str, spans: list[Span]) -> list[Span]:
    """Rejoin what was cut at a combining mark simplemma does not list (Thai, Bengali, keycaps, ...)."""
    glued: list[Span] = []
    for start, end in spans:
        if glued and glued[-1][1] == start and _joins(text[start - 1], text[start]):
            glued[-1] = (glued[-1][0], end)
        else:
            glued.append((start, end))
    return glued


def _joins(before: str, after: str) -> bool:
    """Is the boundary between two adjacent characters inside one token?"""
    # A combining mark always belongs to the character before it; a letter after a mark is the same
    # word going on (Indic and Thai scripts put marks mid-word).
    return _is_mark(after) or (_is_mark(before) and after.isalnum())


def _is_mark(char: str) -> bool:
    return unicodedata.category(char).startswith("M")


def _split_han(text: str, spans: list[Span]) -> list[Span]:
    out: list[Span] = []
    for start, end in spans:
        token = text[start:end]
        if _HAS_HAN.search(token) is None:
            out.append((start, end))
        else:
            out.extend((start + m.start(), start + m.end()) for m in _HAN_OR_REST.finditer(token))
    return out


def _split_cjk(sentence: str) -> list[str]:
    return [part.strip() for part in _CJK_SENTENCE_END.split(sentence) if part.strip()]
