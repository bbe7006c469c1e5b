"""The chat loop's user experience, driven through StringIO: /help, the newline after Ctrl-C / Ctrl-D at the
prompt, and the notice when old turns are dropped to fit the context. Generation itself is faked: these tests
are about the loop, not the model."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import tiny
from conftest import write_byte_tokenizer

import lmforge.chat
from lmforge.chat import HELP, chat_session
from lmforge.generate import SamplingParams
from lmforge.tokenizer import Tokenizer


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("chat-tokenizer")
    write_byte_tokenizer(folder)
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": tiny.CHAT_TEMPLATE}))
    return Tokenizer.from_dir(Path(folder))


@pytest.fixture
def prompts(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Fake generation: every answer is "ok"; the prompts it was given are recorded."""
    seen: list[list[int]] = []

    def fake_outputs(model, tokenizer, ids, params, truncate=False):
        seen.append(list(ids))
        yield SimpleNamespace(text="ok", usage=None, token=1, finish_reason=None)

    monkeypatch.setattr(lmforge.chat, "stream_outputs", fake_outputs)
    return seen


def model(context: int) -> SimpleNamespace:
    return SimpleNamespace(cfg=SimpleNamespace(max_seq_len=context))


def run(tokenizer, text: str, context: int = 512, max_new_tokens: int = 8, stdin=None, stdout=None):
    stdin = stdin if stdin is not None else io.StringIO(text)
    stdout = stdout if stdout is not None else io.StringIO()
    messages = chat_session(model(context), tokenizer, SamplingParams(max_new_tokens=max_new_tokens), stdin=stdin,
                            stdout=stdout)
    return messages, stdout.getvalue()


def test_help_command(tokenizer, prompts, capsys) -> None:
    messages, out = run(tokenizer, "/help\n/nonsense\nhi\n")
    err = capsys.readouterr().err.splitlines()
    assert err[0] == HELP and "/help" in HELP
    assert err[1].startswith("unknown command /nonsense")
    assert out == "ok\n" and [m["role"] for m in messages] == ["user", "assistant"]


@pytest.mark.parametrize("key", [EOFError, KeyboardInterrupt], ids=["ctrl-d", "ctrl-c"])
def test_leaving_at_the_prompt_ends_the_line(key, tokenizer, prompts, monkeypatch, capsys) -> None:
    def press(prompt: str = "") -> str:
        raise key

    monkeypatch.setattr("builtins.input", press)
    messages, out = run(tokenizer, "", stdin=Terminal(), stdout=Terminal())
    assert out == "\n" and messages == []
    assert capsys.readouterr().err == HELP + "\n"  # the help line of an interactive session, nothing else


def test_piped_end_of_input_adds_no_line(tokenizer, prompts, capsys) -> None:
    _, out = run(tokenizer, "hi\n")
    assert out == "ok\n"
    assert capsys.readouterr().err == ""


def test_dropped_turns_are_announced(tokenizer, prompts, capsys) -> None:
    question = "x" * 100
    # budget = context - max_new_tokens = 150 tokens (one per byte): one question fits, two do not
    messages, out = run(tokenizer, f"{question}\n{question}\n{question}\n", context=200, max_new_tokens=50)
    assert out == "ok\nok\nok\n"
    assert capsys.readouterr().err.splitlines() == ["(dropped 1 earliest turn to fit the context)"] * 2
    assert all(len(ids) <= 150 for ids in prompts)
    assert [m["role"] for m in messages] == ["user", "assistant"]


def test_dropping_several_turns_at_once(tokenizer, prompts, capsys) -> None:
    turns = "a\nb\nc\n" + "y" * 120 + "\n"
    run(tokenizer, turns, context=200, max_new_tokens=50)
    assert capsys.readouterr().err.splitlines() == ["(dropped 3 earliest turns to fit the context)"]


def test_a_line_that_is_not_utf8_is_reported_and_skipped(tokenizer, prompts, capsys) -> None:
    stdin = io.TextIOWrapper(io.BytesIO("caf\xe9\n".encode("latin-1") + "thé\n".encode()), encoding="utf-8")
    messages, out = run(tokenizer, "", stdin=stdin)
    assert capsys.readouterr().err.splitlines() == ["error: input line is not valid UTF-8 (byte 0xe9 at offset 3)"]
    assert out == "ok\n" and messages[0] == {"role": "user", "content": "thé"}
