"""`lmforge eval` (a model on a data file: lmforge.eval.harness) and `lmforge eval rag` (lmforge.eval.rag)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lmforge.errors import LmforgeError

KIND_HELP = ("generate: answers scored against the target (--metric); choice: the option the model finds most "
             'likely among the row\'s "options"; classify: choice among --labels; perplexity: of a text file')


def cmd_eval(args: argparse.Namespace) -> int:
    from lmforge.cli import _load, _remote, _sampling
    from lmforge.eval.harness import check_options, evaluate_examples, evaluate_perplexity, read_examples, read_text
    from lmforge.model_info import require_generator

    if args.data is None:
        raise LmforgeError("name the data: lmforge eval --data FILE --kind KIND (or a subcommand: lmforge eval rag)")
    labels = [label.strip() for label in args.labels.split(",")] if args.labels is not None else None
    check_options(args.kind, args.metric, labels, bool(args.api_base), args.out, args.window, args.stride)
    params = _sampling(args)
    # the data is read (and every bad row refused) before the slow model load
    data = read_text(args.data) if args.kind == "perplexity" else read_examples(args.data, args.kind, labels,
                                                                                   args.limit)
    model = tokenizer = client = None
    if args.api_base:
        client = _remote(args)
    else:
        require_generator(args.model)
        model, tokenizer = _load(args)
    if isinstance(data, str):
        assert model is not None and tokenizer is not None
        result = evaluate_perplexity(model, tokenizer, data, args.window, args.stride, args.limit)
    else:
        result = evaluate_examples(data, args.kind, model, tokenizer, client, args.metric, params, args.out,
                                   args.batch_size, progress=sys.stderr.isatty())
    summary = result.summary()
    if args.format == "json":
        print(json.dumps(summary))
        return 0
    _print_table(f"{args.kind} eval: {args.data}", summary)
    return 0


def _print_table(title: str, summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("metric", "score", "95% interval"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    if summary["kind"] == "perplexity":
        table.add_row("perplexity", f"{summary['perplexity']:.4f}", "")
        table.add_row("bits/token", f"{summary['bits_per_token']:.4f}", "")
        table.add_row("tokens", str(summary["tokens"]), "")
    else:
        table.add_row(summary["metric"], f"{summary['score']:.3f}",
                      f"[{summary['ci_low']:.3f}, {summary['ci_high']:.3f}]")
        if "acc_norm" in summary:
            table.add_row("acc_norm", f"{summary['acc_norm']:.3f}",
                          f"[{summary['acc_norm_ci_low']:.3f}, {summary['acc_norm_ci_high']:.3f}]")
        table.add_row("n", str(summary["n"]), "")
    Console().print(table)


def cmd_eval_rag(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from lmforge.eval.rag import evaluate_rag, read_qa
    from lmforge.rag.cli import _generator
    from lmforge.rag.store import open_store

    rows = read_qa(args.qa)
    store = open_store(args.store, create=False)
    try:
        generate = None if args.retrieval_only else _generator(args)
        result = evaluate_rag(store, rows, generate, args.k, progress=sys.stderr.isatty())
    finally:
        store.close()
    if args.out:
        from pathlib import Path

        Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result["rows"]),
                                  encoding="utf-8")
    summary = result["summary"]
    if args.format == "json":
        print(json.dumps(summary))
        return 0
    table = Table(title=f"RAG evaluation: {args.qa} ({summary['n']} questions)", show_header=False)
    for key, value in summary.items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    Console().print(table)
    return 0


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    from lmforge.cli import Parser, _add_model_args, _add_remote_args, _add_sampling_args, _positive_int
    from lmforge.eval.harness import KINDS, METRICS
    from lmforge.rag.cli import _add_answer_args, _add_store

    ev = sub.add_parser(
        "eval", help="evaluate a model on a data file (generate / choice / classify / perplexity), or RAG (eval rag)",
        description="Score a model on a JSONL file of rows ({\"input\",\"target\"}, {\"instruction\",\"input\","
        "\"output\"} or {\"prompt\",\"completion\"}; choice rows add \"options\"), or on a text file (perplexity), "
        "with a 95% bootstrap interval. Options go before a subcommand; `lmforge eval rag --help` for RAG.")
    _add_model_args(ev)
    ev.add_argument("--data", "-d", default=None, metavar="FILE", help="JSONL rows (a text file for perplexity)")
    ev.add_argument("--kind", choices=KINDS, default="generate", help=KIND_HELP + " (default generate)")
    ev.add_argument("--metric", choices=list(METRICS), default=None,
                    help="generate: exact, contains (whole words), f1 (word overlap), regex (the target searched in "
                    "the output); after lower-casing and trimming spaces and punctuation (default exact)")
    ev.add_argument("--labels", default=None, metavar="A,B,...", help="classify: the options of every row")
    ev.add_argument("--out", "-o", default=None, metavar="FILE",
                    help="per-example records (JSONL); a rerun with the same FILE resumes, scoring only new rows")
    ev.add_argument("--format", choices=["table", "json"], default="table")
    ev.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                    help="only the first N rows (perplexity: tokens)")
    ev.add_argument("--batch-size", type=_positive_int, metavar="N", default=32,
                    help="rows generated together (default 32)")
    ev.add_argument("--window", type=_positive_int, metavar="N", default=None,
                    help="perplexity: tokens of context per forward (default: the model's context)")
    ev.add_argument("--stride", type=_positive_int, metavar="N", default=None,
                    help="perplexity: tokens the window moves by (default: half the window)")
    _add_sampling_args(ev, max_new_tokens=128)
    ev.set_defaults(temperature=0.0, func=cmd_eval)  # greedy: a score should not depend on the draw
    for action in ev._actions:
        if action.dest == "temperature":
            action.help = "0 = greedy (the default here)"
    _add_remote_args(ev)

    ev_sub = ev.add_subparsers(dest="eval_command", required=False, parser_class=Parser, title="subcommands",
                               metavar="{rag}")
    p = ev_sub.add_parser("rag", help='recall@k, MRR, exact match/F1, groundedness over {"question","answer",'
                          '"source"} rows')
    _add_store(p)
    p.add_argument("--qa", required=True, help="JSONL of question / answer / source rows")
    _add_answer_args(p)
    p.add_argument("--retrieval-only", action="store_true", help="recall and MRR only: no answers generated")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--out", default=None, help="per-question results (JSONL)")
    p.set_defaults(func=cmd_eval_rag)
