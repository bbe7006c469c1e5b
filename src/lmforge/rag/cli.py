"""`lmforge rag index|search|ask`: thin shells over lmforge.rag (`lmforge eval rag` lives in lmforge.eval.cli)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lmforge.errors import LmforgeError


def _positive(value: str) -> int:
    from lmforge.cli import _positive_int

    return _positive_int(value)


def cmd_index(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from lmforge.rag.index import index_paths
    from lmforge.rag.store import open_store

    new_file = None if "://" in args.store or Path(args.store).expanduser().exists() else Path(args.store).expanduser()
    store = open_store(args.store)
    try:
        report = index_paths(args.paths, store, args.embed_model, args.chunk_size, args.overlap,
                             progress=sys.stderr.isatty())
    except BaseException:
        store.close()
        if new_file is not None:  # a first run that failed leaves no store behind
            for leftover in (new_file, Path(f"{new_file}-wal"), Path(f"{new_file}-shm")):
                leftover.unlink(missing_ok=True)
        raise
    store.close()
    files = len(report.added) + len(report.updated) + report.unchanged
    Console(stderr=True).print(
        f"{args.store}: {files} file{'s' if files != 1 else ''} ({len(report.added)} added, {len(report.updated)} "
        f"updated, {report.unchanged} unchanged), {len(report.removed)} removed; {report.chunks} chunks written, "
        f"{report.total} in the store", soft_wrap=True)
    return 0


def _hit_dict(h: Any) -> dict[str, Any]:
    return {"rank": h.rank, "score": h.score, "source": h.source, "title": h.title, "text": h.text,
            "start": h.start, "end": h.end}


def cmd_search(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from lmforge.rag.retrieve import search
    from lmforge.rag.store import open_store

    store = open_store(args.store, create=False)
    try:
        hits = search(store, args.query, args.k, args.mode, args.source)
    finally:
        store.close()
    if args.format == "json":
        print(json.dumps([_hit_dict(h) for h in hits], ensure_ascii=False))
        return 0
    if not hits:
        print("no matching chunks", file=sys.stderr)
        return 0
    table = Table(title=f"{args.mode} search: {args.query}")
    for column in ("#", "score", "source", "title", "text"):
        table.add_column(column, overflow="fold")
    for h in hits:
        text = " ".join(h.text.split())
        table.add_row(str(h.rank), f"{h.score:.4f}", h.source, h.title, text[:200] + ("..." if len(text) > 200 else ""))
    Console().print(table)
    return 0


def _generator(args: argparse.Namespace) -> Any:
    from lmforge.cli import _load, _remote, _sampling
    from lmforge.rag.answer import local_generator, remote_generator

    params = _sampling(args)
    if args.api_base:
        return remote_generator(_remote(args), params)
    model, tokenizer = _load(args)
    if not tokenizer.chat_template:
        raise LmforgeError(f"{args.model} has no chat template: answers need a chat model")
    return local_generator(model, tokenizer, params)


def cmd_ask(args: argparse.Namespace) -> int:
    from lmforge.rag.answer import answer
    from lmforge.rag.store import open_store

    store = open_store(args.store, create=False)
    try:
        generate = _generator(args)
        streaming = args.format == "text"

        def show(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        result = answer(args.question, store, generate, args.k, args.min_score, source_glob=args.source,
                        on_text=show if streaming else None, min_support=args.min_support)
    finally:
        store.close()
    if args.format == "json":
        print(json.dumps({
            "answer": result.text, "found": result.found, "cited": result.cited,
            "groundedness": result.groundedness,
            "sentences": [{"text": s.text, "supported": s.supported, "similarity": s.similarity,
                           "source": s.source} for s in result.sentences],
            "sources": [{**_hit_dict(h), "similarity": h.similarity} for h in result.sources],
        }, ensure_ascii=False))
        return 0
    print()
    if not result.found:
        return 0
    print("\nSources:")
    for h in result.sources:
        mark = "*" if h.rank in result.cited else " "
        print(f"{mark}[{h.rank}] {h.title} ({h.source}:{h.start}-{h.end})")
    unsupported = [s for s in result.sentences if not s.supported]
    print(f"\ngroundedness {result.groundedness:.0%} ({len(result.sentences) - len(unsupported)} of "
          f"{len(result.sentences)} sentences supported by the sources)")
    for s in unsupported:
        print(f"  unsupported: {s.text}")
    return 0


def _add_store(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", "-s", required=True, help="a SQLite file (created on first index) or a postgresql:// URL")


def _add_answer_args(p: argparse.ArgumentParser) -> None:
    from lmforge.cli import _add_model_args, _add_remote_args, _add_sampling_args

    _add_model_args(p)
    _add_sampling_args(p, max_new_tokens=256)
    _add_remote_args(p)
    p.add_argument("--k", type=_positive, default=4, help="chunks put in the prompt (default 4)")


def add_rag_commands(sub: argparse._SubParsersAction) -> None:
    from lmforge.cli import Parser
    from lmforge.weights.registry import DEFAULT_EMBED_MODEL

    rag = sub.add_parser("rag", help="retrieval-augmented generation: index documents, search them, ask questions")
    rag_sub = rag.add_subparsers(dest="rag_command", required=True, parser_class=Parser)

    p = rag_sub.add_parser("index", help="index .txt/.md/.html/.pdf/.jsonl files and folders (incremental)")
    p.add_argument("paths", nargs="+")
    _add_store(p)
    p.add_argument("--embed-model", default=None, help=f"embedding model (default {DEFAULT_EMBED_MODEL}; fixed per "
                   "store)")
    p.add_argument("--chunk-size", type=_positive, default=200, help="tokens per chunk (default 200)")
    p.add_argument("--overlap", type=int, default=40, help="tokens repeated between neighbouring chunks (default 40)")
    p.set_defaults(func=cmd_index)

    p = rag_sub.add_parser("search", help="the best chunks for a query (BM25 + dense, fused)")
    p.add_argument("query")
    _add_store(p)
    p.add_argument("--k", type=_positive, default=5)
    p.add_argument("--mode", choices=["hybrid", "bm25", "dense"], default="hybrid")
    p.add_argument("--source", default=None, metavar="GLOB", help="only chunks whose source path matches")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_search)

    p = rag_sub.add_parser("ask", help="answer from the indexed documents, citing them as [n]")
    p.add_argument("question")
    _add_store(p)
    _add_answer_args(p)
    p.add_argument("--min-score", type=float, default=0.25,
                   help="below this cosine similarity of the best chunk, say nothing was found (default 0.25)")
    p.add_argument("--source", default=None, metavar="GLOB", help="only chunks whose source path matches")
    p.add_argument("--min-support", type=float, default=0.6,
                   help="grounding: a sentence is supported by a chunk this close (cosine; or holding most of its "
                   "words) (default 0.6)")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_ask)
