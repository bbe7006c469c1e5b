"""`lmforge embed`: the command-line shell over lmforge.embeddings.embed."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.precision import DTYPE_CHOICES
from lmforge.textio import check_arguments, read_stdin, read_text_file
from lmforge.weights.registry import DEFAULT_EMBED_MODEL


def add_embed_command(subparsers: Any) -> None:
    """Register `lmforge embed` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "embed",
        help="sentence embeddings of texts (one row per text)",
        description="Sentence embeddings of the texts given as arguments, or of each line of --file "
        "(- = stdin). json prints a list of lists; npy writes a binary float32 (n, dim) array.",
    )
    p.add_argument("texts", nargs="*", help="texts to embed")
    p.add_argument("--file", "-f", help="embed each line of this file (- = stdin)")
    p.add_argument("--model", "-m", default=DEFAULT_EMBED_MODEL, help="encoder: short name, HF folder or hub id")
    p.add_argument("--format", choices=["json", "npy"], default="json")
    p.add_argument("--output", "-o", help="write here instead of stdout")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES[1:],
                   help="float32 (default: cosine 1.0 against sentence-transformers), bfloat16, int8 or int4 weights")
    p.set_defaults(func=cmd_embed)


def _read_texts(args: argparse.Namespace) -> list[str]:
    if args.file and args.texts:
        raise LmforgeError("give texts as arguments or --file, not both")
    if args.file:
        content = read_stdin() if args.file == "-" else read_text_file(args.file)
        texts = content.splitlines()  # one text per line, blank lines included, so row i is line i
    else:
        texts = check_arguments(list(args.texts))
    if not texts:
        raise LmforgeError("no texts to embed: pass them as arguments or with --file")
    return texts


def cmd_embed(args: argparse.Namespace) -> int:
    from lmforge.embeddings import embed

    texts = _read_texts(args)
    if args.batch_size < 1:
        raise LmforgeError(f"--batch-size must be >= 1, got {args.batch_size}")
    vectors = embed(texts, model=args.model, batch_size=args.batch_size, dtype=args.dtype, progress=True)
    if args.format == "json":
        payload = (json.dumps(vectors.tolist()) + "\n").encode()
    else:
        import numpy as np

        buffer = io.BytesIO()
        np.save(buffer, vectors, allow_pickle=False)
        payload = buffer.getvalue()
    if args.output:
        try:
            Path(args.output).write_bytes(payload)  # exactly this path: np.save would append .npy
        except OSError as e:
            raise LmforgeError(f"cannot write {args.output}: {e}") from None
        return 0
    if args.format == "json":
        sys.stdout.write(payload.decode())
        return 0
    if sys.stdout.isatty():
        raise LmforgeError("refusing to write binary .npy to a terminal; use --output PATH or a pipe")
    sys.stdout.flush()
    sys.stdout.buffer.write(payload)
    sys.stdout.buffer.flush()
    return 0
