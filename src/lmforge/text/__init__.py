"""Classical text building blocks: tokens, sentences, lemmas, stop words, BoW/TF-IDF, word2vec, similarity.

All language data ships with the installed libraries (simplemma, stop-words); nothing is downloaded.
"""

from lmforge.text.languages import SUPPORTED_LANGUAGES, check_language
from lmforge.text.lemmas import is_stop_word, lemmatize, lemmatize_word, remove_stopwords, stop_words
from lmforge.text.similarity import METHODS, document_similarity
from lmforge.text.tokenize import split_sentences, token_spans, tokenize
from lmforge.text.vectors import DocTermMatrix, bag_of_words, cosine_similarity, pairwise_cosine, terms, tfidf
from lmforge.text.word2vec import WordVectors, train_word2vec

__all__ = [
    "METHODS",
    "SUPPORTED_LANGUAGES",
    "DocTermMatrix",
    "WordVectors",
    "bag_of_words",
    "check_language",
    "cosine_similarity",
    "document_similarity",
    "is_stop_word",
    "lemmatize",
    "lemmatize_word",
    "pairwise_cosine",
    "remove_stopwords",
    "split_sentences",
    "stop_words",
    "terms",
    "tfidf",
    "token_spans",
    "tokenize",
    "train_word2vec",
]
