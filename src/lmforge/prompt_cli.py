"""`lmforge prompt render`: the command-line shell over lmforge.prompts."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.textio import check_text, read_text_file

SELECTIONS = ("first", "random", "similar")  # prompts.SELECTIONS, not imported: --help must not load numpy/jinja2


def _count(value: str) -> int:
    from lmforge.cli import _non_negative_int

    return _non_negative_int(value)


def _positive(value: str) -> int:
    from lmforge.cli import _positive_int

    return _positive_int(value)


def _seed_value(value: str) -> int:
    from lmforge.cli import _seed

    return _seed(value)


def add_prompt_command(subparsers: Any) -> None:
    """Register `lmforge prompt` (subcommand: render) on an argparse subparsers object."""
    from lmforge.weights.registry import DEFAULT_CHAT_MODEL, DEFAULT_EMBED_MODEL

    p = subparsers.add_parser("prompt", help="prompt templates and few-shot prompts (render)")
    sub = p.add_subparsers(dest="prompt_command", required=True)
    r = sub.add_parser(
        "render", help="print the exact text a model would see for a template, variables and shots",
        description="Render a prompt template (jinja2 blocks: system, instruction, example, input; see "
        "lmforge.prompts) to the exact text the model sees, through its chat template when it has one. The token "
        "count, and any shots dropped to fit the context, go to stderr.",
    )
    r.add_argument("--template", "-t", default=None, help="a .jinja template file (default: instruction + input)")
    r.add_argument("--vars", required=True, metavar="JSON",
                   help='the template variables: a JSON object, or @file.json (e.g. \'{"input": "2+2?"}\')')
    r.add_argument("--model", "-m", default=DEFAULT_CHAT_MODEL,
                   help="whose tokenizer and chat template (only those are loaded, not the weights)")
    r.add_argument("--no-chat", action="store_true", help="plain text even when the model has a chat template")
    r.add_argument("--shots", type=_count, default=0, help="how many examples from --pool (default 0)")
    r.add_argument("--pool", default=None, help="JSONL of labelled rows: {input,target}, {instruction,input?,output}"
                   " or {prompt,completion}")
    r.add_argument("--select", choices=SELECTIONS, default="first",
                   help="which shots: the first K, a seeded random K, or the K most similar to the input")
    r.add_argument("--seed", type=_seed_value, default=None, help="--select random: the seed")
    r.add_argument("--embed-model", default=DEFAULT_EMBED_MODEL, help="--select similar: the sentence encoder")
    r.add_argument("--max-new-tokens", type=_positive, default=256,
                   help="room left for the answer: shots are dropped until the prompt fits the context minus this")
    r.set_defaults(func=cmd_prompt_render)


def read_vars(spec: str) -> dict[str, Any]:
    """--vars: a JSON object given inline or as @file.json."""
    source = "--vars"
    if spec.startswith("@"):
        source = spec[1:]
        text = read_text_file(source)
    else:
        text = check_text(spec, "--vars")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{source} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(value, dict):
        from lmforge.textio import json_type

        raise LmforgeError(f"{source} must be a JSON object of template variables, not {json_type(value)}")
    return value


def cmd_prompt_render(args: argparse.Namespace) -> int:
    from lmforge.prompts import build_prompt, load_template, load_tokenizer, read_pool, select_shots

    if (args.pool is None) != (args.shots == 0):
        raise LmforgeError("--shots K and --pool FILE go together")
    if args.seed is not None and args.select != "random":
        raise LmforgeError("--seed is for --select random")
    variables = read_vars(args.vars)
    template = load_template(args.template)  # a bad template is refused before the tokenizer loads
    tokenizer, context = load_tokenizer(args.model)
    if args.max_new_tokens >= context:
        raise LmforgeError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                           f"context of {context} tokens")
    shots = []
    if args.pool is not None:
        query = variables.get("input")
        if not isinstance(query, str):
            raise LmforgeError("--shots needs the query as a string variable 'input' in --vars")
        shots = select_shots(read_pool(args.pool), query, args.shots, args.select, args.seed, args.embed_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dropped shots are reported below, on one line
        prompt = build_prompt(template, variables, shots, tokenizer, chat=False if args.no_chat else None,
                              max_tokens=context - args.max_new_tokens)
    sys.stdout.write(prompt.text)
    if sys.stdout.isatty() and not prompt.text.endswith("\n"):
        sys.stdout.write("\n")  # keeps the shell prompt off the text; a pipe gets the text exactly
    sys.stdout.flush()
    kind = "chat" if prompt.chat else "plain"
    note = f", {prompt.dropped} dropped to fit {context - args.max_new_tokens} tokens" if prompt.dropped else ""
    used = len(prompt.shots_used)
    print(f"{len(prompt.ids)} tokens ({kind}, {used} shot{'' if used == 1 else 's'}{note})", file=sys.stderr)
    return 0
