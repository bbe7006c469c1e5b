"""`lmforge explain`: the command-line shell over lmforge.eval.explain (token log-probs, logit lens, attention)."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from lmforge.errors import LmforgeError


def _probability(value: str) -> float:
    try:
        p = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability, got {value[:40]!r}") from None
    if not 0 <= p <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value[:40]}")
    return p


def add_explain_command(sub: argparse._SubParsersAction) -> None:
    from lmforge.cli import _add_model_args, _logprobs, _non_negative_int

    p = sub.add_parser(
        "explain", help="a look inside the model: token log-probs, logit lens, attention maps",
        description="Each token of TEXT with its log-probability given the tokens before it (and, with --generate, "
        "the greedy answer's tokens with the engine's log-probs); tokens below --low are marked. --lens shows the "
        "top token of every layer at every position (logit lens); --png saves one head's attention as a heat map.")
    _add_model_args(p)
    p.add_argument("text")
    p.add_argument("--chat", action="store_true", help="render TEXT as one user turn of the chat template")
    p.add_argument("--system", default=None, help="system prompt for --chat")
    p.add_argument("--generate", type=_non_negative_int, default=0, metavar="N",
                   help="also generate N answer tokens (greedy) and report theirs")
    p.add_argument("--top", type=_logprobs, default=3, metavar="K", help="alternatives shown per token (0..20)")
    p.add_argument("--low", type=_probability, default=0.1, metavar="P",
                   help="mark tokens whose probability is below P (default 0.1)")
    p.add_argument("--lens", action="store_true", help="logit lens: each layer's top token at each position")
    p.add_argument("--layer", type=int, default=None, metavar="L",
                   help="attention map: decoder layer (0-based; with --head and --png)")
    p.add_argument("--head", type=int, default=None, metavar="H",
                   help="attention map: head (0-based)")
    p.add_argument("--png", default=None, metavar="FILE", help="write the attention heat map here")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    from lmforge.cli import _load
    from lmforge.eval.explain import attention_map, logit_lens, save_attention_png, token_report
    from lmforge.model_info import require_generator

    attention = (args.layer, args.head, args.png)
    if any(a is not None for a in attention) and any(a is None for a in attention):
        raise LmforgeError("an attention map needs all of --layer L, --head H and --png FILE")
    if args.system is not None and not args.chat:
        raise LmforgeError("--system needs --chat (a system prompt is part of the chat template)")
    if not args.text:
        raise LmforgeError("empty text: nothing to explain")
    require_generator(args.model)  # an encoder is refused before its weights load
    model, tokenizer = _load(args)
    report = token_report(model, tokenizer, args.text, chat=args.chat, generate=args.generate, top=args.top,
                          low=args.low, system=args.system)
    ids = [t.id for t in report]
    pieces = [t.token for t in report]
    result: dict[str, Any] = {"tokens": [t.as_dict() for t in report]}
    if args.lens:
        result["lens"] = logit_lens(model, tokenizer, ids).tokens
    if args.png is not None:
        weights = attention_map(model, ids, args.layer, args.head)
        width, height = save_attention_png(weights, pieces, args.png, f"layer {args.layer}, head {args.head}")
        result["attention"] = {"layer": args.layer, "head": args.head, "png": args.png, "width": width,
                               "height": height}
    if args.format == "json":
        print(json.dumps(result, ensure_ascii=False))
    else:
        _print_tables(result, args.low)
    return 0


def _shown(token: str) -> str:
    from rich.markup import escape

    return escape(repr(token)[1:-1])  # whitespace and control characters visible, rich markup literal


def _print_tables(result: dict[str, Any], low: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"token log-probabilities (red: p < {low:g})")
    for column in ("#", "token", "logprob", "p", "top alternatives"):
        table.add_column(column, justify="right" if column in ("#", "logprob", "p") else "left")
    for t in result["tokens"]:
        logprob = "" if t["logprob"] is None else f"{t['logprob']:.3f}"
        prob = "" if t["logprob"] is None else f"{math.exp(t['logprob']):.3f}"
        alternatives = "  ".join(f"{_shown(a['token'])} {math.exp(a['logprob']):.2f}" for a in t["top"])
        style = "red" if t["low"] else ("bold" if t["generated"] else None)
        table.add_row(str(t["position"]), _shown(t["token"]), logprob, prob, alternatives, style=style)
    console.print(table)
    if "lens" in result:
        lens = Table(title="logit lens: top token after each layer (rows) at each position (columns)")
        lens.add_column("layer", justify="right")
        for t in result["tokens"]:
            lens.add_column(_shown(t["token"]))
        for layer, row in enumerate(result["lens"]):
            lens.add_row(str(layer), *(_shown(token) for token in row))
        console.print(lens)
    if "attention" in result:
        a = result["attention"]
        console.print(f"attention of layer {a['layer']}, head {a['head']}: {a['png']} ({a['width']}x{a['height']})")
