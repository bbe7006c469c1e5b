"""Training throughput: lmforge's loop vs transformers' GPT2LMHeadModel in a plain PyTorch loop, one run.

The same GPT-2-shaped model (6 layers, 384 wide, 6 heads, block 256, batch 8, vocab 8192 by default) trains on
the same random tokens with the same AdamW settings, clipping and fp32 (or --precision bf16 autocast for both).
Steps alternate between the engines in rounds, so a change in the host's speed hits both alike; the table shows
the median step time, tokens/s, the ratio, and each one's model-FLOPs utilisation: 6 N + 12 L T d FLOPs per token
(PaLM's appendix B) against the peak of a large fp32 (or bf16) matmul measured here, in the same run.

    .venv/bin/python benchmarks/train.py [--steps 30] [--rounds 3] [--precision fp32|bf16] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from lmforge.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.train.dist import Dist
from lmforge.train.loop import TrainConfig, pick_precision, train
from lmforge.train.objectives import CausalLM


class RandomTokens:
    """The loop's TrainData over random ids: the same rows for both engines."""

    def __init__(self, vocab: int, block: int, batch: int) -> None:
        self.vocab, self.block, self.batch = vocab, block, batch
        self.tokens_per_row = block
        self.objective = CausalLM(block)

    def global_batch(self, step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(step)
        return self.objective.batch(torch.randint(0, self.vocab, (self.batch, self.block + 1), generator=g), g)

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        return []


def config(args: argparse.Namespace) -> ModelConfig:
    cfg = ModelConfig.from_name("small-gpt")
    cfg.vocab_size, cfg.max_seq_len = args.vocab, args.block
    return cfg


def flops_per_token(cfg: ModelConfig, n_params: int, block: int) -> float:
    return 6 * n_params + 12 * cfg.n_layer * block * cfg.d_model


def peak_flops(dtype: torch.dtype) -> float:
    """FLOP/s of a 2048^3 matmul on this machine's threads: the reachable peak MFU is quoted against."""
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048**3 / (time.perf_counter() - start)


def lmforge_steps(model: Transformer, data: RandomTokens, args: argparse.Namespace, first: int) -> list[float]:
    """`args.steps` steps of the one loop as `lmforge pretrain` runs it (a fresh AdamW each round: its first step
    allocates state, which the median leaves out)."""
    import tempfile

    with tempfile.TemporaryDirectory() as run:
        tc = TrainConfig(steps=args.steps, batch_size=args.batch, lr=3e-4, warmup=10, eval_every=10**9,
                         save_every=10**9, precision=args.precision, compile=args.compile)
        # the loop's own timing of each optimizer step (data, forward, backward, clip, AdamW), read back from its log
        train(model, _Offset(data, first), CausalLM(args.block).loss, tc, run, Dist(), progress=False, quiet=True)
        from lmforge.train.loop import read_metrics

        seconds = [r["seconds"] for r in read_metrics(f"{run}/metrics.jsonl")]
    return seconds


class _Offset:
    """Step s of this round is step first + s of the data, as a resumed run would see it."""

    def __init__(self, data: RandomTokens, first: int) -> None:
        self.data, self.first, self.tokens_per_row = data, first, data.tokens_per_row

    def global_batch(self, step: int) -> dict[str, torch.Tensor]:
        return self.data.global_batch(self.first + step)

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        return []


def hf_model(cfg: ModelConfig) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                    n_head=cfg.n_head, n_inner=cfg.d_ff, activation_function="gelu_new", resid_pdrop=0.0,
                    embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM")
    return GPT2LMHeadModel(hf).train()


def hf_steps(model: nn.Module, opt: torch.optim.Optimizer, data: RandomTokens, args: argparse.Namespace,
             first: int, dtype: torch.dtype) -> list[float]:
    """The plain loop a transformers user writes: forward with labels, backward, clip, step."""
    seconds = []
    for step in range(first, first + args.steps):
        start = time.perf_counter()
        batch = data.global_batch(step)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            # GPT2LMHeadModel shifts labels itself: give it the window's inputs as labels
            loss = model(input_ids=batch["tokens"], labels=batch["tokens"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per engine per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--compile", action="store_true", help="torch.compile lmforge's model")
    args = ap.parse_args()
    dtype = pick_precision(args.precision, torch.device("cpu"))
    cfg = config(args)
    data = RandomTokens(args.vocab, args.block, args.batch)
    torch.manual_seed(0)
    ours = Transformer(cfg)
    theirs = hf_model(cfg)
    opt = torch.optim.AdamW(theirs.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    console = Console()
    console.print(f"{torch.get_num_threads()} threads, {n_ours / 1e6:.1f}M parameters (transformers: "
                  f"{n_theirs / 1e6:.1f}M), {args.precision}{', compiled' if args.compile else ''}")
    hf_steps(theirs, opt, data, argparse.Namespace(**{**vars(args), "steps": args.warmup}), 0, dtype)
    ours_times: list[float] = []
    theirs_times: list[float] = []
    done = 0
    for _ in range(args.rounds):  # interleaved rounds: the host's drift hits both
        ours_times += lmforge_steps(ours, data, args, done)[args.warmup if done == 0 else 0:]
        theirs_times += hf_steps(theirs, opt, data, args, args.warmup + done, dtype)
        done += args.steps
    peak = peak_flops(dtype)
    tokens = args.batch * args.block
    table = Table(title=f"training, GPT-2 shape {cfg.n_layer}x{cfg.d_model}, block {args.block}, batch {args.batch}, "
                        f"vocab {args.vocab}")
    for col in ("engine", "ms / step", "tokens/s", "MFU", "ratio"):
        table.add_column(col, justify="right")
    rate = {}
    for name, times, n in (("transformers GPT2LMHeadModel", theirs_times, n_theirs), ("lmforge", ours_times, n_ours)):
        t = statistics.median(times)
        rate[name] = tokens / t
        mfu = flops_per_token(cfg, n, args.block) * tokens / t / peak
        table.add_row(name, f"{t * 1e3:.0f}", f"{tokens / t:,.0f}", f"{mfu:.1%}",
                      f"{rate[name] / rate['transformers GPT2LMHeadModel']:.2f}x")
    console.print(table)
    console.print(f"MFU against a measured {peak / 1e9:.0f} GFLOP/s {args.precision} matmul peak")


if __name__ == "__main__":
    main()
