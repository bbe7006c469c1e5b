"""Pairwise document similarity under the four classic representations, for side-by-side comparison."""

from collections.abc import Callable, Sequence

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.text.vectors import bag_of_words, check_documents, pairwise_cosine, terms, tfidf
from lmforge.text.word2vec import WordVectors, train_word2vec

METHODS: tuple[str, ...] = ("bow", "tfidf", "word2vec", "embedding")
EmbedFn = Callable[[list[str]], np.ndarray]  # texts -> (n, dim) sentence embeddings


def document_similarity(
    texts: Sequence[str],
    method: str = "tfidf",
    *,
    lang: str = "en",
    word_vectors: WordVectors | None = None,
    embed_fn: EmbedFn | None = None,
) -> np.ndarray:
    """(n, n) cosine similarities between documents; a document with no usable words scores 0 with all.

    word2vec averages word vectors: pass `word_vectors` trained on a real corpus, otherwise they are
    trained on `texts` themselves, which for a handful of sentences mostly measures shared words.
    embedding uses the sentence embeddings `embed_fn` returns (e.g. `lmforge.embed`, or a partial of it
    naming the model): this package never imports the model stack itself.
    """
    documents = check_documents(texts)
    if method == "bow":
        return pairwise_cosine(bag_of_words(documents, lang).matrix)
    if method == "tfidf":
        return pairwise_cosine(tfidf(documents, lang).matrix)
    if method == "word2vec":
        return pairwise_cosine(_word2vec_vectors(documents, word_vectors))
    if method == "embedding":
        return pairwise_cosine(_embedding_vectors(documents, embed_fn))
    raise LmforgeError(f"unknown similarity method {method!r}; choose from: {', '.join(METHODS)}")


def _word2vec_vectors(documents: list[str], word_vectors: WordVectors | None) -> np.ndarray:
    if word_vectors is None:
        if not any(terms(doc) for doc in documents):
            return np.zeros((len(documents), 0), dtype=np.float32)  # nothing to train on: all scores 0
        # Small, seeded and single-threaded so the same documents always give the same numbers.
        word_vectors = train_word2vec(documents, vector_size=50, epochs=50, seed=0, workers=1)
    return np.stack([word_vectors.document_vector(doc) for doc in documents])


def _embedding_vectors(documents: list[str], embed_fn: EmbedFn | None) -> np.ndarray:
    if embed_fn is None:
        raise LmforgeError("the embedding method needs embed_fn, a function texts -> vectors (e.g. lmforge.embed)")
    vectors = np.asarray(embed_fn(documents), dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(documents):
        raise LmforgeError(f"embed_fn returned shape {vectors.shape} for {len(documents)} documents")
    return vectors
