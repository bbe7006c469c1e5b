"""`lmforge eval` (a model on a data file: lmforge.eval.harness), `lmforge eval compare` (prompt variants side by
side: lmforge.eval.compare) and `lmforge eval rag` (lmforge.eval.rag)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from contextlib import contextmanager
from typing import Any

from lmforge.errors import LmforgeError

KIND_HELP = ("generate: answers scored against the target (--metric); choice: the option the model finds most "
             'likely among the row\'s "options"; classify: choice among --labels; perplexity: of a text file')


@contextmanager
def _warnings_as_lines():
    """Warnings (shots dropped to fit the context) as `warning: ...` lines on stderr, not Python's file:line form."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
        yield


def _default_temperature(args: argparse.Namespace, samples: int) -> None:
    # greedy unless asked: a score should not depend on the draw; but N greedy samples would be one answer N times
    if args.temperature is None:
        args.temperature = 0.7 if samples > 1 else 0.0
    if samples > 1 and args.temperature == 0:
        raise LmforgeError(f"--samples {samples} needs a temperature > 0: greedy answers are all the same")


def _prompt_spec(args: argparse.Namespace) -> Any:
    """--template/--shots/--pool/--select as a harness.PromptSpec (None when none is given)."""
    from lmforge.eval.harness import PromptSpec

    if (args.pool is None) != (args.shots == 0):
        raise LmforgeError("--shots K and --pool FILE go together")
    if args.template is None and not args.shots:
        if args.select != "first":
            raise LmforgeError("--select needs --shots K and --pool FILE")
        return None
    return PromptSpec(args.template, args.shots, args.pool, args.select, args.seed if args.seed is not None else 0,
                      args.embed_model)


def cmd_eval(args: argparse.Namespace) -> int:
    from lmforge.cli import _load, _remote, _sampling
    from lmforge.eval.harness import check_options, evaluate_examples, evaluate_perplexity, read_examples, read_text
    from lmforge.model_info import require_generator

    if args.data is None:
        raise LmforgeError("name the data: lmforge eval --data FILE --kind KIND (or a subcommand: lmforge eval "
                           "compare / rag)")
    labels = [label.strip() for label in args.labels.split(",")] if args.labels is not None else None
    spec = _prompt_spec(args)
    check_options(args.kind, args.metric, labels, bool(args.api_base), args.out, args.window, args.stride,
                  spec is not None, args.samples)
    _default_temperature(args, args.samples)
    params = _sampling(args)
    # the data, template and pool are read (and every bad row refused) before the slow model load
    data = read_text(args.data) if args.kind == "perplexity" else read_examples(args.data, args.kind, labels,
                                                                                   args.limit)
    if spec is not None:
        from dataclasses import replace

        template, pool = spec.load()
        spec = replace(spec, template=template, pool=pool)  # checked before the model load, and read once
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
        with _warnings_as_lines():
            result = evaluate_examples(data, args.kind, model, tokenizer, client, args.metric, params, args.out,
                                       args.batch_size, sys.stderr.isatty(), spec, args.samples)
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


def cmd_eval_compare(args: argparse.Namespace) -> int:
    from lmforge.cli import _sampling
    from lmforge.eval.compare import best, compare, parse_variant, plot

    variants = [parse_variant(v) for v in args.variant]
    labels = [label.strip() for label in args.labels.split(",")] if args.labels is not None else None
    temperature = args.temperature
    args.temperature = temperature if temperature is not None else 0.0  # per variant in compare(); checked here
    params = _sampling(args)
    with _warnings_as_lines():
        results = compare(args.data, args.kind, variants, args.model, args.pool, args.metric, labels, params,
                          temperature, args.limit, args.batch_size, args.embed_model, args.dtype,
                          progress=sys.stderr.isatty())
    top = best(results)
    title = f"{args.kind} compare: {args.data}"
    png = plot(results, args.png, title)
    rows = [{**r.row(), "best": i == top} for i, r in enumerate(results)]
    if args.format == "json":
        print(json.dumps({"kind": args.kind, "data": str(args.data), "variants": rows, "png": str(png)}))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=f"* best; chart: {png}")
    for column in ("variant", "score", "ci_low", "ci_high", "n"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in rows:
        mark = " *" if row["best"] else ""
        table.add_row(row["variant"] + mark, f"{row['score']:.3f}", f"{row['ci_low']:.3f}", f"{row['ci_high']:.3f}",
                      str(row["n"]), style="bold" if row["best"] else None)
    Console().print(table)
    return 0


def _add_compare_command(ev_sub: argparse._SubParsersAction) -> None:
    from lmforge.cli import _add_model_args, _add_sampling_args, _positive_int
    from lmforge.eval.harness import METRICS
    from lmforge.weights.registry import DEFAULT_EMBED_MODEL

    p = ev_sub.add_parser(
        "compare", help="prompt variants (template, shots, selection, model, samples) on the same rows",
        description="Score prompt variants on the same rows: a table of score and 95% interval per variant (the "
        "best marked) and a bar chart. A variant is NAME:key=value,... with keys template (FILE), shots (K, from "
        "--pool), select (first/random/similar), seed, model, samples; e.g. --variant zero --variant "
        "three:shots=3,select=similar. Its options go after `compare`.")
    _add_model_args(p)
    p.add_argument("--data", "-d", required=True, metavar="FILE", help="JSONL rows, as lmforge eval")
    p.add_argument("--kind", choices=["generate", "choice", "classify"], default="generate")
    p.add_argument("--variant", "-V", action="append", required=True, metavar="NAME:KEY=VALUE,...",
                   help="a prompt variant (repeatable)")
    p.add_argument("--pool", default=None, metavar="FILE", help="JSONL of labelled rows the variants' shots come from")
    p.add_argument("--metric", choices=list(METRICS), default=None, help="generate: as lmforge eval (default exact)")
    p.add_argument("--labels", default=None, metavar="A,B,...", help="classify: the options of every row")
    p.add_argument("--limit", type=_positive_int, default=None, metavar="N", help="only the first N rows")
    p.add_argument("--batch-size", type=_positive_int, metavar="N", default=32)
    p.add_argument("--embed-model", default=DEFAULT_EMBED_MODEL, help="select=similar: the sentence encoder")
    p.add_argument("--png", default="compare.png", metavar="FILE", help="the bar chart (default compare.png)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    _add_sampling_args(p, max_new_tokens=128)
    p.set_defaults(temperature=None, func=cmd_eval_compare)
    _temperature_help(p)


def _add_prompt_args(p: argparse.ArgumentParser) -> None:
    from lmforge.cli import _non_negative_int
    from lmforge.prompt_cli import SELECTIONS
    from lmforge.weights.registry import DEFAULT_EMBED_MODEL

    p.add_argument("--template", default=None, metavar="FILE",
                   help="build each row's prompt with this .jinja template (lmforge prompt render's format)")
    p.add_argument("--shots", type=_non_negative_int, default=0, metavar="K", help="K examples from --pool per row")
    p.add_argument("--pool", default=None, metavar="FILE", help="JSONL of labelled rows to draw the shots from")
    p.add_argument("--select", choices=SELECTIONS, default="first",
                   help="which shots: the pool's first K, a seeded random K (--seed), the K most similar to the row")
    p.add_argument("--embed-model", default=DEFAULT_EMBED_MODEL, help="--select similar: the sentence encoder")


def _temperature_help(p: argparse.ArgumentParser) -> None:
    for action in p._actions:
        if action.dest == "temperature":
            action.help = "0 = greedy (the default here; 0.7 with --samples N > 1)"


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
    _add_prompt_args(ev)
    ev.add_argument("--samples", type=_positive_int, metavar="N", default=1,
                    help="generate: sample N answers per row and score their majority vote (self-consistency)")
    _add_sampling_args(ev, max_new_tokens=128)
    ev.set_defaults(temperature=None, func=cmd_eval)  # resolved by _default_temperature
    _temperature_help(ev)
    _add_remote_args(ev)

    ev_sub = ev.add_subparsers(dest="eval_command", required=False, parser_class=Parser, title="subcommands",
                               metavar="{compare,rag}")
    _add_compare_command(ev_sub)
    p = ev_sub.add_parser("rag", help='recall@k, MRR, exact match/F1, groundedness over {"question","answer",'
                          '"source"} rows')
    _add_store(p)
    p.add_argument("--qa", required=True, help="JSONL of question / answer / source rows")
    _add_answer_args(p)
    p.add_argument("--retrieval-only", action="store_true", help="recall and MRR only: no answers generated")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--out", default=None, help="per-question results (JSONL)")
    p.set_defaults(func=cmd_eval_rag)
