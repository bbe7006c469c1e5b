"""`lmforge <command>`: thin shells over library calls. Bad input -> one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from lmforge.errors import LmforgeError

if TYPE_CHECKING:  # the CLI imports torch only once a command needs it, so --help stays quick
    from lmforge.client import Client
    from lmforge.generate import SamplingParams
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer import Tokenizer


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


INT_MAX = 2**31 - 1  # counts (tokens, top-k) beyond this are typos, and overflow tensors later


def _int_in(value: str, lo: int, hi: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value[:40]!r}") from None
    if not lo <= n <= hi:
        shown = str(n) if len(str(n)) <= 24 else f"{str(n)[:12]}... ({len(str(n))} digits)"
        raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {shown}")
    return n


def _positive_int(value: str) -> int:
    return _int_in(value, 1, INT_MAX)


def _non_negative_int(value: str) -> int:
    return _int_in(value, 0, INT_MAX)


def _logprobs(value: str) -> int:
    return _int_in(value, 0, 20)


def _seed(value: str) -> int:
    return _int_in(value, 0, 2**63 - 1)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from lmforge.precision import DTYPE_CHOICES, DTYPE_HELP
    from lmforge.weights.registry import DEFAULT_CHAT_MODEL

    p.add_argument("--model", "-m", default=DEFAULT_CHAT_MODEL, help="short name, GGUF file, HF folder or hub id")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)


def _add_remote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-base", default=os.environ.get("LMFORGE_API_BASE"), metavar="URL",
                   help="use a remote OpenAI-compatible server (lmforge serve, vLLM, llama-server) instead of a local "
                   "model; --model then names the server's model (default: its first)")
    p.add_argument("--api-key", default=os.environ.get("LMFORGE_API_KEY"), help="the remote server's key")


def _remote(args: argparse.Namespace) -> Client:
    from lmforge.client import Client
    from lmforge.weights.registry import DEFAULT_CHAT_MODEL

    if args.dtype != "auto":
        raise LmforgeError("--dtype is for a local model; the remote server chose its own precision")
    model = None if args.model == DEFAULT_CHAT_MODEL else args.model
    return Client(args.api_base, args.api_key, model)


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=_positive_int, default=max_new_tokens)
    # defaults measured by benchmarks/chat_defaults.py (12 factual questions x 4 seeds + 3 open requests on the
    # default model): 0.2 / top-p 0.9 / no penalty was the most often correct sampled setting with the fewest
    # derails (83% / 7%, like greedy); 0.3 derailed twice as often, a 1.1 penalty lost correct answers
    p.add_argument("--temperature", "-t", type=float, default=0.2, help="0 = greedy (default 0.2)")
    p.add_argument("--top-k", type=_non_negative_int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off (try 1.1 against loops)")
    p.add_argument("--seed", type=_seed, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling(args: argparse.Namespace) -> SamplingParams:
    from lmforge.generate import SamplingParams

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=list(args.stop),
        logprobs=getattr(args, "logprobs", None),
    )
    params.validate()
    return params


def _load(args: argparse.Namespace) -> tuple[Transformer, Tokenizer]:
    from rich.console import Console

    from lmforge.weights.load import load

    with Console(stderr=True).status(f"loading {args.model} ..."):
        return load(args.model, dtype=args.dtype)


def cmd_generate(args: argparse.Namespace) -> int:
    import json
    import time

    from lmforge.engine import fit_context
    from lmforge.generate import complete, completion_dict, encode_prompt, stream_outputs
    from lmforge.model_info import require_generator
    from lmforge.stats import format_stats

    if args.system is not None and not args.chat:
        raise LmforgeError("--system needs --chat (a system prompt is part of the chat template)")
    if args.logprobs is not None and args.format != "json":
        raise LmforgeError("--logprobs needs --format json")
    params = _sampling(args)
    if args.api_base:
        return _generate_remote(args, params)
    require_generator(args.model)  # from the config alone: an encoder is refused before its weights load
    start = time.perf_counter()
    model, tokenizer = _load(args)
    load_seconds = time.perf_counter() - start
    ids = encode_prompt(tokenizer, args.prompt, chat=args.chat, system=args.system)
    kept = fit_context(model, ids, params.max_new_tokens, args.truncate)
    if len(kept) < len(ids):
        print(f"(prompt truncated: {len(ids) - len(kept)} of its {len(ids)} tokens dropped to fit the context)",
              file=sys.stderr)
    if args.format == "json":
        (completion,) = complete(model, tokenizer, [kept], params)
        print(json.dumps(completion_dict(completion, tokenizer, args.logprobs is not None), ensure_ascii=False))
        usage = completion.usage
    else:
        usage = None
        for out in stream_outputs(model, tokenizer, kept, params):
            sys.stdout.write(out.text)
            sys.stdout.flush()
            usage = out.usage or usage
        sys.stdout.write("\n")
    if args.stats and usage is not None:
        print(format_stats(load_seconds, usage), file=sys.stderr)
    return 0


def _generate_remote(args: argparse.Namespace, params: SamplingParams) -> int:
    import json

    from lmforge.stats import format_stats

    for flag, given in (("--logprobs", args.logprobs is not None), ("--truncate", args.truncate)):
        if given:
            raise LmforgeError(f"{flag} is for a local model, not with --api-base")
    client = _remote(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        deltas = client.stream_chat(messages, params)
    else:
        deltas = client.stream_text(args.prompt, params)
    text, reason, usage = "", None, None
    for delta in deltas:
        text += delta.text
        reason, usage = delta.finish_reason or reason, delta.usage or usage
        if args.format == "text":
            sys.stdout.write(delta.text)
            sys.stdout.flush()
    if args.format == "json":
        counts = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                  "total_tokens": usage.prompt_tokens + usage.completion_tokens} if usage else None
        print(json.dumps({"text": text, "finish_reason": reason, "usage": counts, "tokens": []}, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    if args.stats and usage is not None:
        print(format_stats(0.0, usage), file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    import time

    from lmforge.chat import chat_session
    from lmforge.model_info import require_generator

    params = _sampling(args)
    if args.api_base:
        chat_session(None, None, params, system=args.system, stats=args.stats, remote=_remote(args))
        return 0
    require_generator(args.model)  # from the config alone: an encoder is refused before its weights load
    start = time.perf_counter()
    model, tokenizer = _load(args)
    load_seconds = time.perf_counter() - start
    if model.cfg.family == "encoder" or not tokenizer.chat_template:
        raise LmforgeError(f"{args.model} has no chat template: use `lmforge generate` to complete raw text")
    chat_session(model, tokenizer, params, system=args.system, stats=args.stats, load_seconds=load_seconds)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from lmforge.model_info import inspect_model, memory_table

    if args.memory or args.config:
        Console().print(memory_table(args.model, args.config, args.dtype, args.context, args.batch, args.budget))
        return 0
    if args.model is None:
        raise LmforgeError("name a model (or use --memory with --config)")
    info = inspect_model(args.model)
    table = Table(title=str(info.pop("model")), show_header=False)
    for key, value in info.items():
        table.add_row(key, str(value))
    Console().print(table)
    return 0


def _given_once(positional: str | None, option: str | None, what: str) -> str:
    """`convert SRC DST` and `convert --model SRC --out DST` are the same command: one spelling each."""
    if positional is not None and option is not None and positional != option:
        raise LmforgeError(f"{what} given twice ({positional!r} and {option!r}): give it once")
    value = positional if positional is not None else option
    if value is None:
        raise LmforgeError(f"name {what}")
    return value


def cmd_convert(args: argparse.Namespace) -> int:
    from rich.console import Console

    src = _given_once(args.src, args.model, "the model to convert (SRC or --model)")
    dst = _given_once(args.dst, args.out, "where to write (DST or --out)")
    console = Console(stderr=True)
    if args.to == "gguf":
        if args.dtype is not None:
            raise LmforgeError("--dtype is for --to hf; a GGUF file's precision is --quant (f16, q8_0, q4_0, q4_1)")
        from lmforge.weights.gguf_write import convert_gguf

        quant = args.quant or "f16"
        with console.status(f"converting {src} to GGUF ({quant}) ..."):  # quant, output and family checked first
            convert_gguf(src, dst, quant, force=args.force)
        size = os.path.getsize(os.path.expanduser(dst))
        console.print(f"wrote {dst} (GGUF llama, {quant.lower()}, {size / 2**20:,.1f} MiB)")
        return 0
    if args.quant is not None:
        raise LmforgeError("--quant needs --to gguf (an HF folder's precision is --dtype)")
    from lmforge.weights.load import convert

    dtype = args.dtype or "float32"
    with console.status(f"converting {src} ..."):  # the destination is checked before the slow load
        cfg = convert(src, dst, dtype=dtype, force=args.force)
    console.print(f"wrote {dst} ({cfg.hf_model_type}, {dtype})")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lmforge.tokenizer_train import save_trained, train_tokenizer

    tokenizer = train_tokenizer(args.files, args.kind, args.vocab_size, args.special, args.min_frequency,
                                show_progress=sys.stderr.isatty())
    out = save_trained(tokenizer, args.out)
    Console(stderr=True).print(f"wrote {out} ({args.kind}, {tokenizer.vocab_size} tokens)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lmforge import __version__
    from lmforge.precision import DTYPE_CHOICES

    parser = Parser(prog="lmforge", description="Run, inspect and convert language models.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("generate", help="continue a text (or answer it with --chat), streaming to stdout")
    p.add_argument("prompt")
    _add_model_args(p)
    p.add_argument("--chat", action="store_true", help="render the prompt as one user turn of the chat template")
    p.add_argument("--system", default=None, help="system prompt for --chat (default: the template's own)")
    p.add_argument("--truncate", action="store_true", help="drop the oldest prompt tokens instead of failing")
    _add_sampling_args(p, max_new_tokens=256)
    _add_remote_args(p)
    p.add_argument("--format", choices=["text", "json"], default="text",
                   help="json: one object with text, finish_reason, usage and the tokens")
    p.add_argument("--logprobs", type=_logprobs, default=None, metavar="K",
                   help="with --format json: each token's log-probability and its K most likely alternatives")
    p.add_argument("--stats", action="store_true", help="print load time, token counts, speeds and memory to stderr")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="multi-turn chat; /reset clears the conversation, /exit quits")
    _add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt (default: the template's own)")
    _add_sampling_args(p, max_new_tokens=256)  # measured: the longest correct answer took 183 tokens
    _add_remote_args(p)
    p.add_argument("--stats", action="store_true", help="after each answer, print token counts, speeds and memory")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("inspect", help="family, parameters, context length and memory of a model")
    p.add_argument("model", nargs="?")
    p.add_argument("--memory", action="store_true", help="plan memory: weights, KV cache, activations, runtime")
    p.add_argument("--config", help="--memory for a config instead of a model: a preset (e.g. llama2-7b) or a "
                   "config.json")
    p.add_argument("--dtype", default="int4", choices=DTYPE_CHOICES[1:], help="--memory: precision (default int4)")
    p.add_argument("--context", type=_positive_int, help="--memory: tokens per sequence (default: the model's)")
    p.add_argument("--batch", type=_positive_int, default=1, help="--memory: sequences decoded together")
    p.add_argument("--budget", type=float, default=8.0, help="--memory: GiB to check the total against")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="GGUF file or HF folder -> HF folder (config.json + safetensors), or with "
                                          "--to gguf a Llama-family model -> a GGUF file for llama.cpp")
    p.add_argument("src", nargs="?", help="short name, GGUF file or HF folder (or --model)")
    p.add_argument("dst", nargs="?", help="the folder (hf) or .gguf file (gguf) to write (or --out)")
    p.add_argument("--model", "-m", default=None, help="the model to convert, instead of SRC")
    p.add_argument("--out", "-o", default=None, help="where to write, instead of DST")
    p.add_argument("--to", choices=["hf", "gguf"], default="hf", help="output format (default hf)")
    p.add_argument("--quant", default=None, metavar="{f16,q8_0,q4_0,q4_1}",
                   help="--to gguf: type of the 2-D weights (default f16; norms stay F32)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="--to hf: weights dtype (float32)")
    p.add_argument("--force", action="store_true", help="replace an existing destination (once the export succeeded)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("tokenizer", help="tokenizer tools (train)")
    tok_sub = p.add_subparsers(dest="tokenizer_command", required=True, parser_class=Parser)
    p = tok_sub.add_parser("train", help="train a tokenizer on text files (streamed): bpe, wordpiece or unigram")
    p.add_argument("--files", nargs="+", required=True, help="text files or folders (their .txt/.md files)")
    p.add_argument("--kind", choices=["bpe", "wordpiece", "unigram"], default="bpe",
                   help="bpe: byte-level (decoders); wordpiece: BERT-style (encoders); unigram: T5-style")
    p.add_argument("--vocab-size", type=_positive_int, default=8000)
    p.add_argument("--special", action="append", default=[], help="extra special token (repeatable)")
    p.add_argument("--min-frequency", type=_positive_int, default=2, help="bpe/wordpiece: rarest pair merged")
    p.add_argument("--out", required=True, help="x.json: the tokenizer.json alone; else a folder (+ its config)")
    p.set_defaults(func=cmd_tokenizer_train)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    from lmforge.data.cli import add_data_commands
    from lmforge.embed_cli import add_embed_command
    from lmforge.eval.cli import add_eval_commands
    from lmforge.explain_cli import add_explain_command
    from lmforge.prompt_cli import add_prompt_command
    from lmforge.rag.cli import add_rag_commands
    from lmforge.serve.cli import add_serve_command
    from lmforge.text.cli import add_text_commands
    from lmforge.train.align_cli import add_align_commands
    from lmforge.train.cli import add_train_commands

    return [add_embed_command, add_text_commands, add_data_commands, add_train_commands, add_align_commands,
            add_serve_command, add_rag_commands, add_eval_commands, add_prompt_command, add_explain_command]


def _one_line(message: str) -> str:
    """Messages quote file names and file contents: line breaks in them must not split the error line."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "dtype") and args.dtype == "auto" and not getattr(args, "api_base", None):
        from lmforge.weights.load import default_dtype

        args.dtype = default_dtype(getattr(args, "model", None))
    try:
        return args.func(args)
    except LmforgeError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmforge generate ... | head`
        return 0
    except OSError as e:  # a file we were pointed at cannot be read or written
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug of ours: one line for the user, the traceback with LMFORGE_DEBUG=1
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        print(f"error: internal error ({type(e).__name__}: {_one_line(str(e))}); rerun with LMFORGE_DEBUG=1 for "
              "details", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
