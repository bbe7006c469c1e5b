"""Bad input to the CLI ends in exactly one `error: ...` line and exit code 2, before any model is loaded:
bytes that are not UTF-8 (stdin, --file, arguments) and integers out of range."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import build_parser, main

BAD = b"caf\xe9\n"
BAD_MESSAGE = "stdin is not valid UTF-8 (byte 0xe9 at offset 3)"


def feed(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    """stdin as the interpreter makes it: a strict UTF-8 text wrapper over the bytes."""
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="strict"))


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "internal error" not in lines[0] and captured.out == ""
    return lines[0]


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to load a model: bad input must be refused before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("lmforge.weights.load.load", refuse)
    monkeypatch.setattr("lmforge.embeddings.load_encoder", refuse)


@pytest.mark.parametrize("command", ["tokenize", "lemmatize", "stopwords", "bow", "tfidf", "similar"])
def test_text_commands_refuse_bad_stdin(command: str, monkeypatch, capsys, no_model_loads) -> None:
    feed(monkeypatch, BAD)
    assert main(["text", command]) == 2
    assert one_error_line(capsys) == f"error: {BAD_MESSAGE}"


def test_text_commands_refuse_bad_arguments(capsys) -> None:
    # the interpreter decodes argv with surrogateescape: b"\xe9" arrives as "\udce9"
    assert main(["text", "tokenize", "caf\udce9"]) == 2
    assert "not valid UTF-8 (byte 0xe9 at offset 3)" in one_error_line(capsys)
    assert main(["text", "bow", "ok", "caf\udce9"]) == 2
    assert "argument 2 is not valid UTF-8" in one_error_line(capsys)


def test_valid_utf8_stdin_round_trips_in_json(monkeypatch, capsys) -> None:
    feed(monkeypatch, "café naïve\r\n東京\n".encode())
    assert main(["text", "tokenize", "--format", "json"]) == 0
    out = capsys.readouterr().out
    out.encode("utf-8")  # no lone surrogates
    assert json.loads(out) == ["café", "naïve", "東", "京"]


def test_embed_refuses_bad_bytes(tmp_path: Path, monkeypatch, capsys, no_model_loads) -> None:
    feed(monkeypatch, b"fine\n" + BAD)
    assert main(["embed", "--file", "-"]) == 2
    assert one_error_line(capsys) == "error: stdin is not valid UTF-8 (byte 0xe9 at offset 8)"
    path = tmp_path / "texts.txt"
    path.write_bytes(BAD)
    assert main(["embed", "--file", str(path)]) == 2
    assert one_error_line(capsys) == f"error: {path} is not valid UTF-8 (byte 0xe9 at offset 3)"
    assert main(["embed", "caf\udce9"]) == 2
    assert "not valid UTF-8" in one_error_line(capsys)


def test_subprocess_lemmatize_bad_stdin() -> None:
    out = subprocess.run([sys.executable, "-m", "lmforge", "text", "lemmatize"], input=BAD, capture_output=True,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.decode().splitlines() == [f"error: {BAD_MESSAGE}"]
    assert out.stdout == b""


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--max-new-tokens", "1000000000000000000000000"], ["max-new-tokens", "2147483647", "25 digits"]),
        (["--max-new-tokens", "2147483648"], ["max-new-tokens", "[1, 2147483647]"]),
        (["--max-new-tokens", "0"], ["max-new-tokens"]),
        (["--top-k", "99999999999999999999"], ["top-k", "[0, 2147483647]"]),
        (["--top-k", "-1"], ["top-k"]),
        (["--seed", "-1"], ["seed", "[0, 9223372036854775807]"]),
        (["--seed", str(2**63)], ["seed"]),
        (["--seed", "1e3"], ["seed", "expected an integer"]),
    ],
)
@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"]])
def test_integer_flags_out_of_range(command, flags, words, capsys, no_model_loads) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, *flags])
    assert exit_info.value.code == 2
    line = one_error_line(capsys)
    for word in words:
        assert word in line


def test_integer_flags_at_their_bounds() -> None:
    args = build_parser().parse_args(["generate", "hi", "--max-new-tokens", "2147483647", "--top-k", "0",
                                      "--seed", str(2**63 - 1)])
    assert (args.max_new_tokens, args.top_k, args.seed) == (2**31 - 1, 0, 2**63 - 1)


def test_error_quoting_a_line_break_stays_one_line(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "two\nlines"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    assert main(["inspect", str(folder)]) == 2
    assert "two\\nlines" in one_error_line(capsys)
