"""word2vec training (gensim) behind a small wrapper that speaks LmforgeError and our tokenizer."""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.text.vectors import terms


@dataclass(frozen=True)
class WordVectors:
    """Trained word vectors. Lookups are lower-cased like the training text, so "Car" finds "car"."""

    keyed: Any  # gensim.models.KeyedVectors; typed loosely so gensim is only imported to train

    @property
    def vocabulary(self) -> list[str]:
        return list(self.keyed.index_to_key)

    @property
    def vector_size(self) -> int:
        return int(self.keyed.vector_size)

    def __contains__(self, word: object) -> bool:
        return isinstance(word, str) and word.lower() in self.keyed.key_to_index

    def vector(self, word: str) -> np.ndarray:
        return np.array(self.keyed[self._known(word)])

    def similarity(self, first: str, second: str) -> float:
        return float(self.keyed.similarity(self._known(first), self._known(second)))

    def most_similar(self, word: str, topn: int = 10) -> list[tuple[str, float]]:
        """The `topn` nearest words by cosine similarity, best first, the word itself excluded."""
        _check_topn(topn)
        return [(w, float(s)) for w, s in self.keyed.most_similar(self._known(word), topn=topn)]

    def analogy(self, a: str, b: str, c: str) -> str:
        """a is to b as c is to ? -- the word nearest to b - a + c, other than a, b and c."""
        found = self.keyed.most_similar(
            positive=[self._known(b), self._known(c)], negative=[self._known(a)], topn=1
        )
        if not found:
            raise LmforgeError("the vocabulary has no word besides the three given")
        return str(found[0][0])

    def document_vector(self, text: str | Sequence[str]) -> np.ndarray:
        """Mean vector of the known words of a text or token list; zeros when none is known."""
        tokens = terms(text) if isinstance(text, str) else [token.lower() for token in text]
        known = [token for token in tokens if token in self.keyed.key_to_index]
        if not known:
            return np.zeros(self.vector_size, dtype=np.float32)
        return np.asarray(self.keyed[known].mean(axis=0), dtype=np.float32)

    def _known(self, word: str) -> str:
        key = word.lower()
        if key not in self.keyed.key_to_index:
            raise LmforgeError(f"word {word!r} is not in the word2vec vocabulary ({len(self.keyed)} words)")
        return key


def train_word2vec(
    sentences: Iterable[str | Sequence[str]],
    *,
    vector_size: int = 100,
    window: int = 5,
    min_count: int = 1,
    epochs: int = 5,
    seed: int = 0,
    skip_gram: bool = False,
    workers: int = 1,
) -> WordVectors:
    """Train word2vec on texts (tokenised and lower-cased like `terms`) or on ready token lists.

    min_count defaults to 1, not gensim's 5, because corpora here are usually small enough that 5 would
    drop most words. With workers=1 and a fixed seed training is reproducible.
    """
    corpus = _corpus(sentences)
    if not any(corpus):
        raise LmforgeError("no words to train word2vec on")
    _check_positive(
        vector_size=vector_size, window=window, min_count=min_count, epochs=epochs, workers=workers
    )
    from gensim.models import Word2Vec

    model = Word2Vec(
        vector_size=vector_size,
        window=window,
        min_count=min_count,
        sg=int(skip_gram),
        seed=seed,
        workers=workers,
    )
    model.build_vocab(corpus)
    if len(model.wv) == 0:
        raise LmforgeError(f"no word occurs at least min_count={min_count} times")
    model.train(corpus, total_examples=len(corpus), epochs=epochs)
    return WordVectors(model.wv)


def _corpus(sentences: Iterable[str | Sequence[str]]) -> list[list[str]]:
    if isinstance(sentences, str):
        raise LmforgeError("expected a list of sentences, got a single string")
    return [terms(s) if isinstance(s, str) else [token.lower() for token in s] for s in sentences]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise LmforgeError(f"{name} must be at least 1, got {value}")


def _check_topn(topn: int) -> None:
    if topn < 1:
        raise LmforgeError(f"topn must be at least 1, got {topn}")
