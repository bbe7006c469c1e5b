"""Prompts: templates, labelled example pools, shot selection, rendering to the exact text a model sees, and
majority voting over sampled answers (self-consistency). `lmforge prompt` (prompt_cli.py) is the shell.

Template format: a jinja2 file (`.jinja`) made of up to four named blocks, each rendered on its own from the
caller's variables. Unset variables are errors (StrictUndefined) naming the variable.

    {% block system %}You are a careful translator.{% endblock %}
    {% block instruction %}Translate the {{ source_lang }} text into French.{% endblock %}
    {% block example %}
    English: {{ input }}
    French: {{ output }}
    {% endblock %}
    {% block input %}
    {% if chat %}{{ input }}{% else %}English: {{ input }}
    French:{% endif %}
    {% endblock %}

- system:      the system prompt; empty = none (a chat template then adds its own default, as `generate --chat`).
- instruction: the task, said once.
- example:     one shot, rendered once per shot with `input` and `output` set to that shot's; plain models only.
- input:       the query. For a chat model it is also how each shot's user turn is written (with `input` set to
               the shot's input); the shot's output is the assistant turn, verbatim.
A block that is left out comes from the built-in DEFAULT_TEMPLATE: system `{{ system }}` and instruction
`{{ instruction }}` (both empty when unset), example `Input: ...\\nOutput: ...`, input `{{ input }}` (with
shots on a plain model: `Input: {{ input }}\\nOutput:`). Every block also sees `chat` (whether the prompt goes
through the chat template) and `n_shots` (the shots rendered); these two names are reserved. One line break
right after `{% block ... %}` and one right before `{% endblock %}` are not part of the text, so a block may
sit on lines of its own; text outside the blocks is ignored.

Layout. Chat model: [system] + for each shot (user: input block, assistant: output) + user: input block; the
instruction and a blank line lead the first user turn. Plain model: the non-empty parts system, instruction,
each example, input, joined by blank lines. So the default template with only `input` set renders exactly as
`lmforge generate` (with --chat for a chat model) renders that text.

Pools are JSONL rows of one of these spellings, normalised to (input, output):
{"input", "target"}, {"instruction", "input"?, "output"} (Alpaca; the instruction, a blank line, then the
input, as `lmforge finetune` writes its user turn), {"prompt", "completion"}. Other fields are ignored.
"""

from __future__ import annotations

import random
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import jinja2
import numpy as np

from lmforge.errors import LmforgeError
from lmforge.textio import json_type, jsonl_rows, read_text_file
from lmforge.weights.registry import DEFAULT_CHAT_MODEL, DEFAULT_EMBED_MODEL

if TYPE_CHECKING:  # the tokenizer and embeddings pull in torch: loaded only when a prompt is rendered
    from lmforge.tokenizer import Tokenizer

__all__ = [
    "BLOCKS", "DEFAULT_TEMPLATE", "Example", "Pool", "Prompt", "PromptTemplate", "build_prompt", "load_template",
    "load_tokenizer", "majority_vote", "normalize_answer", "read_pool", "select_shots",
]

BLOCKS = ("system", "instruction", "example", "input")
RESERVED = ("chat", "n_shots")
Selection = Literal["first", "random", "similar"]
SELECTIONS: tuple[str, ...] = ("first", "random", "similar")

# the line break before `{% endblock %}` (trim_blocks removes the one after `{% block %}`)
_BREAK_BEFORE_END = re.compile(r"\r?\n[ \t]*(?=\{%-?\s*endblock\b)")
_UNDEFINED = re.compile(r"^'([^']+)' is undefined$")


class PromptTemplate:
    """A parsed template: its blocks, rendered one at a time (see the module docstring for the format)."""

    def __init__(self, source: str, name: str = "<string>") -> None:
        self.name, self.source = name, source
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, keep_trailing_newline=True)
        try:
            self._template = env.from_string(_BREAK_BEFORE_END.sub("", source))
        except jinja2.TemplateSyntaxError as e:
            raise LmforgeError(f"template {name} line {e.lineno}: {e.message}") from None
        unknown = [b for b in self._template.blocks if b not in BLOCKS]
        if unknown:
            raise LmforgeError(f"template {name}: unknown block {unknown[0]!r} (blocks: {', '.join(BLOCKS)})")

    @classmethod
    def from_file(cls, path: str | Path) -> PromptTemplate:
        return cls(read_text_file(path), str(path))

    def render(self, block: str, variables: dict[str, Any]) -> str:
        """One block's text; a block this template leaves out comes from DEFAULT_TEMPLATE."""
        if block not in BLOCKS:
            raise LmforgeError(f"unknown block {block!r} (blocks: {', '.join(BLOCKS)})")
        owner = self if block in self._template.blocks else DEFAULT_TEMPLATE
        template = owner._template
        try:
            return "".join(template.blocks[block](template.new_context(dict(variables))))
        except jinja2.UndefinedError as e:
            unset = _UNDEFINED.match(e.message or "")
            what = f"variable {unset.group(1)!r} is not set" if unset else str(e)
            raise LmforgeError(f"template {owner.name}, block {block}: {what}") from None
        except Exception as e:  # the template is the user's code: any failure in it is their error
            raise LmforgeError(f"template {owner.name}, block {block}: {type(e).__name__}: {e}") from None


DEFAULT_TEMPLATE = PromptTemplate(
    """\
{% block system %}{{ system | default("") }}{% endblock %}
{% block instruction %}{{ instruction | default("") }}{% endblock %}
{% block example %}
Input: {{ input }}
Output: {{ output }}
{% endblock %}
{% block input %}
{% if chat or not n_shots %}{{ input }}{% else %}Input: {{ input }}
Output:{% endif %}
{% endblock %}
""",
    "default",
)


def load_template(template: PromptTemplate | str | Path | None) -> PromptTemplate:
    """A template object, a template file's path, or None for DEFAULT_TEMPLATE."""
    if template is None:
        return DEFAULT_TEMPLATE
    if isinstance(template, PromptTemplate):
        return template
    return PromptTemplate.from_file(template)


# ---- example pools ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One labelled row: the input text and the answer a shot shows for it."""

    input: str
    output: str
    line: int = field(default=0, compare=False)  # the pool file's line (0: not from a file)


class Pool(Sequence[Example]):
    """Examples to draw shots from. Holds their sentence embeddings once computed (per embedding model), so
    `similar` selection embeds a pool once however many queries use it."""

    def __init__(self, examples: Iterable[Example], source: str = "pool") -> None:
        self.examples = tuple(examples)
        self.source = source
        self._vectors: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.examples)

    @overload
    def __getitem__(self, i: int) -> Example: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[Example]: ...
    def __getitem__(self, i: int | slice) -> Example | Sequence[Example]:
        return self.examples[i]

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def vectors(self, model: str | Path = DEFAULT_EMBED_MODEL) -> np.ndarray:
        """(n, dim) L2-normalised sentence embeddings of the inputs, computed on first use."""
        key = str(model)
        if key not in self._vectors:
            from lmforge.embeddings import embed

            self._vectors[key] = _unit(embed([e.input for e in self.examples], model=model))
        return self._vectors[key]


def _unit(vectors: np.ndarray) -> np.ndarray:
    # embed() normalises when the checkpoint says so; an encoder without that step must still give cosines
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


_ANSWER_KEYS = ("target", "output", "completion")


def _field(row: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if not required:
            return ""
        raise LmforgeError(f"{where}: missing field {key!r}" if key not in row else f"{where}: {key!r} is null")
    if not isinstance(value, str):
        raise LmforgeError(f"{where}: {key!r} must be a string, not {json_type(value)}")
    if required and not value.strip():
        raise LmforgeError(f"{where}: {key!r} is empty")
    return value


def example_from_row(row: dict[str, Any], where: str = "row") -> Example:
    """One pool row in any accepted spelling -> Example; a bad row is an LmforgeError starting with `where`."""
    answers = [k for k in _ANSWER_KEYS if k in row]
    if not answers:
        raise LmforgeError(f"{where}: no answer field: expected {{input, target}}, {{instruction, input, output}} "
                           f"or {{prompt, completion}}, got {{{', '.join(sorted(row))}}}")
    if len(answers) > 1:
        raise LmforgeError(f"{where}: ambiguous row: it has both {answers[0]!r} and {answers[1]!r}")
    answer = answers[0]
    output = _field(row, answer, where)
    if answer == "target":
        return Example(_field(row, "input", where), output)
    if answer == "completion":
        return Example(_field(row, "prompt", where), output)
    instruction = _field(row, "instruction", where, required=False)
    text = _field(row, "input", where, required=False)
    if not instruction.strip() and not text.strip():
        raise LmforgeError(f"{where}: an 'output' row needs a non-empty 'instruction' or 'input'")
    # sft.user_turn's layout, so a shot reads like the rows the model was fine-tuned on
    return Example("\n\n".join(p for p in (instruction, text) if p.strip()), output)


def read_pool(path: str | Path) -> Pool:
    """A JSONL file of labelled rows -> Pool; a bad row is an LmforgeError naming the file and line."""
    examples = []
    for number, row, _ in jsonl_rows(path):
        ex = example_from_row(row, f"{path} line {number}")
        examples.append(Example(ex.input, ex.output, number))
    if not examples:
        raise LmforgeError(f"{path}: no rows (the pool is empty)")
    return Pool(examples, str(path))


# ---- shot selection -----------------------------------------------------------------------------------------


def select_shots(
    pool: Pool | Sequence[Example],
    query: str | Example,
    k: int,
    how: Selection = "first",
    seed: int | None = None,
    embed_model: str | Path = DEFAULT_EMBED_MODEL,
) -> list[Example]:
    """k examples from the pool, the ones to keep first: `first` in pool order, `random` a seeded sample in
    draw order, `similar` by cosine similarity of sentence embeddings to the query, most similar first.
    A pool row whose input is the query's never becomes its own shot. Pass a Pool (not a list) to `similar`
    queries so its embeddings are computed once."""
    if how not in SELECTIONS:
        raise LmforgeError(f"unknown shot selection {how!r} (choose from {', '.join(SELECTIONS)})")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise LmforgeError(f"the number of shots must be an integer >= 0, got {k!r}")
    text = query.input if isinstance(query, Example) else query
    candidates = [i for i, ex in enumerate(pool) if ex.input.strip() != text.strip()]
    if k > len(candidates):
        besides = f" besides the query ({len(pool)} with it)" if len(candidates) < len(pool) else ""
        raise LmforgeError(f"asked for {k} shots but the pool holds only {len(candidates)} examples{besides}")
    if k == 0:
        return []
    if how == "first":
        chosen = candidates[:k]
    elif how == "random":
        chosen = random.Random(seed).sample(candidates, k)
    else:
        from lmforge.embeddings import embed

        pool = pool if isinstance(pool, Pool) else Pool(pool)
        scores = pool.vectors(embed_model)[candidates] @ _unit(embed([text], model=embed_model))[0]
        chosen = [candidates[i] for i in np.argsort(-scores, kind="stable")[:k]]
    return [pool[i] for i in chosen]


# ---- rendering ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt. `text` is exactly what the model sees and `ids` its tokens."""

    text: str
    ids: list[int]
    shots_used: list[Example]
    dropped: int  # shots left out to fit max_tokens
    chat: bool
    messages: list[dict[str, str]] | None = None  # the conversation given to the chat template (chat only)


def build_prompt(
    template: PromptTemplate | str | Path | None,
    variables: dict[str, Any],
    shots: Sequence[Example],
    tokenizer: Tokenizer,
    chat: bool | None = None,
    max_tokens: int | None = None,
) -> Prompt:
    """Render a prompt with its shots. `chat` None: through the chat template when the tokenizer has one.
    `max_tokens` (the model's context minus room for the answer): shots are dropped from the end, one at a
    time, until the prompt fits, with a warning; a prompt that does not fit even with no shots is an error."""
    tpl = load_template(template)
    _check_variables(variables)
    if chat is None:
        chat = bool(tokenizer.chat_template)
    elif chat and not tokenizer.chat_template:
        raise LmforgeError("this tokenizer has no chat template: render the prompt without chat")
    if max_tokens is not None and max_tokens < 1:
        raise LmforgeError(f"max_tokens must be >= 1, got {max_tokens}")
    shots = list(shots)
    for n in range(len(shots), -1, -1):
        prompt = _render(tpl, variables, shots[:n], tokenizer, chat)
        if max_tokens is None or len(prompt.ids) <= max_tokens:
            break
    else:
        without = " even with no shots" if shots else ""
        raise LmforgeError(f"context overflow: the prompt has {len(prompt.ids)} tokens{without}, over the limit "
                           f"of {max_tokens}")
    if n < len(shots):
        warnings.warn(f"dropped {len(shots) - n} of {len(shots)} shots to fit the prompt in {max_tokens} tokens",
                      stacklevel=2)
        prompt = Prompt(prompt.text, prompt.ids, prompt.shots_used, len(shots) - n, chat, prompt.messages)
    return prompt


def _check_variables(variables: dict[str, Any]) -> None:
    if not isinstance(variables, dict):
        raise LmforgeError(f"template variables must be an object (a dict), not {json_type(variables)}")
    for name in variables:
        if not isinstance(name, str):
            raise LmforgeError(f"template variable names must be strings, got {name!r}")
        if name in RESERVED:
            raise LmforgeError(f"template variable {name!r} is reserved (set by the renderer)")


def _join(*parts: str) -> str:
    return "\n\n".join(p for p in parts if p.strip())


def _render(tpl: PromptTemplate, variables: dict[str, Any], shots: list[Example], tokenizer: Tokenizer,
            chat: bool) -> Prompt:
    context = {**variables, "chat": chat, "n_shots": len(shots)}
    system = tpl.render("system", context)
    instruction = tpl.render("instruction", context)
    query = tpl.render("input", context)
    if not chat:
        examples = [tpl.render("example", {**context, "input": s.input, "output": s.output}) for s in shots]
        text = _join(system, instruction, *examples, query)
        return Prompt(text, tokenizer.encode(text), shots, 0, False)
    messages = [{"role": "system", "content": system}] if system.strip() else []
    for i, shot in enumerate(shots):
        user = tpl.render("input", {**context, "input": shot.input})
        messages.append({"role": "user", "content": _join(instruction, user) if i == 0 else user})
        messages.append({"role": "assistant", "content": shot.output})
    messages.append({"role": "user", "content": query if shots else _join(instruction, query)})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # as generate.encode_prompt: the chat template writes its own special tokens
    return Prompt(text, tokenizer.encode(text, add_special_tokens=False), shots, 0, True, messages)


def load_tokenizer(model: str | Path = DEFAULT_CHAT_MODEL) -> tuple[Tokenizer, int]:
    """A model's tokenizer and context length without reading its weights: from a GGUF file's metadata, or an
    HF folder's tokenizer files and config.json."""
    from lmforge.model_info import read_config
    from lmforge.tokenizer import Tokenizer
    from lmforge.weights.check import scan_gguf
    from lmforge.weights.gguf import config_from_gguf, is_gguf
    from lmforge.weights.load import _gguf_tokenizer
    from lmforge.weights.registry import resolve

    path = resolve(str(model))
    if path.is_file():
        if path.suffix != ".gguf" and not is_gguf(path):
            raise LmforgeError(f"{path} is neither a GGUF file nor a model folder")
        meta = scan_gguf(path).metadata
        cfg, tokenizer = config_from_gguf(meta, path.stem), _gguf_tokenizer(meta, path)
    else:
        cfg, tokenizer = read_config(path)[0], Tokenizer.from_dir(path)
    if cfg.family == "encoder":
        raise LmforgeError(f"{model} is an encoder-only model: it embeds text, it does not answer prompts")
    return tokenizer, cfg.max_seq_len


# ---- self-consistency ---------------------------------------------------------------------------------------


def normalize_answer(answer: str) -> str:
    """Case, surrounding punctuation and runs of whitespace do not make answers differ."""
    return " ".join(answer.split()).strip(" .,;:!?\"'").casefold()


def majority_vote(
    answers: list[str], normalize: Callable[[str], str] | None = normalize_answer
) -> tuple[str, float]:
    """The most frequent (normalised) answer and the share of answers that agree with it; a tie goes to the
    answer that came first. `normalize=None` compares the strings as they are."""
    if not answers:
        raise LmforgeError("majority vote over no answers")
    counts = Counter(normalize(a) if normalize else a for a in answers)
    best = max(counts, key=lambda a: counts[a])  # Counter keeps first-seen order, and max keeps the first best
    return best, counts[best] / len(answers)
