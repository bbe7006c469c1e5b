"""Interactive multi-turn chat on a terminal or a pipe, streaming each answer as it is generated."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, TextIO

from lmforge.engine import StepOutput
from lmforge.errors import LmforgeError
from lmforge.generate import SamplingParams, stream_outputs
from lmforge.model.transformer import Transformer
from lmforge.stats import format_stats
from lmforge.textio import decode_utf8
from lmforge.tokenizer import Tokenizer

if TYPE_CHECKING:
    from lmforge.client import Client, Delta

HELP = "commands: /help shows this, /reset clears the conversation, /exit quits; Ctrl-C stops an answer"


def fit_history(
    tokenizer: Tokenizer, messages: list[dict[str, str]], budget: int
) -> tuple[list[int], list[dict[str, str]]]:
    """Render the conversation; drop the oldest turns (never the system prompt) until it fits `budget`."""
    while True:
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(ids) <= budget or len(messages) - first <= 1:
            return ids, messages
        messages = messages[:first] + messages[first + 2 :]  # one user + assistant exchange


def _answer(model: Transformer | None, tokenizer: Tokenizer | None, remote: Client | None,
            messages: list[dict[str, str]], params: SamplingParams, budget: int) -> Iterator[StepOutput | Delta]:
    """The answer to the conversation as it streams, from the remote server or the local model (whose context
    may need the earliest turns dropped from `messages`, in place)."""
    if remote is not None:
        yield from remote.stream_chat(messages, params)
        return
    assert model is not None and tokenizer is not None
    before = len(messages)
    ids, kept = fit_history(tokenizer, messages, budget)
    if len(kept) < before:
        messages[:] = kept
        dropped = (before - len(kept)) // 2  # one turn = a question and its answer
        print(f"(dropped {dropped} earliest turn{'s' if dropped != 1 else ''} to fit the context)", file=sys.stderr)
    yield from stream_outputs(model, tokenizer, ids, params, truncate=True)


def _read_turn(stdin: TextIO, interactive: bool) -> str:
    """One line of user input; "" at end of input. On a terminal, input() gives line editing and history.
    A line that is not UTF-8 is an LmforgeError (the session reports it and goes on)."""
    if not interactive:
        buffer = getattr(stdin, "buffer", None)
        if buffer is None:  # an in-memory text stream: already decoded
            return stdin.readline()
        line = buffer.readline()
        return decode_utf8(line, "input line") if line else ""
    try:
        import readline  # noqa: F401  (importing it is what turns on editing for input())
    except ImportError:
        pass
    try:
        return input("\n>>> ") + "\n"
    except EOFError:
        return ""
    except UnicodeDecodeError as e:
        raise LmforgeError(f"input is not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None


def chat_session(
    model: Transformer | None,
    tokenizer: Tokenizer | None,
    params: SamplingParams,
    system: str | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stats: bool = False,
    load_seconds: float = 0.0,
    remote: Client | None = None,
) -> list[dict[str, str]]:
    """Read user turns until EOF or /exit; returns the final conversation. `stats` prints each answer's token
    counts, speeds and memory to stderr (with the model's load time), as `ollama run --verbose` does. With
    `remote` the answers come from that server (which keeps to its own context) instead of model/tokenizer."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty() and stdout.isatty()
    start: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    if interactive:
        print(HELP, file=sys.stderr)
    budget = model.cfg.max_seq_len - min(params.max_new_tokens, model.cfg.max_seq_len // 2) if model else 0
    while True:
        try:
            line = _read_turn(stdin, interactive)
        except LmforgeError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C at the prompt: end the prompt's line so the shell's starts its own
            out = stdout if interactive else sys.stderr  # never an extra line in piped output
            out.write("\n")
            out.flush()
            return messages
        if not line:  # EOF (Ctrl-D at the prompt: end its line too)
            if interactive:
                stdout.write("\n")
                stdout.flush()
            return messages
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return messages
        if text == "/reset":
            messages = list(start)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text in ("/help", "/?"):
            print(HELP, file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {HELP}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        answer, usage = "", None
        try:
            for out in _answer(model, tokenizer, remote, messages, params, budget):
                answer += out.text
                usage = out.usage or usage
                stdout.write(out.text)
                stdout.flush()
        except KeyboardInterrupt:
            print("\n(stopped)", file=sys.stderr)
        except LmforgeError as e:
            print(f"error: {e}", file=sys.stderr)
        stdout.write("\n")
        stdout.flush()
        if stats and usage is not None:
            print(format_stats(load_seconds, usage), file=sys.stderr)
        messages.append({"role": "assistant", "content": answer})
