"""Bag of words and TF-IDF document-term matrices, and cosine similarity between their rows.

scikit-learn is imported inside the functions: it takes over a second to import and the CLI imports
this package just to build its argument parser.
"""

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse

from lmforge.errors import LmforgeError
from lmforge.text.languages import check_language
from lmforge.text.lemmas import lemmatize as _lemmatize
from lmforge.text.lemmas import stop_words
from lmforge.text.tokenize import tokenize

if TYPE_CHECKING:
    from rich.table import Table


@dataclass(frozen=True)
class DocTermMatrix:
    """One row per document, one column per term; `vocabulary[j]` is the term of column j."""

    matrix: sparse.csr_matrix
    vocabulary: list[str]

    def column(self, term: str) -> int:
        try:
            return self.vocabulary.index(term)
        except ValueError:
            raise LmforgeError(f"term {term!r} is not in the vocabulary") from None

    def to_dense(self) -> np.ndarray:
        return self.matrix.toarray()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the vocabulary and the dense rows."""
        return {"vocabulary": list(self.vocabulary), "matrix": self.to_dense().tolist()}

    def to_table(self, title: str | None = None, digits: int = 3) -> "Table":
        """A rich table, documents down and terms across."""
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=title)
        table.add_column("doc", justify="right")
        for term in self.vocabulary:
            table.add_column(escape(term), justify="right")
        for i, row in enumerate(self.to_dense()):
            table.add_row(str(i), *(_format_number(value, digits) for value in row))
        return table


def terms(text: str, lang: str = "en", *, drop_stopwords: bool = False, lemmatize: bool = False) -> list[str]:
    """The analyzer behind every vector here: our tokens, lower-cased, without bare punctuation."""
    tokens = [token for token in tokenize(text) if _is_content(token)]
    if lemmatize:
        tokens = _lemmatize(tokens, lang)
    tokens = [token.lower() for token in tokens]
    if drop_stopwords:
        words = stop_words(lang)
        tokens = [token for token in tokens if token not in words]
    return tokens


def bag_of_words(
    texts: Sequence[str],
    lang: str = "en",
    *,
    drop_stopwords: bool = False,
    lemmatize: bool = False,
    binary: bool = False,
) -> DocTermMatrix:
    """Term counts per document (0/1 presence with `binary`)."""
    from sklearn.feature_extraction.text import CountVectorizer

    analyzer = _analyzer(lang, drop_stopwords, lemmatize)
    return _fit(CountVectorizer(analyzer=analyzer, binary=binary), texts)


def tfidf(
    texts: Sequence[str],
    lang: str = "en",
    *,
    drop_stopwords: bool = False,
    lemmatize: bool = False,
    sublinear_tf: bool = False,
) -> DocTermMatrix:
    """TF-IDF weights per document (sklearn's smoothed idf); each non-empty row has unit L2 norm."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    analyzer = _analyzer(lang, drop_stopwords, lemmatize)
    return _fit(TfidfVectorizer(analyzer=analyzer, sublinear_tf=sublinear_tf), texts)


def cosine_similarity(a: Any, b: Any) -> float:
    """Cosine of the angle between two vectors (dense or 1-row sparse); 0.0 when either is all zeros."""
    left, right = _as_row(a), _as_row(b)
    if left.shape[1] != right.shape[1]:
        raise LmforgeError(f"vectors differ in length: {left.shape[1]} vs {right.shape[1]}")
    if left.shape[1] == 0:
        return 0.0
    from sklearn.metrics.pairwise import cosine_similarity as sk_cosine

    return float(sk_cosine(left, right)[0, 0])


def pairwise_cosine(matrix: Any) -> np.ndarray:
    """(n, n) cosine similarities between the rows of a dense or sparse matrix; all-zero rows give 0."""
    if matrix.shape[0] == 0:
        return np.zeros((0, 0))
    if matrix.shape[1] == 0:
        # No features at all (e.g. only punctuation): nothing is similar, and sklearn rejects 0 columns.
        return np.zeros((matrix.shape[0], matrix.shape[0]))
    from sklearn.metrics.pairwise import cosine_similarity as sk_cosine

    return sk_cosine(matrix)


def _analyzer(lang: str, drop_stopwords: bool, lemmatize: bool) -> Any:
    return partial(terms, lang=check_language(lang), drop_stopwords=drop_stopwords, lemmatize=lemmatize)


def _fit(vectorizer: Any, texts: Sequence[str]) -> DocTermMatrix:
    documents = check_documents(texts)
    try:
        matrix = vectorizer.fit_transform(documents)
    except ValueError as err:
        # sklearn refuses an empty vocabulary; for us it is just a matrix with no columns.
        if "empty vocabulary" not in str(err):
            raise
        return DocTermMatrix(sparse.csr_matrix((len(documents), 0)), [])
    return DocTermMatrix(sparse.csr_matrix(matrix), vectorizer.get_feature_names_out().tolist())


def check_documents(texts: Sequence[str]) -> list[str]:
    # A lone string would be read as one document per character, which is never what was meant.
    if isinstance(texts, str):
        raise LmforgeError("expected a list of documents, got a single string")
    documents = list(texts)
    if not documents:
        raise LmforgeError("no documents given")
    if not all(isinstance(doc, str) for doc in documents):
        raise LmforgeError("every document must be a string")
    return documents


def _is_content(token: str) -> bool:
    """Letters, digits or symbols such as emoji carry meaning; bare punctuation does not."""
    return any(unicodedata.category(char)[0] in "LN" or unicodedata.category(char) == "So" for char in token)


def _as_row(vector: Any) -> Any:
    if sparse.issparse(vector):
        return sparse.csr_matrix(vector).reshape(1, -1)
    return np.asarray(vector, dtype=np.float64).reshape(1, -1)


def _format_number(value: float, digits: int) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.{digits}f}"
