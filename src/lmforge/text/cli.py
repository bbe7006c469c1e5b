"""`lmforge text ...`: thin command-line shells over lmforge.text.

Texts come from the positional arguments or, when there are none, from stdin: tokenize, lemmatize and
stopwords read it as one text (arguments are joined with spaces, so quoting is optional); bow, tfidf and
similar take one document per argument or per non-blank stdin line.
"""

import argparse
import json
from collections.abc import Callable
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.text.languages import check_language
from lmforge.text.lemmas import is_stop_word, lemmatize, remove_stopwords
from lmforge.text.similarity import METHODS, EmbedFn, document_similarity
from lmforge.text.tokenize import tokenize
from lmforge.text.vectors import DocTermMatrix, bag_of_words, tfidf
from lmforge.textio import check_arguments, read_stdin

Handler = Callable[[argparse.Namespace], int]
_PREVIEW_CHARS = 40
DEFAULT_EMBEDDING_MODEL = "minilm-l6"


def add_text_commands(subparsers: Any) -> None:
    """Add the `text` command and its subcommands to an argparse subparsers object."""
    text = subparsers.add_parser(
        "text",
        help="classical NLP: tokens, lemmas, stop words, bag of words, TF-IDF, document similarity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = text.add_subparsers(dest="text_command", required=True, metavar="SUBCOMMAND")
    _add(commands, "tokenize", _tokenize, "split one text into word, punctuation and symbol tokens", True)
    _add(commands, "lemmatize", _lemmatize, "lemma of every token of one text", True)
    _add(commands, "stopwords", _stopwords, "the tokens of one text that are not stop words", True)
    for parser in (
        _add(commands, "bow", _bow, "bag-of-words counts, one row per document", False),
        _add(commands, "tfidf", _tfidf, "TF-IDF weights, one row per document", False),
    ):
        parser.add_argument(
            "--drop-stopwords", action="store_true", help="leave stop words out of the vocabulary"
        )
        parser.add_argument("--lemmatize", action="store_true", help="count lemmas instead of word forms")
    similar = _add(commands, "similar", _similar, "pairwise cosine similarity between documents", False)
    similar.add_argument(
        "--method", choices=[*METHODS, "all"], default="all", help="representation (default: all)"
    )
    similar.add_argument(
        "--model",
        default=DEFAULT_EMBEDDING_MODEL,
        help=f"embedding model (default: {DEFAULT_EMBEDDING_MODEL})",
    )


def _add(
    commands: Any, name: str, handler: Handler, help_text: str, one_text: bool
) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, description=help_text)
    if one_text:
        parser.add_argument("texts", nargs="*", metavar="WORD", help="the text (default: all of stdin)")
    else:
        parser.add_argument("texts", nargs="*", metavar="DOC", help="documents (default: one per stdin line)")
    parser.add_argument("--lang", default="en", help="ISO 639-1 language code (default: en)")
    parser.add_argument("--format", choices=["table", "json"], default="table", help="output format")
    parser.set_defaults(func=handler)
    return parser


def _tokenize(args: argparse.Namespace) -> int:
    check_language(args.lang)
    tokens = tokenize(_one_text(args))
    _emit(args, tokens, lambda: _token_table(["token"], [[t] for t in tokens]))
    return 0


def _lemmatize(args: argparse.Namespace) -> int:
    tokens = tokenize(_one_text(args))
    lemmas = lemmatize(tokens, args.lang)
    _emit(
        args,
        lemmas,
        lambda: _token_table(["token", "lemma"], [list(pair) for pair in zip(tokens, lemmas, strict=True)]),
    )
    return 0


def _stopwords(args: argparse.Namespace) -> int:
    tokens = tokenize(_one_text(args))
    kept = remove_stopwords(tokens, args.lang)
    rows = [[token, "stop word" if is_stop_word(token, args.lang) else ""] for token in tokens]
    _emit(args, kept, lambda: _token_table(["token", ""], rows))
    return 0


def _bow(args: argparse.Namespace) -> int:
    documents = _documents(args)
    matrix = bag_of_words(documents, args.lang, drop_stopwords=args.drop_stopwords, lemmatize=args.lemmatize)
    _emit_matrix(args, documents, matrix, "bag of words")
    return 0


def _tfidf(args: argparse.Namespace) -> int:
    documents = _documents(args)
    matrix = tfidf(documents, args.lang, drop_stopwords=args.drop_stopwords, lemmatize=args.lemmatize)
    _emit_matrix(args, documents, matrix, "TF-IDF")
    return 0


def _similar(args: argparse.Namespace) -> int:
    documents = _documents(args)
    if len(documents) < 2:
        raise LmforgeError("similar needs at least two documents")
    methods = list(METHODS) if args.method == "all" else [args.method]
    embed_fn = _embedder(args.model) if "embedding" in methods else None
    scores = {m: document_similarity(documents, m, lang=args.lang, embed_fn=embed_fn) for m in methods}
    pairs = [
        {"a": i, "b": j, **{m: round(float(scores[m][i, j]), 4) for m in methods}}
        for i in range(len(documents))
        for j in range(i + 1, len(documents))
    ]
    _emit(
        args, {"documents": documents, "pairs": pairs}, lambda: _similarity_table(documents, pairs, methods)
    )
    return 0


def _embedder(model: str) -> EmbedFn:
    """The shell supplies the model stack: lmforge.text itself never imports torch."""

    def embed_fn(texts: list[str]) -> Any:
        from lmforge.embeddings import embed

        return embed(texts, model=model)

    return embed_fn


def _one_text(args: argparse.Namespace) -> str:
    return " ".join(check_arguments(args.texts)) if args.texts else read_stdin()


def _documents(args: argparse.Namespace) -> list[str]:
    if args.texts:
        return check_arguments(list(args.texts))
    documents = [line for line in read_stdin().splitlines() if line.strip()]
    if not documents:
        raise LmforgeError("no documents: pass them as arguments or one per line on stdin")
    return documents


def _emit(args: argparse.Namespace, data: Any, table: Callable[[], Any]) -> None:
    # The table is built only when asked for, so JSON output never imports rich.
    if args.format == "json":
        print(json.dumps(data, ensure_ascii=False))
        return
    from rich.console import Console

    Console().print(table())


def _emit_matrix(args: argparse.Namespace, documents: list[str], matrix: DocTermMatrix, title: str) -> None:
    _emit(args, {"documents": documents, **matrix.to_dict()}, lambda: matrix.to_table(title=title))


def _token_table(columns: list[str], rows: list[list[str]]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    table = Table()
    table.add_column("#", justify="right")
    for column in columns:
        table.add_column(column)
    for i, row in enumerate(rows):
        table.add_row(str(i), *(escape(cell) for cell in row))
    return table


def _similarity_table(documents: list[str], pairs: list[dict[str, Any]], methods: list[str]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="cosine similarity")
    table.add_column("doc a")
    table.add_column("doc b")
    for method in methods:
        table.add_column(method, justify="right")
    for pair in pairs:
        table.add_row(
            escape(_preview(documents[pair["a"]])),
            escape(_preview(documents[pair["b"]])),
            *(f"{pair[m]:.3f}" for m in methods),
        )
    return table


def _preview(text: str) -> str:
    return text if len(text) <= _PREVIEW_CHARS else text[: _PREVIEW_CHARS - 1] + "…"
