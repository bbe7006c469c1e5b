"""Per-document steps of corpus preparation, as pure functions: clean, quality filters, dedup signatures.

Cleaning: \\r\\n and \\r become \\n, lone surrogates (from JSON escapes) become U+FFFD, control characters
(Unicode Cc) other than \\n and \\t are dropped, then NFC, then surrounding whitespace is stripped.

Quality filters, simplified from Gopher's rules (Rae et al. 2021, appendix A), each a threshold:
- too_short: fewer than `min_chars` characters or `min_words` whitespace-separated words.
- repeated_lines: lines that repeat an earlier line of the document (blank lines aside) hold more than
  `max_dup_line_fraction` of the characters of its non-blank lines.
- repeated_ngrams: the most frequent word 3-gram (lowercased) occurs more than once and its occurrences
  cover more than `max_top_ngram_fraction` of the characters in words. Checked only from
  NGRAM_RULE_MIN_WORDS words on: in a short text one repeated phrase is already a large fraction.

Dedup signatures: a 16-byte hash of the cleaned text (exact duplicates; its other half also picks the
train/val split) and MinHash LSH band keys over lowercased word 5-gram shingles (near duplicates).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np

REASONS = ("too_short", "repeated_lines", "repeated_ngrams", "exact_duplicate", "near_duplicate")
NGRAM_WORDS = 3
NGRAM_RULE_MIN_WORDS = 30
SHINGLE_WORDS = 5

# every Cc code point but \t and \n (\r is turned into \n before this applies)
_CONTROL = {c: None for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)] if c not in (0x09, 0x0A)}
_SURROGATE = re.compile("[\ud800-\udfff]")
_WORD = re.compile(r"\w+")


def clean_text(text: str) -> str:
    """The text as it is deduplicated and tokenised (see the module docstring)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _SURROGATE.sub("\ufffd", text)
    # controls go before NFC: one between a letter and its combining accent would otherwise block composition
    text = text.translate(_CONTROL)
    return unicodedata.normalize("NFC", text).strip()


@dataclass(frozen=True)
class Filters:
    min_chars: int = 20
    min_words: int = 4
    max_dup_line_fraction: float = 0.3
    max_top_ngram_fraction: float = 0.2


def filter_reason(text: str, filters: Filters) -> str | None:
    """Why a cleaned document fails the quality filters (one of REASONS), or None when it passes."""
    words = text.split()
    if len(text) < filters.min_chars or len(words) < filters.min_words:
        return "too_short"
    if dup_line_fraction(text) > filters.max_dup_line_fraction:
        return "repeated_lines"
    if len(words) >= NGRAM_RULE_MIN_WORDS and top_ngram_fraction(words) > filters.max_top_ngram_fraction:
        return "repeated_ngrams"
    return None


def dup_line_fraction(text: str) -> float:
    """Share of the characters of the non-blank lines that sit in lines repeating an earlier one."""
    seen: set[str] = set()
    total = repeated = 0
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        total += len(line)
        if line in seen:
            repeated += len(line)
        seen.add(line)
    return repeated / total if total else 0.0


def top_ngram_fraction(words: list[str], n: int = NGRAM_WORDS) -> float:
    """Share of the word characters covered by the most frequent word n-gram, if it occurs more than once."""
    lowered = [w.lower() for w in words]
    counts = Counter(zip(*(lowered[i:] for i in range(n)), strict=False))
    if not counts:
        return 0.0
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(map(len, gram)) / sum(map(len, lowered))


def exact_key(text: str) -> bytes:
    """16-byte hash of the cleaned text: equal texts, equal keys, in every process and on every run."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def split_value(key: bytes) -> float:
    """A number in [0, 1) fixed by the document's text alone: the document goes to val when it is below the
    validation fraction, so the split depends on neither the order of the documents nor the workers."""
    return int.from_bytes(key[8:], "little") / 2**64


def shingles(text: str, n: int = SHINGLE_WORDS) -> list[bytes]:
    """Lowercased word n-grams (punctuation ignored); a text shorter than n words is one shingle."""
    words = _WORD.findall(text.lower())
    if len(words) <= n:
        return [" ".join(words).encode()] if words else []
    return [" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)]


def minhash_bands(texts: list[str], num_perm: int, bands: int, rows: int) -> np.ndarray:
    """(len(texts), bands) uint64 LSH band keys of each text's MinHash; all zero for a text without words,
    which then takes no part in near dedup."""
    from datasketch import MinHash

    out = np.zeros((len(texts), bands), dtype=np.uint64)
    sets = [shingles(t) for t in texts]
    with_words = [i for i, s in enumerate(sets) if s]
    # seed, scheme and shingle hash pinned: keys from different runs and processes must be comparable. crc32 is
    # ~15x cheaper than datasketch's default sha1 and enough here: the affine32 scheme pre-mixes its input
    hashes = MinHash.bulk([sets[i] for i in with_words], num_perm=num_perm, seed=1, scheme="affine32",
                          hashfunc=zlib.crc32)
    for i, minhash in zip(with_words, hashes, strict=True):
        values = np.ascontiguousarray(minhash.hashvalues[: bands * rows], dtype="<u4").reshape(bands, rows)
        out[i] = [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little") for row in values]
    return out
