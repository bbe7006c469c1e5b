"""Pairwise document similarity under the four classic representations, for side-by-side comparison."""

from collections.abc import Sequence

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.text.vectors import bag_of_words, check_documents, pairwise_cosine, terms, tfidf
from lmforge.text.word2vec import WordVectors, train_word2vec

METHODS: tuple[str, ...] = ("bow", "tfidf", "word2vec", "embedding")
DEFAULT_EMBEDDING_MODEL = "minilm-l6"


def document_similarity(
    texts: Sequence[str],
    method: str = "tfidf",
    *,
    lang: str = "en",
    word_vectors: WordVectors | None = None,
    model: str = DEFAULT_EMBEDDING_MODEL,
) -> np.ndarray:
    """(n, n) cosine similarities between documents; a document with no usable words scores 0 with all.

    word2vec averages word vectors: pass `word_vectors` trained on a real corpus, otherwise they are
    trained on `texts` themselves, which for a handful of sentences mostly measures shared words.
    embedding uses transformer sentence embeddings from lmforge.embeddings (`model` names the model).
    """
    documents = check_documents(texts)
    if method == "bow":
        return pairwise_cosine(bag_of_words(documents, lang).matrix)
    if method == "tfidf":
        return pairwise_cosine(tfidf(documents, lang).matrix)
    if method == "word2vec":
        return pairwise_cosine(_word2vec_vectors(documents, word_vectors))
    if method == "embedding":
        return pairwise_cosine(_embedding_vectors(documents, model))
    raise LmforgeError(f"unknown similarity method {method!r}; choose from: {', '.join(METHODS)}")


def _word2vec_vectors(documents: list[str], word_vectors: WordVectors | None) -> np.ndarray:
    if word_vectors is None:
        if not any(terms(doc) for doc in documents):
            return np.zeros((len(documents), 0), dtype=np.float32)  # nothing to train on: all scores 0
        # Small, seeded and single-threaded so the same documents always give the same numbers.
        word_vectors = train_word2vec(documents, vector_size=50, epochs=50, seed=0, workers=1)
    return np.stack([word_vectors.document_vector(doc) for doc in documents])


def _embedding_vectors(documents: list[str], model: str) -> np.ndarray:
    # Imported here: the embeddings module pulls in torch and a transformer, which only this method needs.
    try:
        from lmforge.embeddings import embed
    except ImportError as err:
        raise LmforgeError(
            f"the embedding method needs lmforge.embeddings, which failed to import: {err}"
        ) from err
    return np.asarray(embed(documents, model=model), dtype=np.float32)
