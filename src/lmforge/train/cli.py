"""`lmforge pretrain`: the command-line shell over lmforge.train.pretrain."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _positive(value: str) -> int:
    from lmforge.cli import _positive_int

    return _positive_int(value)


def _count(value: str) -> int:
    """Integers with an optional k/M/B suffix (--tokens 20M)."""
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(value[-1:].lower(), 1)
    try:
        n = float(value[:-1] if scale > 1 else value) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count like 5000 or 20M, got {value[:40]!r}") from None
    if not math.isfinite(n) or not 1 <= n <= 10**15:
        raise argparse.ArgumentTypeError(f"must be in [1, 1e15], got {value[:40]!r}")
    return int(n)


def _rate(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value[:40]!r}") from None
    if not math.isfinite(x) or x < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value[:40]!r}")
    return x


def add_train_args(p: argparse.ArgumentParser, lr: float, steps_required: bool = True) -> None:
    """The one loop's options, shared by every training command."""
    g = p.add_argument_group("training loop")
    g.add_argument("--batch-size", type=_positive, default=8, help="rows per optimizer step, all processes together")
    g.add_argument("--micro-batch", type=_positive, default=None,
                   help="rows per forward/backward on one process (gradient accumulation); default: all at once")
    g.add_argument("--lr", type=_rate, default=lr, help=f"peak learning rate (default {lr})")
    g.add_argument("--min-lr", type=_rate, default=None, help="final learning rate of the cosine (default lr/10)")
    g.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of the steps, at most 200)")
    g.add_argument("--weight-decay", type=_rate, default=0.1)
    g.add_argument("--grad-clip", type=_rate, default=1.0, help="0 = off")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on GPUs that have it, fp32 on CPU (measured faster there)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (see benchmarks/train.py)")
    g.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda, cuda:N")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--eval-every", type=int, default=100, help="validate every N steps (0 = at the end)")
    g.add_argument("--save-every", type=_positive, default=100, help="checkpoint every N steps")
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept (0 = all)")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 (sharded) instead of DDP")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar, no line per validation")


@contextmanager
def _interrupt_note(out: str) -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        print(f"interrupted: the last finished step is checkpointed in {out}/checkpoints; rerun the same command "
              "with --resume to continue", file=sys.stderr)
        raise


def train_config(args: argparse.Namespace, steps: int) -> Any:
    from lmforge.train.loop import TrainConfig

    warmup = args.warmup if args.warmup is not None else -1
    return TrainConfig(
        steps=steps, batch_size=args.batch_size, micro_batch=args.micro_batch or 0, lr=args.lr,
        min_lr=args.min_lr if args.min_lr is not None else args.lr / 10, warmup=warmup,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, precision=args.precision, compile=args.compile,
        seed=args.seed, eval_every=args.eval_every, save_every=args.save_every, keep=args.keep, fsdp=args.fsdp,
    )


def cmd_pretrain(args: argparse.Namespace) -> int:
    from lmforge.errors import LmforgeError
    from lmforge.train.pretrain import PretrainOptions, pretrain

    if (args.steps is None) == (args.tokens is None):
        raise LmforgeError("give one of --steps or --tokens")
    if args.micro_batch and args.batch_size % args.micro_batch:
        raise LmforgeError(f"--batch-size {args.batch_size} is not a multiple of --micro-batch {args.micro_batch}")
    opts = PretrainOptions(
        data=Path(args.data), out=Path(args.out), preset=args.preset, config_file=args.config,
        objective=args.objective, block_size=args.block_size or 0, vocab_size=args.vocab_size or 0,
        tokens=args.tokens or 0, dropout=args.dropout, sample_prompt=args.sample_prompt,
        sample_tokens=args.sample_tokens, device=args.device, resume=args.resume,
    )
    tc = train_config(args, args.steps or 0)  # with --tokens, pretrain sets the steps once it knows the window
    with _interrupt_note(args.out):
        last = pretrain(opts, tc, progress=sys.stderr.isatty(), quiet=args.quiet)
    if last:
        nan = float("nan")
        print(f"done: step {last['step']}, train loss {last['loss']:.4f}, val loss {last.get('val_loss', nan):.4f}, "
              f"val perplexity {last.get('val_ppl', nan):.2f}; model in {args.out}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from lmforge.errors import LmforgeError
    from lmforge.train.finetune import FinetuneOptions, finetune, format_result

    if args.steps is not None and args.epochs is not None:
        raise LmforgeError("give --steps or --epochs, not both")
    if args.micro_batch and args.batch_size % args.micro_batch:
        raise LmforgeError(f"--batch-size {args.batch_size} is not a multiple of --micro-batch {args.micro_batch}")
    opts = FinetuneOptions(
        model=args.model, data=Path(args.data), task=args.task, out=Path(args.out), method=args.method,
        val_data=Path(args.val_data) if args.val_data else None, val_fraction=args.val_fraction,
        max_len=args.max_len, epochs=args.epochs if args.epochs is not None else 1.0, rank=args.rank,
        alpha=args.alpha if args.alpha is not None else 2.0 * args.rank, lora_dropout=args.lora_dropout,
        targets=[t for item in args.target for t in item.split(",") if t] or ["all-linear"], merge=args.merge,
        grad_checkpointing=args.grad_checkpointing, base_dtype=args.base_dtype, device=args.device,
        resume=args.resume,
    )
    for path in [opts.data, opts.val_data]:
        if path is not None and not path.exists():
            raise LmforgeError(f"no such file or folder: {path}")
    with _interrupt_note(args.out):
        result = finetune(opts, train_config(args, args.steps or 0), progress=sys.stderr.isatty(), quiet=args.quiet)
    print(format_result(result))
    return 0


def add_train_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "pretrain", help="train a model from scratch on prepared data (clm, mlm or span corruption)",
        description="Pre-train a decoder (causal LM), encoder (masked LM) or encoder-decoder (span corruption) on a "
        "dataset made by `lmforge data prepare`. Run under torchrun for several processes or machines.",
    )
    p.add_argument("--data", required=True, help="folder written by `lmforge data prepare`")
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics, loss.png, the final HF model")
    p.add_argument("--preset", help="tiny-gpt, small-gpt, tiny-llama, small-llama, tiny-bert, tiny-t5, ...")
    p.add_argument("--config", help="a ModelConfig JSON or an HF config.json instead of a preset")
    p.add_argument("--objective", choices=["clm", "mlm", "span"], help="default: the family's")
    p.add_argument("--steps", type=_positive, help="optimizer steps")
    p.add_argument("--tokens", type=_count, help="or: about this many training tokens (e.g. 20M)")
    p.add_argument("--block-size", type=_positive, help="tokens per row (default: the model's context)")
    p.add_argument("--vocab-size", type=_positive, help="default: the tokenizer's, rounded up to a multiple of 64")
    p.add_argument("--dropout", type=_rate, default=0.0)
    p.add_argument("--sample-prompt", default="The", help="decoders: sampled after each validation")
    p.add_argument("--sample-tokens", type=int, default=48, help="0 = no samples")
    add_train_args(p, lr=6e-4)
    p.set_defaults(func=cmd_pretrain)

    from lmforge.weights.registry import DEFAULT_CHAT_MODEL

    p = subparsers.add_parser(
        "finetune", help="adapt a pretrained model (LoRA or full): instruct, chat, domain, classify, seq2seq",
        description="Fine-tune a model on JSONL rows (instruct: instruction/input/output or prompt/completion; chat: "
        "messages; classify: text/label; seq2seq: source/target) or text files (domain), through the same loop as "
        "pretrain. LoRA writes OUT/adapter (PEFT format) and, with --merge, OUT/merged (an HF folder).",
    )
    p.add_argument("--model", "-m", default=DEFAULT_CHAT_MODEL, help="short name, GGUF file, HF folder or hub id")
    p.add_argument("--data", required=True, help="JSONL file (or text files/folder for --task domain)")
    p.add_argument("--task", required=True, choices=["instruct", "chat", "domain", "classify", "seq2seq"])
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    p.add_argument("--val-data", help="validation rows (default: --val-fraction of --data)")
    p.add_argument("--val-fraction", type=_rate, default=0.1)
    p.add_argument("--max-len", type=_positive, default=512, help="tokens per row (longer rows are cut, and counted)")
    p.add_argument("--steps", type=_positive, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=_rate, help="passes over the training rows (default 1)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", "-r", type=_positive, default=8)
    g.add_argument("--alpha", type=_rate, default=None, help="scale = alpha / rank (default: 2 x rank)")
    g.add_argument("--lora-dropout", type=_rate, default=0.0)
    g.add_argument("--target", action="append", default=[],
                   help="module names as the HF checkpoint calls them (q_proj,v_proj ...); default all-linear")
    g.add_argument("--merge", action="store_true", help="also write OUT/merged: the base with the adapter folded in")
    g.add_argument("--base-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the frozen base's precision (bfloat16: half the memory; slower on CPUs without AVX512-BF16)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    add_train_args(p, lr=2e-4)
    p.set_defaults(func=cmd_finetune, eval_every=0, save_every=200)
