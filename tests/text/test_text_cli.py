"""`lmforge text ...`, driven through a parser built here the way the main CLI builds it."""

import argparse
import io
import json
from collections.abc import Callable
from typing import Any

import pytest

from lmforge.errors import LmforgeError
from lmforge.text.cli import add_text_commands

SEED = "Working with natural language processing techniques is tricky."
SEED_TOKENS = ["Working", "with", "natural", "language", "processing", "techniques", "is", "tricky", "."]

Run = Callable[..., str]
RunJson = Callable[..., Any]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """run("text", "tokenize", ..., stdin="...") -> what the command printed; it must exit 0."""

    def run_command(*argv: str, stdin: str = "") -> str:
        parser = argparse.ArgumentParser(prog="lmforge")
        add_text_commands(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(argv)
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        assert args.func(args) == 0
        return capsys.readouterr().out

    return run_command


@pytest.fixture
def run_json(run: Run) -> RunJson:
    return lambda *argv, stdin="": json.loads(run(*argv, "--format", "json", stdin=stdin))


def test_tokenize_json(run_json: RunJson) -> None:
    assert run_json("text", "tokenize", SEED) == SEED_TOKENS
    assert run_json("text", "tokenize", *SEED.split()) == SEED_TOKENS  # unquoted words make one text


def test_lemmatize_and_stopwords_json(run_json: RunJson) -> None:
    assert run_json("text", "lemmatize", "talking talked talk") == ["talk", "talk", "talk"]
    kept = ["natural", "language", "processing", "techniques", "tricky", "."]
    assert run_json("text", "stopwords", SEED) == kept
    german = run_json("text", "stopwords", "--lang", "de", "Die Kinder spielen im Garten.")
    assert german == ["Kinder", "spielen", "Garten", "."]


def test_whole_stdin_is_one_text(run_json: RunJson) -> None:
    tokens = run_json("text", "tokenize", stdin="Hello there.\nHow are you?\n")
    assert tokens == ["Hello", "there", ".", "How", "are", "you", "?"]
    assert run_json("text", "tokenize", stdin="") == []


def test_tables(run: Run) -> None:
    out = run("text", "lemmatize", "--lang", "fr", "Les chevaux")
    assert "lemma" in out and "chevaux" in out and "cheval" in out
    out = run("text", "stopwords", SEED)
    assert "stop word" in out and "tricky" in out
    out = run("text", "bow", "the cat sat", "the dog sat")
    assert "bag of words" in out and "cat" in out and "dog" in out
    # documents are shown as typed, not read as rich markup
    out = run("text", "similar", "--method", "bow", "[bold]hi[/bold]", "hi")
    assert "[bold]hi[/bold]" in out


def test_bow_and_tfidf_json_from_stdin_lines(run_json: RunJson) -> None:
    bow = run_json("text", "bow", stdin="the cat sat\n\nthe dog sat down\n")
    assert bow == {
        "documents": ["the cat sat", "the dog sat down"],
        "vocabulary": ["cat", "dog", "down", "sat", "the"],
        "matrix": [[1, 0, 0, 1, 1], [0, 1, 1, 1, 1]],
    }
    weights = run_json("text", "tfidf", "--drop-stopwords", "the cat sat", "the dog sat down")
    assert "the" not in weights["vocabulary"] and len(weights["matrix"]) == 2


def test_similar(run_json: RunJson) -> None:
    docs = ["the cat sat on the mat", "the cat lay on the mat", "stock prices fell"]
    result = run_json("text", "similar", "--method", "tfidf", *docs)
    assert result["documents"] == docs
    pairs = {(p["a"], p["b"]): p["tfidf"] for p in result["pairs"]}
    assert set(pairs) == {(0, 1), (0, 2), (1, 2)}
    assert pairs[(0, 1)] > 0.5 and pairs[(0, 2)] == 0.0


def test_similar_word2vec_json(run_json: RunJson) -> None:
    result = run_json("text", "similar", "--method", "word2vec", "a b c", "a b d")
    assert list(result["pairs"][0]) == ["a", "b", "word2vec"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["text", "tokenize", "--lang", "xx", "hi"], "unknown language 'xx'"),
        (["text", "similar", "--method", "bow", "only one"], "at least two documents"),
        (["text", "bow"], "no documents"),
    ],
)
def test_errors(argv: list[str], message: str, run: Run) -> None:
    with pytest.raises(LmforgeError, match=message):
        run(*argv)


def test_subcommand_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="lmforge")
    add_text_commands(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit):
        parser.parse_args(["text"])
