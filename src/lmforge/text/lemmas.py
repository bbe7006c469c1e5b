"""Lemmatisation (simplemma) and stop-word removal (stop-words); both ship their data, nothing downloads."""

from collections.abc import Sequence
from functools import cache

import simplemma
from stop_words import get_stop_words

from lmforge.text.languages import check_language
from lmforge.text.tokenize import tokenize


def lemmatize(text: str | Sequence[str], lang: str = "en") -> list[str]:
    """Lemma of every token (a text is tokenised first); punctuation and unknown words come back as-is."""
    code = check_language(lang)
    return [simplemma.lemmatize(token, code) for token in _tokens(text)]


def lemmatize_word(word: str, lang: str = "en") -> str:
    """Lemma of a single word, e.g. "talked" -> "talk"."""
    return simplemma.lemmatize(word, check_language(lang))


@cache
def stop_words(lang: str = "en") -> frozenset[str]:
    """The language's stop words, lower-cased (the lists mix cases, matching is case-insensitive)."""
    return frozenset(word.lower() for word in get_stop_words(check_language(lang)))


def is_stop_word(token: str, lang: str = "en") -> bool:
    return token.lower() in stop_words(lang)


def remove_stopwords(text: str | Sequence[str], lang: str = "en") -> list[str]:
    """The tokens that are not stop words, in order; punctuation is kept (it is not a stop word)."""
    words = stop_words(lang)
    return [token for token in _tokens(text) if token.lower() not in words]


def _tokens(text: str | Sequence[str]) -> list[str]:
    # A str is itself a sequence of str, so it must be tested first or it would be read char by char.
    return tokenize(text) if isinstance(text, str) else list(text)
