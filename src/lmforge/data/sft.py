"""The datasets of fine-tuning: JSONL rows (or text files) -> token rows with loss masks -> padded batches.

Tasks (`load_task`):
- instruct:  {"instruction", "input"?, "output"} or {"prompt", "completion"}. With a chat template the row is one
             user turn rendered exactly as `lmforge generate --chat` renders it (generate.encode_prompt: same
             template, same default system prompt) and the output is the assistant turn up to and including the
             template's end-of-turn token, then nothing. Without a template: PLAIN_FORMAT + output + eos.
             Loss only on the response (and its end of turn).
- chat:      {"messages": [{"role", "content"}, ...]}; loss on each assistant turn and its end-of-turn marker.
- domain:    .txt/.md files (folders walked) -> documents + eos, cut into blocks; every token trained.
- classify:  {"text", "label"} -> tokens and one label index per row (labels sorted from the training rows);
             `label_word_examples` gives the decoder alternative: instruct rows whose output is the label text.
- seq2seq:   {"source", "target"} for T5: encoder tokens, decoder tokens (start id + target[:-1]), labels.

Every loader returns an ExampleSet: the rows plus what happened to them (rows truncated to max_len, rows dropped
because their response was cut off entirely), which the caller prints: nothing is cut silently. A bad row is an
LmforgeError "FILE line N: ...". SFTData batches the rows for the training loop (train/loop.py: TrainData).

Causal rows keep tokens and labels aligned (labels[i] = tokens[i] where trained, else -100); batches shift them
the way objectives.CausalLM does (input = row[:-1], labels = the next tokens), so its loss applies unchanged.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge.data.collate import IGNORE, Batch, pad_batch
from lmforge.data.sources import find_files, read_docs
from lmforge.errors import LmforgeError
from lmforge.generate import encode_prompt
from lmforge.textio import json_type, jsonl_rows
from lmforge.tokenizer import Tokenizer

TASKS = ("instruct", "chat", "domain", "classify", "seq2seq")
ROLES = ("system", "user", "assistant")
GROUP_BATCHES = 50  # length grouping sorts rows within windows of this many batches of the epoch permutation
Label = str | int
Kind = Literal["causal", "classify", "seq2seq"]


# ---- rows ---------------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One training row. causal: tokens + labels aligned with them (-100 = no loss); classify: tokens + label
    (an index into the label list); seq2seq: tokens (encoder) + decoder_tokens + labels (the target ids)."""

    tokens: list[int]
    labels: list[int] | None = None
    label: int | None = None
    decoder_tokens: list[int] | None = None
    line: int = 0  # the source line (0: not from a JSONL row, e.g. a domain block)

    @property
    def kind(self) -> Kind:
        if self.label is not None:
            return "classify"
        return "seq2seq" if self.decoder_tokens is not None else "causal"

    @property
    def length(self) -> int:
        """Tokens this row feeds the model (what padding is measured in)."""
        if self.kind == "causal":
            return len(self.tokens) - 1  # the input is the row less its last token
        return len(self.tokens) + len(self.decoder_tokens or [])


@dataclass
class ExampleSet:
    """A loader's rows and what it had to do to them; `notes()` are the lines the caller prints."""

    examples: list[Example]
    max_len: int
    truncated: int = 0  # rows cut to max_len (still trained)
    dropped: int = 0  # rows whose whole response lay beyond max_len
    boundary_mismatch: int = 0  # rows whose turns tokenise differently apart than as one text (see _tokenize)
    labels: list[Label] | None = None  # classification: the label list, index = label id
    source: str = ""

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    def notes(self) -> list[str]:
        out = []
        if self.truncated:
            out.append(f"{self.truncated} row{_s(self.truncated)} truncated to {self.max_len} tokens")
        if self.dropped:
            out.append(f"{self.dropped} row{_s(self.dropped)} dropped: the response starts after {self.max_len} "
                       "tokens")
        if self.boundary_mismatch:
            out.append(f"{self.boundary_mismatch} row{_s(self.boundary_mismatch)} tokenise differently at turn "
                       "boundaries than as one text (trained turn by turn, as generation sees them)")
        return out


def _s(n: int) -> str:
    return "" if n == 1 else "s"


# ---- reading and validating JSONL ---------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for every non-blank line; a line that is not a JSON object is an error naming it."""
    for number, row, _ in jsonl_rows(path):
        yield number, row


def _text(row: dict[str, Any], key: str, where: str, optional: bool = False, allow_empty: bool = False) -> str:
    """row[key] as a string: missing, null (unless optional), another type or blank -> an error naming the line."""
    value = row.get(key)
    if value is None:
        if optional:
            return ""
        raise LmforgeError(f"{where}: missing field {key!r}" if key not in row else f"{where}: {key!r} is null")
    if not isinstance(value, str):
        raise LmforgeError(f"{where}: {key!r} must be a string, not {json_type(value)}")
    if not allow_empty and not optional and not value.strip():
        raise LmforgeError(f"{where}: {key!r} is empty")
    return value


def _nonempty(rows: list[Any], path: Path) -> None:
    if not rows:
        raise LmforgeError(f"{path}: no rows (the dataset is empty)")


# ---- instruction tuning -------------------------------------------------------------------------------------


def plain_prompt(instruction: str, input: str = "") -> str:
    """The prompt of a row for a tokenizer without a chat template (Alpaca's layout); generate with this text."""
    parts = [f"### Instruction:\n{instruction}"]
    if input.strip():
        parts.append(f"### Input:\n{input}")
    parts.append("### Response:\n")
    return "\n\n".join(parts)


def user_turn(instruction: str, input: str = "") -> str:
    """The user message of an instruct row: the instruction, then a blank line and the input when there is one."""
    return f"{instruction}\n\n{input}" if input.strip() else instruction


def _instruct_fields(row: dict[str, Any], where: str) -> tuple[str, str, str]:
    """(instruction, input, output) of an Alpaca row or a prompt/completion row."""
    if "instruction" in row or "prompt" not in row:
        return _text(row, "instruction", where), _text(row, "input", where, optional=True), _text(row, "output", where)
    return _text(row, "prompt", where), "", _text(row, "completion", where)


def instruct_examples(path: str | Path, tokenizer: Tokenizer, max_len: int, chat: bool | None = None,
                      system: str | None = None) -> ExampleSet:
    """Instruction rows -> causal rows with the loss on the response. `chat`: None = the chat template if the
    tokenizer has one; `system` as `generate --chat --system` (None = the template's own default)."""
    path = Path(path)
    chat = bool(tokenizer.chat_template) if chat is None else chat
    _check_decoder_tokenizer(tokenizer, "instruction tuning", chat)
    rows = [(n, _instruct_fields(row, f"{path} line {n}")) for n, row in read_jsonl(path)]
    _nonempty(rows, path)
    out = _Collector(path, max_len, tokenizer)
    for n, (instruction, input, output) in rows:
        pieces = _instruct_pieces(tokenizer, instruction, input, output, chat, system, f"{path} line {n}")
        out.add_causal(pieces, n, add_special_tokens=not chat)  # the plain prompt is raw text: specials as encode adds
    return out.finish()


def _instruct_pieces(tokenizer: Tokenizer, instruction: str, input: str, output: str, chat: bool,
                     system: str | None, where: str) -> list[_Piece]:
    if not chat:
        prompt_ids = encode_prompt(tokenizer, plain_prompt(instruction, input), chat=False)
        response = tokenizer.encode(output, add_special_tokens=False) + [_eos(tokenizer)]
        return [_Piece(prompt_ids, False, plain_prompt(instruction, input)),
                _Piece(response, True, output + (tokenizer.eos_token or ""))]
    user = user_turn(instruction, input)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    # the prompt's ids are generate's own, so a tuned model is asked exactly the way it was trained
    prompt_ids = encode_prompt(tokenizer, user, chat=True, system=system)
    prefix, answer, add_eos = _assistant_turn(tokenizer, messages, output, where)
    return [_Piece(prompt_ids, False, prefix), _answer_piece(tokenizer, answer, add_eos)]


def label_word_examples(path: str | Path, tokenizer: Tokenizer, max_len: int, labels: list[Label] | None = None,
                        chat: bool | None = None, system: str | None = None) -> ExampleSet:
    """Classification rows for a decoder as instruct rows: the text is the instruction, the label's text the
    output (the model learns to answer with the label word). Labels as classify_examples (sorted, or given)."""
    path = Path(path)
    rows, label_list = _classify_rows(path, labels)
    chat = bool(tokenizer.chat_template) if chat is None else chat
    _check_decoder_tokenizer(tokenizer, "label-word classification", chat)
    out = _Collector(path, max_len, tokenizer)
    for n, text, label in rows:
        pieces = _instruct_pieces(tokenizer, text, "", str(label), chat, system, f"{path} line {n}")
        out.add_causal(pieces, n, add_special_tokens=not chat)
    result = out.finish()
    result.labels = label_list
    return result


# ---- dialog tuning ------------------------------------------------------------------------------------------


def _messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    out = message_list(row.get("messages"), where)
    if not any(m["role"] == "assistant" for m in out):
        raise LmforgeError(f"{where}: no assistant message (nothing to train on)")
    first = next(i for i, m in enumerate(out, 1) if m["role"] != "system")
    if out[first - 1]["role"] != "user":  # an assistant turn needs a question: generation always follows a user turn
        raise LmforgeError(f"{where}: message {first} is an assistant message before any user message")
    return out


def message_list(messages: Any, where: str) -> list[dict[str, str]]:
    """A row's "messages", each checked: an object with a known role (system only first) and string content
    (an assistant's not empty)."""
    if messages is None:
        raise LmforgeError(f"{where}: missing field 'messages'")
    if not isinstance(messages, list) or not messages:
        raise LmforgeError(f"{where}: 'messages' must be a non-empty list, not {json_type(messages)}")
    out = []
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise LmforgeError(f"{where}: message {i} must be an object, not {json_type(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise LmforgeError(f"{where}: message {i} has role {role!r} (expected system, user or assistant)")
        if role == "system" and i != 1:
            raise LmforgeError(f"{where}: message {i} is a system message; only the first message may be one")
        content = _text(m, "content", f"{where}: message {i}", allow_empty=role != "assistant")
        out.append({"role": role, "content": content})
    return out


def chat_examples(path: str | Path, tokenizer: Tokenizer, max_len: int) -> ExampleSet:
    """Conversations -> causal rows with the loss on every assistant turn (content + end-of-turn marker)."""
    path = Path(path)
    if not tokenizer.chat_template:
        raise LmforgeError("dialog tuning needs a tokenizer with a chat template (this one has none): use a chat "
                           "model, or instruct rows with the plain format")
    rows = [(n, _messages(row, f"{path} line {n}")) for n, row in read_jsonl(path)]
    _nonempty(rows, path)
    out = _Collector(path, max_len, tokenizer)
    for n, messages in rows:
        out.add_causal(_dialog_pieces(tokenizer, messages, f"{path} line {n}"), n)
    return out.finish()


def _dialog_pieces(tokenizer: Tokenizer, messages: list[dict[str, str]], where: str) -> list[_Piece]:
    """The conversation as alternating untrained pieces (everything the template puts before an assistant
    turn's content) and trained pieces (the content and its end of turn). Each boundary is found by rendering
    messages[:i] with the generation prompt and messages[:i+1] without: so every turn's prompt ends exactly
    where generation starts."""
    pieces: list[_Piece] = []
    done, eos_added = "", False  # the text the pieces so far stand for; whether they end with an eos of ours
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix, answer, add_eos = _assistant_turn(tokenizer, messages[:i], m["content"], where)
        if not prefix.startswith(done):
            raise LmforgeError(f"{where}: the chat template renders earlier turns differently once the conversation "
                               "goes on, so its turns cannot be trained as one row (split the conversation)")
        between = prefix[len(done):]
        if eos_added:  # a template that starts each turn with eos (GPT-style): that eos is the one we appended
            between = between.removeprefix(tokenizer.eos_token or "")
        pieces.append(_Piece(tokenizer.encode(between, add_special_tokens=False), False, between))
        pieces.append(_answer_piece(tokenizer, answer, add_eos))
        done, eos_added = prefix + answer, add_eos
    return pieces


def _assistant_turn(tokenizer: Tokenizer, before: list[dict[str, str]], content: str, where: str
                    ) -> tuple[str, str, bool]:
    """(prompt text, the assistant turn's text to train, whether eos must follow it). The turn's text is what the
    template renders for the assistant message up to and including its first end-of-turn token (eos or another
    special token) after the content; what follows (ChatML's newline) is not trained: generation stops at the
    end of turn. A template with no such token gets the tokenizer's eos appended, so the model learns to stop."""
    try:
        prefix = tokenizer.apply_chat_template(before, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*before, {"role": "assistant", "content": content}],
                                             add_generation_prompt=False)
    except LmforgeError as e:
        raise LmforgeError(f"{where}: {e}") from None
    if not full.startswith(prefix):
        raise LmforgeError(f"{where}: the chat template's generation prompt is not the start of the rendered "
                           "assistant turn, so the response cannot be told from the prompt")
    rest = full[len(prefix):]
    # search after the content, so a special token inside the content is not taken for the end of the turn
    at = rest.find(content.strip())
    start = at + len(content.strip()) if at >= 0 else 0
    ends = [(j, len(s)) for s in _end_markers(tokenizer) if (j := rest.find(s, start)) >= 0]
    if ends:
        j, n = min(ends, key=lambda e: (e[0], -e[1]))  # the first; of two at one place, the longer
        return prefix, rest[: j + n], False
    _eos(tokenizer)  # the error, when there is no eos either
    return prefix, rest, True


def _end_markers(tokenizer: Tokenizer) -> list[str]:
    """Token strings that end an assistant turn: the eos token and every special added token."""
    if tokenizer not in _END_MARKERS:  # once per tokenizer: some have hundreds of added tokens
        specials = [t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special]
        _END_MARKERS[tokenizer] = sorted({s for s in [tokenizer.eos_token, *specials] if s})
    return _END_MARKERS[tokenizer]


_END_MARKERS: weakref.WeakKeyDictionary[Tokenizer, list[str]] = weakref.WeakKeyDictionary()


def _answer_piece(tokenizer: Tokenizer, answer: str, add_eos: bool) -> _Piece:
    ids = tokenizer.encode(answer, add_special_tokens=False) + ([_eos(tokenizer)] if add_eos else [])
    return _Piece(ids, True, answer + (tokenizer.eos_token or "") if add_eos else answer)


# ---- pieces -> rows, with truncation ------------------------------------------------------------------------


@dataclass
class _Piece:
    ids: list[int]
    trained: bool
    text: str  # the text the ids stand for (special tokens written out)


class _Collector:
    """Rows as they are built, cut to max_len; counts what was cut or dropped."""

    def __init__(self, path: Path, max_len: int, tokenizer: Tokenizer | None = None) -> None:
        if max_len < 2:
            raise LmforgeError(f"max_len must be at least 2 tokens, not {max_len}")
        self.set = ExampleSet([], max_len, source=str(path))
        self.path, self.tokenizer = path, tokenizer

    def add_causal(self, pieces: list[_Piece], line: int, add_special_tokens: bool = False) -> None:
        """A row from its pieces. The mask is exact by construction (each id belongs to one piece); the pieces are
        also checked against the whole text tokenised at once: where a token would span a boundary the two differ,
        and the row is counted (kept as pieces: at each boundary the prompt ends where generation starts)."""
        tokens = [i for p in pieces for i in p.ids]
        labels = [i if p.trained else IGNORE for p in pieces for i in p.ids]
        assert self.tokenizer is not None
        if self.tokenizer.encode("".join(p.text for p in pieces), add_special_tokens=add_special_tokens) != tokens:
            self.set.boundary_mismatch += 1
        self.add(Example(tokens, labels, line=line), cut=len(tokens) > self.set.max_len)

    def add(self, example: Example, cut: bool) -> None:
        if cut and example.kind == "causal":
            assert example.labels is not None
            example.tokens, example.labels = example.tokens[: self.set.max_len], example.labels[: self.set.max_len]
            if all(x == IGNORE for x in example.labels[1:]):  # position 0 is never predicted
                self.set.dropped += 1
                return
        self.set.truncated += cut
        self.set.examples.append(example)

    def finish(self) -> ExampleSet:
        if not self.set.examples:
            raise LmforgeError(f"{self.path}: no row left: every response starts after {self.set.max_len} tokens "
                               "(raise max_len)")
        return self.set


# ---- domain tuning ------------------------------------------------------------------------------------------


def domain_examples(paths: str | Path | Sequence[str | Path], tokenizer: Tokenizer, max_len: int) -> ExampleSet:
    """Text files (or folders of them) -> continued pre-training rows: each document tokenised and followed by
    eos, all of them one stream, cut into blocks of max_len tokens; every token is trained. Consecutive blocks
    share one token (the last of one is the first input of the next) so every token but the first is predicted
    exactly once, as pre-training's windows do."""
    if max_len < 2:
        raise LmforgeError(f"max_len must be at least 2 tokens, not {max_len}")
    sources = [paths] if isinstance(paths, str | Path) else list(paths)
    files = find_files(sources)
    other = [f for f in files if f.suffix.lower() not in (".txt", ".md")]
    if other:
        raise LmforgeError(f"{other[0]}: domain tuning reads .txt and .md files (plain text), not "
                           f"{other[0].suffix}")
    sep = _eos(tokenizer)
    stream: list[int] = []
    # a literal "<|endoftext|>" in a document is text, not a separator (as `data prepare` reads documents)
    was, tokenizer.backend.encode_special_tokens = tokenizer.backend.encode_special_tokens, True
    try:
        for doc in read_docs(files, "text"):
            if doc.text.strip():
                stream += tokenizer.encode(doc.text, add_special_tokens=False) + [sep]
    finally:
        tokenizer.backend.encode_special_tokens = was
    if len(stream) < 2:
        raise LmforgeError(f"no text in {', '.join(map(str, sources))}")
    stride = max_len - 1
    blocks = [stream[s: s + max_len] for s in range(0, len(stream) - 1, stride)]
    return ExampleSet([Example(b, list(b)) for b in blocks], max_len, source=", ".join(map(str, sources)))


# ---- classification -----------------------------------------------------------------------------------------


def _classify_rows(path: Path, labels: list[Label] | None) -> tuple[list[tuple[int, str, Label]], list[Label]]:
    """Validated (line, text, label) rows and the label list: the given one, or the rows' labels sorted."""
    rows = []
    for n, row in read_jsonl(path):
        where = f"{path} line {n}"
        text = _text(row, "text", where)
        if "label" not in row or row["label"] is None:
            raise LmforgeError(f"{where}: missing field 'label'")
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, str | int):
            raise LmforgeError(f"{where}: 'label' must be a string or an integer, not {json_type(label)}")
        if rows and type(label) is not type(rows[0][2]):
            raise LmforgeError(f"{where}: label {label!r} is {json_type(label)} but line {rows[0][0]}'s is "
                               f"{json_type(rows[0][2])}: use one type for all labels")
        rows.append((n, text, label))
    _nonempty(rows, path)
    if labels is None:
        return rows, sorted({r[2] for r in rows})  # type: ignore[type-var]
    known = set(labels)
    for n, _, label in rows:
        if label not in known:
            raise LmforgeError(f"{path} line {n}: label {label!r} is not among the training labels "
                               f"({', '.join(map(repr, labels[:10]))}{', ...' if len(labels) > 10 else ''})")
    return rows, list(labels)


def classify_examples(path: str | Path, tokenizer: Tokenizer, max_len: int, labels: list[Label] | None = None
                      ) -> ExampleSet:
    """{"text", "label"} rows -> tokens (with the tokenizer's special tokens, e.g. BERT's [CLS] ... [SEP]) and
    a label index. `labels=None` (training): the label list is the rows' labels sorted (ExampleSet.labels, for
    the caller to save); given (validation): a label not in it is an error naming the line."""
    path = Path(path)
    rows, label_list = _classify_rows(path, labels)
    index = {label: i for i, label in enumerate(label_list)}
    ids, cut = _encode_truncated(tokenizer, [r[1] for r in rows], max_len)
    out = _Collector(path, max_len)
    for (n, _, label), tokens, was_cut in zip(rows, ids, cut, strict=True):
        out.add(Example(tokens, label=index[label], line=n), cut=was_cut)
    result = out.finish()
    result.labels = label_list
    return result


# ---- seq2seq ------------------------------------------------------------------------------------------------


def seq2seq_examples(path: str | Path, tokenizer: Tokenizer, max_len: int, decoder_start_id: int | None = None
                     ) -> ExampleSet:
    """{"source", "target"} rows for an encoder-decoder (T5): encoder tokens as the tokenizer encodes them (T5's
    post-processor appends </s>), labels = the target's ids ending with eos, decoder_tokens = the decoder start
    id (default: the pad id, as T5 does) followed by labels[:-1]. Each side is cut to max_len."""
    path = Path(path)
    rows = []
    for n, row in read_jsonl(path):
        where = f"{path} line {n}"
        rows.append((n, _text(row, "source", where), _text(row, "target", where)))
    _nonempty(rows, path)
    eos = _eos(tokenizer)
    start = decoder_start_id if decoder_start_id is not None else (tokenizer.pad_id or 0)
    sources, source_cut = _encode_truncated(tokenizer, [r[1] for r in rows], max_len)
    targets, target_cut = _encode_truncated(tokenizer, [r[2] for r in rows], max_len)
    out = _Collector(path, max_len)
    for (n, _, _), tokens, target, cut in zip(rows, sources, targets, map(max, source_cut, target_cut), strict=True):
        if not target or target[-1] != eos:  # a tokenizer without T5's post-processor: the decoder must learn to stop
            target = target[: max_len - 1] + [eos]
        out.add(Example(tokens, list(target), decoder_tokens=[start, *target[:-1]], line=n), cut=bool(cut))
    return out.finish()


def _encode_truncated(tokenizer: Tokenizer, texts: list[str], max_len: int) -> tuple[list[list[int]], list[bool]]:
    """With the tokenizer's special tokens, cut to max_len the way HF truncation does (special tokens kept)."""
    return tokenizer.encode_batch_truncated(texts, max_len)


# ---- the tokenizer's special ids ----------------------------------------------------------------------------


def _eos(tokenizer: Tokenizer) -> int:
    eos = tokenizer.eos_id
    if eos is None:
        raise LmforgeError("the tokenizer has no end-of-sequence token: fine-tuning needs one to teach the model "
                           "where an answer ends")
    return eos


def pad_id_for(tokenizer: Tokenizer) -> int:
    """The id batches are padded with: the pad token, else eos, else 0 (padding is masked, so any id serves)."""
    for i in (tokenizer.pad_id, tokenizer.eos_id):
        if i is not None:
            return i
    return 0


def _check_decoder_tokenizer(tokenizer: Tokenizer, what: str, chat: bool) -> None:
    if chat and not tokenizer.chat_template:
        raise LmforgeError(f"{what} in chat format needs a tokenizer with a chat template (this one has none)")
    _eos(tokenizer)


# ---- dispatch and split -------------------------------------------------------------------------------------


def load_task(task: str, path: str | Path | Sequence[str | Path], tokenizer: Tokenizer, max_len: int, *,
              labels: list[Label] | None = None, chat: bool | None = None, system: str | None = None
              ) -> ExampleSet:
    """The rows of one fine-tuning task (TASKS). `labels`: classify's training label list, given when loading
    validation rows; `chat`/`system`: instruct's format (see instruct_examples)."""
    if task == "domain":
        return domain_examples(path, tokenizer, max_len)
    if not isinstance(path, str | Path):
        raise LmforgeError(f"the {task} task reads one JSONL file")
    if task == "instruct":
        return instruct_examples(path, tokenizer, max_len, chat=chat, system=system)
    if task == "chat":
        return chat_examples(path, tokenizer, max_len)
    if task == "classify":
        return classify_examples(path, tokenizer, max_len, labels)
    if task == "seq2seq":
        return seq2seq_examples(path, tokenizer, max_len)
    raise LmforgeError(f"unknown task {task!r} ({', '.join(TASKS)})")


def split(examples: Sequence[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded (train, val) split; val keeps the rows' order. At least one row each when val_fraction > 0."""
    if not 0 <= val_fraction < 1:
        raise LmforgeError(f"the validation fraction must be in [0, 1), not {val_fraction}")
    n = len(examples)
    n_val = min(max(round(n * val_fraction), 1), n - 1) if val_fraction > 0 else 0
    if val_fraction > 0 and n < 2:
        raise LmforgeError(f"{n} row{_s(n)}: too few to split off validation rows (give --val-data or more rows)")
    chosen = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()[:n_val])
    return [e for i, e in enumerate(examples) if i not in chosen], [e for i, e in enumerate(examples) if i in chosen]


# ---- batches ------------------------------------------------------------------------------------------------


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Rows -> right-padded tensors. causal: tokens, attention_mask, labels (shifted: the next token, -100 where
    nothing is trained or padded); classify: tokens, attention_mask, labels (B,); seq2seq: tokens,
    attention_mask (the encoder's), decoder_tokens, labels (-100 on padding)."""
    kind = _one_kind(examples)
    if kind == "causal":
        tokens, mask = pad_batch([e.tokens[:-1] for e in examples], pad_id)
        labels, _ = pad_batch([e.labels[1:] for e in examples], IGNORE)  # type: ignore[index]
        return {"tokens": tokens, "attention_mask": mask, "labels": labels}
    tokens, mask = pad_batch([e.tokens for e in examples], pad_id)
    if kind == "classify":
        return {"tokens": tokens, "attention_mask": mask,
                "labels": torch.tensor([e.label for e in examples], dtype=torch.long)}
    decoder, _ = pad_batch([e.decoder_tokens for e in examples], pad_id)  # type: ignore[misc]
    labels, _ = pad_batch([e.labels for e in examples], IGNORE)  # type: ignore[misc]
    return {"tokens": tokens, "attention_mask": mask, "decoder_tokens": decoder, "labels": labels}


def _one_kind(examples: Sequence[Example]) -> Kind:
    kinds = {e.kind for e in examples}
    if len(kinds) != 1:
        raise LmforgeError(f"rows of different kinds in one dataset: {', '.join(sorted(kinds))}")
    return kinds.pop()


class SFTData:
    """Fine-tuning rows for the training loop (TrainData). Optimizer step s takes global rows s*B ... s*B+B-1 of
    an endless sequence of epochs; each epoch orders every training row once, computed from (seed, epoch) alone,
    so a step's rows are a pure function of the step (exact resume, rank sharding).

    An epoch's order is padding-aware: a seeded permutation, cut into windows of GROUP_BATCHES batches, each
    window sorted by length and cut into batches (similar lengths together), then the batches shuffled. The
    batches are aligned to the steps: when the row count is not a multiple of B, the one step that spans two
    epochs takes the first epoch's last rows and the next epoch's first ones."""

    def __init__(self, train_examples: Sequence[Example], val_examples: Sequence[Example], batch_size: int,
                 seed: int, pad_id: int, group_batches: int = GROUP_BATCHES) -> None:
        if not train_examples:
            raise LmforgeError("no training rows")
        if batch_size < 1:
            raise LmforgeError(f"batch size must be at least 1, not {batch_size}")
        self.kind = self.check_rows([*train_examples, *val_examples])
        self.train, self.val = list(train_examples), list(val_examples)
        self.batch_size, self.seed, self.pad_id, self.group_batches = batch_size, seed, pad_id, group_batches
        self.lengths = [self.row_length(e) for e in self.train]
        self.tokens_per_row = max(1, round(sum(self.lengths) / len(self.lengths)))
        self._orders: dict[int, list[int]] = {}
        self._val: list[Batch] | None = None

    # the three things that depend on what a row is (data/preferences.py's pairs override them)
    def check_rows(self, rows: Sequence[Any]) -> str:
        return _one_kind(rows)

    def row_length(self, row: Any) -> int:
        return row.length

    def collate(self, rows: Sequence[Any]) -> Batch:
        return collate(rows, self.pad_id)

    @property
    def steps_per_epoch(self) -> float:
        return len(self.train) / self.batch_size

    def epoch_order(self, epoch: int) -> list[int]:
        """Indices of the training rows in epoch `epoch`'s order: each row once."""
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}  # steps only move forward
            self._orders[epoch] = self._order(epoch)
        return self._orders[epoch]

    def _order(self, epoch: int) -> list[int]:
        n, B = len(self.train), self.batch_size
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=gen).tolist()
        # the epoch starts `head` rows before a step boundary: those rows finish the previous epoch's last step
        head = (-epoch * n) % B
        head = min(head, n)
        window = self.group_batches * B
        body, groups = perm[head:], []
        for at in range(0, len(body), window):
            rows = sorted(body[at: at + window], key=self.lengths.__getitem__)  # stable: ties keep random order
            groups += [rows[j: j + B] for j in range(0, len(rows), B)]
        tail = groups.pop() if groups and len(groups[-1]) < B else []  # the start of the step into the next epoch
        shuffled = [groups[k] for k in torch.randperm(len(groups), generator=gen).tolist()]
        return perm[:head] + [i for g in shuffled for i in g] + tail

    def rows(self, step: int) -> list[int]:
        """Indices (into the training rows) of step `step`'s global batch."""
        n = len(self.train)
        return [self.epoch_order(g // n)[g % n] for g in range(step * self.batch_size, (step + 1) * self.batch_size)]

    def global_batch(self, step: int) -> Batch:
        return self.collate([self.train[i] for i in self.rows(step)])

    def val_batches(self) -> list[Batch]:
        """The validation rows in their order, batch_size at a time (the last batch may be smaller)."""
        if self._val is None:
            B = self.batch_size
            self._val = [self.collate(self.val[i: i + B]) for i in range(0, len(self.val), B)]
        return self._val


def padding_fraction(batch: Batch) -> float:
    """Share of a batch's positions that are padding (attention_mask 0)."""
    mask = batch["attention_mask"]
    return 1 - float(mask.sum()) / mask.numel() if mask.numel() else 0.0


__all__ = [
    "IGNORE", "TASKS", "Batch", "Example", "ExampleSet", "Label", "SFTData", "chat_examples", "classify_examples",
    "collate", "domain_examples", "instruct_examples", "label_word_examples", "load_task",
    "pad_id_for", "padding_fraction", "plain_prompt", "read_jsonl", "seq2seq_examples", "split", "user_turn",
]
