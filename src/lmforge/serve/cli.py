"""`lmforge serve`: a thin shell over lmforge.serve.server.serve."""

from __future__ import annotations

import argparse
import os

from lmforge.errors import LmforgeError


def cmd_serve(args: argparse.Namespace) -> int:
    from lmforge.model_info import require_generator
    from lmforge.serve.app import ServeOptions
    from lmforge.serve.server import feedback_path, serve

    require_generator(args.model)
    keys = list(args.api_key) or ([os.environ["LMFORGE_API_KEY"]] if os.environ.get("LMFORGE_API_KEY") else [])
    if args.max_tokens < 1 or args.max_batch < 1 or args.max_queue < 0:
        raise LmforgeError("--max-tokens and --max-batch must be >= 1, --max-queue >= 0")
    if not 0 < args.port < 65536:
        raise LmforgeError(f"--port must be in [1, 65535], got {args.port}")
    embed = None if args.embed_model.lower() in ("", "none") else args.embed_model
    options = ServeOptions(
        name=args.served_name or args.model, embed_name=embed, api_keys=keys, max_batch=args.max_batch,
        max_queue=args.max_queue, max_tokens=args.max_tokens, feedback=feedback_path(args.feedback),
        shutdown_grace=args.shutdown_grace, rag_store=args.rag,
    )
    serve(args.model, args.dtype, options, embed, host=args.host, port=args.port)
    return 0


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    from lmforge.cli import _add_model_args
    from lmforge.weights.registry import DEFAULT_EMBED_MODEL

    p = sub.add_parser("serve", help="OpenAI-compatible API (continuous batching) and a chat page in the browser")
    _add_model_args(p)
    p.add_argument("--embed-model", default=DEFAULT_EMBED_MODEL, help="served at /v1/embeddings ('none': no model)")
    p.add_argument("--served-name", default=None, help="the chat model's id in the API (default: --model as given)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=[],
                   help="require this key (repeatable; default $LMFORGE_API_KEY, else no key)")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together (default 32)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch before 503s")
    p.add_argument("--max-tokens", type=int, default=1024, help="for requests that do not set max_tokens")
    p.add_argument("--feedback", default="lmforge-feedback.jsonl",
                   help="JSONL file the chat page's thumbs-up/down go to ('' to keep none)")
    p.add_argument("--rag", default=None, metavar="STORE",
                   help="a store built by `lmforge rag index`: chat requests with \"rag\": true answer from it")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds requests in flight may finish after Ctrl-C/SIGTERM")
    p.set_defaults(func=cmd_serve)
