"""`lmforge align sample|reward|score|dpo|ppo` and `lmforge feedback export`: shells over train/align.py,
train/ppo.py and data/preferences.py."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lmforge.train.cli import _interrupt_note, _positive, _rate, add_train_args, train_config


def _exists(path: str | None) -> Path | None:
    from lmforge.errors import LmforgeError

    if path is None:
        return None
    if not Path(path).exists():
        raise LmforgeError(f"no such file: {path}")
    return Path(path)


def _options(args: argparse.Namespace) -> Any:
    from lmforge.errors import LmforgeError
    from lmforge.train.align import AlignOptions

    if args.steps is not None and args.epochs is not None:
        raise LmforgeError("give --steps or --epochs, not both")
    return AlignOptions(
        model=args.model, data=_exists(args.data), out=Path(args.out), method=args.method,
        loss=getattr(args, "loss", "rpo"), beta=getattr(args, "beta", 0.1),
        label_smoothing=getattr(args, "label_smoothing", 0.0), rpo_alpha=getattr(args, "rpo_alpha", 1.0),
        val_data=_exists(args.val_data), val_fraction=args.val_fraction, max_len=args.max_len,
        epochs=args.epochs if args.epochs is not None else getattr(args, "default_epochs", 1.0), rank=args.rank,
        alpha=args.alpha if args.alpha is not None else 2.0 * args.rank, lora_dropout=args.lora_dropout,
        targets=[t for item in args.target for t in item.split(",") if t] or ["all-linear"],
        merge=getattr(args, "merge", False), device=args.device, resume=args.resume,
    )


def _table(result: dict[str, Any], metrics: list[str]) -> str:
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"held-out pairs: {result['val_pairs']} (trained {result['steps']} steps on "
                        f"{result['train_pairs']} pairs)")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    before, after = result.get("before") or {}, result.get("after") or {}
    for name in metrics:
        if name in after:
            fmt = "{:.1%}" if "accuracy" in name else "{:.4f}"
            table.add_row(name, fmt.format(before[name]) if name in before else "-", fmt.format(after[name]))
    buf = StringIO()
    Console(file=buf, width=100).print(table)
    return buf.getvalue() + json.dumps({k: v for k, v in result.items() if k.endswith("_dir")})


def cmd_dpo(args: argparse.Namespace) -> int:
    from lmforge.train.align import dpo

    opts = _options(args)
    with _interrupt_note(args.out):
        result = dpo(opts, train_config(args, args.steps or 0), progress=sys.stderr.isatty(), quiet=args.quiet)
    if result["after"]:
        print(_table(result, ["loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward",
                              "chosen_nll"]))
    else:
        print(json.dumps({k: v for k, v in result.items() if k.endswith("_dir")}))
    return 0


def cmd_reward(args: argparse.Namespace) -> int:
    from lmforge.train.align import train_reward

    opts = _options(args)
    with _interrupt_note(args.out):
        result = train_reward(opts, train_config(args, args.steps or 0), progress=sys.stderr.isatty(),
                              quiet=args.quiet)
    if result["after"]:
        print(_table(result, ["loss", "accuracy", "margin"]))
        print(f"held-out pairwise accuracy: {result['accuracy']:.1%} ({result['val_pairs']} pairs)")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from lmforge.train.align import score_file

    scored = score_file(args.reward, _exists(args.data), device=args.device)
    if args.format == "json":
        for row in scored:
            print(json.dumps(row))
    else:
        for row in scored:
            print(f"line {row['line']}\t{row['score']:.4f}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from lmforge.train.align import sample_answers

    n = sample_answers(args.model, _exists(args.prompts), args.n, args.out, args.max_new_tokens, args.temperature,
                       args.top_p, args.seed, args.device if args.device != "auto" else None)
    print(f"wrote {n} answers to {args.out}")
    return 0


def cmd_ppo(args: argparse.Namespace) -> int:
    from lmforge.train.ppo import PPOOptions, format_result, ppo

    opts = PPOOptions(
        model=args.model, reward=args.reward, prompts=_exists(args.prompts), out=Path(args.out), method=args.method,
        val_prompts=_exists(args.val_prompts), val_fraction=args.val_fraction, rollouts=args.rollouts,
        ppo_epochs=args.ppo_epochs, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        kl_coef=args.kl_coef, gamma=args.gamma, lam=args.lam, clip=args.clip, value_clip=args.value_clip,
        vf_coef=args.vf_coef, rank=args.rank, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
        lora_dropout=args.lora_dropout, targets=[t for item in args.target for t in item.split(",") if t]
        or ["all-linear"], merge=args.merge, device=args.device, resume=args.resume,
    )
    with _interrupt_note(args.out):
        result = ppo(opts, args.steps, train_config(args, 0), progress=sys.stderr.isatty(), quiet=args.quiet)
    print(format_result(result))
    return 0


def cmd_feedback_export(args: argparse.Namespace) -> int:
    from lmforge.data.preferences import export_feedback

    counts = export_feedback(_exists(getattr(args, "from")), args.out)
    print(f"{counts['pairs']} pairs from {counts['ratings']} ratings of {counts['conversations']} conversations "
          f"({counts['unpaired']} answers without a counterpart) -> {args.out}")
    return 0


def _lora_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", "-r", type=_positive, default=16)
    g.add_argument("--alpha", type=_rate, default=None, help="scale = alpha / rank (default: 2 x rank)")
    g.add_argument("--lora-dropout", type=_rate, default=0.0)
    g.add_argument("--target", action="append", default=[], help="HF module names (default all-linear)")


def _pair_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="preference pairs: JSONL {prompt|messages, chosen, rejected}")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--val-data", help="held-out pairs (default: --val-fraction of --data)")
    p.add_argument("--val-fraction", type=_rate, default=0.1)
    p.add_argument("--max-len", type=_positive, default=1024, help="tokens per prompt + answer; longer is an error")
    p.add_argument("--steps", type=_positive, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=_rate, help="passes over the training pairs")
    _lora_args(p)


def add_align_commands(subparsers: Any) -> None:
    from lmforge.weights.registry import DEFAULT_CHAT_MODEL

    top = subparsers.add_parser(
        "align", help="tune a model toward preferences: sample, reward, score, dpo, ppo (RLHF)",
        description="Alignment with human feedback: collect the model's own answers (sample), train a reward model "
        "(reward) and score with it (score), optimise the policy on pairs (dpo) or against a reward (ppo).")
    from lmforge.cli import Parser

    sub = top.add_subparsers(dest="align_command", required=True, parser_class=Parser)

    p = sub.add_parser("dpo", help="direct preference optimisation on pairs (sigmoid, robust, ipo, rpo)")
    p.add_argument("--model", "-m", default=DEFAULT_CHAT_MODEL)
    _pair_args(p)
    p.add_argument("--loss", choices=["sigmoid", "robust", "ipo", "rpo"], default="rpo",
                   help="rpo (default): DPO plus the chosen answer's NLL, which keeps it likely")
    p.add_argument("--beta", type=_rate, default=0.1)
    p.add_argument("--label-smoothing", type=_rate, default=0.0, help="sigmoid/robust: assumed label noise")
    p.add_argument("--rpo-alpha", type=_rate, default=1.0, help="rpo: weight of the NLL term")
    p.add_argument("--merge", action="store_true", help="also write OUT/merged (an HF folder)")
    add_train_args(p, lr=5e-5)
    p.set_defaults(func=cmd_dpo, eval_every=0, save_every=200, default_epochs=3.0, batch_size=4)

    p = sub.add_parser("reward", help="train a reward model (scalar head, Bradley–Terry) on pairs")
    p.add_argument("--model", "-m", default=DEFAULT_CHAT_MODEL)
    _pair_args(p)
    add_train_args(p, lr=1e-4)
    p.set_defaults(func=cmd_reward, eval_every=0, save_every=200, default_epochs=2.0)

    p = sub.add_parser("score", help="score {prompt|messages, response} rows with a reward model")
    p.add_argument("--reward", required=True, help="a folder written by `lmforge align reward`")
    p.add_argument("--data", required=True)
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("sample", help="the model's own answers to prompts (greedy, then sampled)")
    p.add_argument("--model", "-m", default=DEFAULT_CHAT_MODEL)
    p.add_argument("--prompts", required=True, help="JSONL {prompt} or {messages} rows")
    p.add_argument("--n", type=_positive, default=2, help="answers per prompt: the first greedy, the rest sampled")
    p.add_argument("--out", required=True)
    p.add_argument("--max-new-tokens", type=_positive, default=256)
    p.add_argument("--temperature", type=_rate, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("ppo", help="RLHF: PPO against a reward model or a Python reward function")
    p.add_argument("--model", "-m", default=DEFAULT_CHAT_MODEL)
    p.add_argument("--reward", required=True, help="a reward model folder, or module:function (prompt, response)")
    p.add_argument("--prompts", required=True, help="JSONL {prompt} or {messages} rows")
    p.add_argument("--val-prompts", help="held-out prompts (default: --val-fraction of --prompts)")
    p.add_argument("--val-fraction", type=_rate, default=0.1)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=_positive, default=20, help="PPO steps: rollout batches")
    p.add_argument("--rollouts", type=_positive, default=16, help="prompts answered per PPO step")
    p.add_argument("--ppo-epochs", type=_positive, default=2, help="optimisation passes over each rollout batch")
    p.add_argument("--max-new-tokens", type=_positive, default=64)
    p.add_argument("--temperature", type=_rate, default=1.0, help="rollout sampling (1 = the policy itself)")
    p.add_argument("--kl-coef", type=_rate, default=0.05, help="per-token KL penalty against the reference")
    p.add_argument("--gamma", type=_rate, default=1.0)
    p.add_argument("--lam", type=_rate, default=0.95, help="GAE lambda")
    p.add_argument("--clip", type=_rate, default=0.2, help="policy ratio clip")
    p.add_argument("--value-clip", type=_rate, default=0.2)
    p.add_argument("--vf-coef", type=_rate, default=0.1, help="value loss weight")
    p.add_argument("--merge", action="store_true", help="also write OUT/merged (an HF folder)")
    _lora_args(p)
    add_train_args(p, lr=5e-5)
    p.set_defaults(func=cmd_ppo, eval_every=-1, save_every=1, batch_size=8)

    p = subparsers.add_parser("feedback", help="feedback tools (export ratings as preference pairs)")
    fsub = p.add_subparsers(dest="feedback_command", required=True, parser_class=Parser)
    p = fsub.add_parser("export", help="pair liked and disliked answers to the same conversation")
    p.add_argument("--from", required=True, help="ratings JSONL (what `lmforge serve --feedback` writes)")
    p.add_argument("--out", required=True, help="preference pairs JSONL")
    p.set_defaults(func=cmd_feedback_export)
