"""`lmforge data ...`: the command-line shell over lmforge.data (corpus preparation for pre-training)."""

from __future__ import annotations

import argparse
from typing import Any

PREPARE_HELP = """Clean, deduplicate, filter and tokenise text files into memory-mapped token shards for pre-training.

SRC: .txt/.md files (one document each), .jsonl (one document per line, the text in --field), .parquet (one
per row, the text in column --field), or folders of them (recursive). Each kept document is NFC-normalised,
control characters but newline and tab dropped, tokenised without BOS/CLS and followed by the tokenizer's
separator (eos, else [SEP], </s> or <|endoftext|>). OUT gets meta.json, stats.json, a copy of the tokenizer
and train/ + val/ shards (uint16, or uint32 for vocabularies over 65536). Rerunning an interrupted command
resumes it, and gives the same bytes as an uninterrupted run."""


def _int_at_least(low: int) -> Any:
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value[:40]!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {n}")
        return n

    return parse


def _fraction(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value[:40]!r}") from None
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return x


# prepare's keyword options, forwarded only when given: the defaults live in prepare() alone (the help text
# quotes them; tests check it does so truly), and this module imports nothing heavy, so `lmforge --help` is quick
OPTIONS = ("field", "val_fraction", "shard_tokens", "workers", "min_chars", "min_words", "max_dup_line_fraction",
           "max_top_ngram_fraction", "near_dup_threshold", "overwrite")


def add_data_commands(subparsers: Any) -> None:
    """Register `lmforge data prepare` on an argparse subparsers object."""
    data = subparsers.add_parser("data", help="corpus preparation: clean, dedup, filter, tokenise into shards")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    p = commands.add_parser("prepare", help="text files -> deduplicated, filtered token shards + train/val split",
                            description=PREPARE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                            argument_default=argparse.SUPPRESS)
    p.add_argument("sources", nargs="+", metavar="SRC", help="files or folders (.txt, .md, .jsonl, .parquet)")
    p.add_argument("--tokenizer", required=True, help="a tokenizer.json, or a folder holding one (an HF model)")
    p.add_argument("--out", required=True, help="output folder (new or empty; or the same run, to resume)")
    p.add_argument("--field", help="the text field of .jsonl rows / column of .parquet files (default: text)")
    p.add_argument("--val-fraction", type=_fraction,
                   help="share of documents for validation, picked by a hash of each text (default: 0.01)")
    p.add_argument("--shard-tokens", type=_int_at_least(1), help="tokens per shard (default: 16777216)")
    p.add_argument("--workers", type=_int_at_least(1), help="worker processes (default: min(CPUs, 4))")
    p.add_argument("--min-chars", type=_int_at_least(0), help="drop shorter documents (default: 20)")
    p.add_argument("--min-words", type=_int_at_least(0),
                   help="drop documents with fewer whitespace-separated words (default: 4; 0 for unspaced scripts)")
    p.add_argument("--max-dup-line-fraction", type=_fraction,
                   help="drop documents whose repeated lines hold more of the characters (default: 0.3)")
    p.add_argument("--max-top-ngram-fraction", type=_fraction,
                   help="drop documents of 30+ words whose most frequent word 3-gram covers more (default: 0.2)")
    p.add_argument("--near-dup-threshold", type=_fraction,
                   help="MinHash Jaccard similarity over word 5-grams from which a document is a near duplicate "
                   "of an earlier one (default: 0.8)")
    p.add_argument("--no-near-dedup", action="store_true", help="exact dedup only")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset in OUT that was made otherwise")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    from lmforge.data.prepare import prepare

    options = {name: getattr(args, name) for name in OPTIONS if hasattr(args, name)}
    if getattr(args, "no_near_dedup", False):
        options["near_dup_threshold"] = None
    stats = prepare(args.sources, args.tokenizer, args.out, **options)
    _print_summary(stats, args.out)
    return 0


def _print_summary(stats: dict[str, Any], out: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"prepared {out}", show_header=False)
    table.add_row("documents read", f"{stats['docs_in']:,}")
    for reason, n in stats["dropped"].items():
        table.add_row(f"  dropped: {reason.replace('_', ' ')}", f"{n:,}")
    table.add_row("documents kept", f"{stats['docs_out']:,}")
    for name, split in stats["splits"].items():
        table.add_row(name, f"{split['docs']:,} docs, {split['tokens']:,} tokens, {split['shards']:,} shards")
    console = Console()
    console.print(table)
    if stats["splits"]["val"]["docs"] == 0:
        Console(stderr=True).print("note: the validation split is empty (raise --val-fraction for a small corpus)")
