"""The one training loop. Pre-training, fine-tuning and alignment all call `train` with their own data and loss.

What it does per optimizer step: take the step's global batch from the data (a pure function of the step, so
resuming and sharding need no iterator state), keep this rank's rows, run them in micro-batches (gradient
accumulation) under bf16 autocast when chosen, divide the summed loss by the global target count, clip, step
AdamW with warmup + cosine, log. Every `save_every` steps an atomic checkpoint (model, optimizer, RNG states,
step) that `resume` continues exactly. Under torchrun the model is wrapped in DDP (or FSDP2) and rank 0 logs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lmforge.data.collate import IGNORE, Batch
from lmforge.errors import LmforgeError
from lmforge.train.dist import Dist, all_sum, rank_rows
from lmforge.train.metrics import MetricsLog, ProgressBar, plot_losses

LossFn = Callable[[nn.Module, Batch], Tensor]  # summed loss over the batch's targets


class TrainData(Protocol):
    tokens_per_row: int  # input tokens one row feeds the model, for tokens/s

    def global_batch(self, step: int) -> Batch:
        """All rows of optimizer step `step` (0-based), the same on every rank: deterministic in the step."""
        ...

    def val_batches(self) -> list[Batch]: ...


@dataclass
class TrainConfig:
    steps: int
    batch_size: int = 8  # rows per optimizer step, all ranks together
    micro_batch: int = 0  # rows per forward/backward on one rank; 0 = all of this rank's rows at once
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup: int = -1  # steps; -1 = 5% of the steps, at most 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    precision: str = "auto"  # auto | fp32 | bf16
    compile: bool = False
    seed: int = 1337
    eval_every: int = 100  # 0 = only at the end, -1 = never (the caller validates)
    eval_batches: int = 0  # 0 = every validation batch the data gives
    save_every: int = 100
    keep: int = 2  # checkpoints kept on disk
    fsdp: bool = False

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup >= 0 else min(200, max(1, self.steps // 20))

    def lr_at(self, step: int) -> float:
        """Linear warmup over the warmup steps, then cosine from lr down to min_lr at the last step."""
        warmup = self.warmup_steps
        if step < warmup:
            return self.lr * (step + 1) / warmup
        span = max(self.steps - warmup - 1, 1)  # the last step (steps - 1) reaches min_lr
        progress = min((step - warmup) / span, 1.0)
        return self.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (self.lr - self.min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay only matrices of Linears: norms, biases and embedding tables are not pulled toward zero."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, plain = [], []
    for p in model.parameters():  # a tied Parameter is listed once
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in embeddings else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pick_precision(choice: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that has it; fp32 on CPU, where benchmarks/train.py measured bf16 autocast slower
    (its casts cost more than the matmuls save at these sizes)."""
    if choice == "fp32":
        return torch.float32
    if choice == "bf16":
        if not bf16_supported(device):
            raise LmforgeError(f"bf16 is not supported on this {device.type} device (use --precision fp32)")
        return torch.bfloat16
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" and bf16_supported(device) else torch.float32
    raise LmforgeError(f"unknown precision {choice!r} (auto, fp32, bf16)")


# ---- checkpoints --------------------------------------------------------------------------------------------

CKPT = re.compile(r"^step-(\d+)\.pt$")


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `folder`, oldest first (partial writes have another name until renamed)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CKPT.match(p.name))]
    return sorted(found)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _full_state(model: nn.Module, opt: torch.optim.Optimizer, d: Dist) -> tuple[dict, dict]:
    """Unsharded model and optimizer state on CPU (gathered from every rank under FSDP). With a frozen base
    (LoRA) only the trainable weights: the base is the checkpoint the run started from, not worth copying."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, opt_state = get_state_dict(
        model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=d.world > 1))
    frozen = _frozen_names(model)
    return {k: v for k, v in model_state.items() if k not in frozen}, opt_state


def _frozen_names(model: nn.Module) -> set[str]:
    unwrapped = getattr(model, "module", model)  # DDP's names carry "module."; state dict keys do not
    trainable = {id(p) for p in unwrapped.parameters() if p.requires_grad}
    return {n for n, p in unwrapped.named_parameters(remove_duplicate=False) if id(p) not in trainable}


def full_model_state(model: nn.Module, d: Dist) -> dict[str, Tensor]:
    """The whole model's weights on CPU, unsharded; every rank must call it (FSDP gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(folder: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer, d: Dist,
                    extra: dict[str, Any], keep: int) -> None:
    """step-N.pt, written to a temporary name and renamed: a kill mid-write leaves the previous ones intact."""
    model_state, opt_state = _full_state(model, opt, d)
    rng = [None] * d.world
    if d.world > 1:
        dist.all_gather_object(rng, _rng_state())
    else:
        rng = [_rng_state()]
    if d.rank != 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".step-*.pt.partial"):  # left by a run killed mid-write
        stale.unlink(missing_ok=True)
    tmp = folder / f".step-{step:06d}.pt.partial"
    torch.save({"step": step, "model": model_state, "optimizer": opt_state, "rng": rng, **extra}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, folder / f"step-{step:06d}.pt")
    for _, old in checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, d: Dist) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise LmforgeError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
    frozen = _frozen_names(model)
    unwrapped = getattr(model, "module", model)
    missing = [n for n, p in unwrapped.named_parameters() if p.requires_grad and n not in ckpt["model"]]
    if missing:
        raise LmforgeError(f"checkpoint {path} lacks trainable weights ({', '.join(missing[:3])}...): it was "
                           "written by another run")
    set_state_dict(model, opt, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optimizer"],
                   options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False,
                                            strict=not frozen))
    rng = ckpt["rng"]
    _set_rng_state(rng[d.rank] if d.rank < len(rng) else rng[0])
    return ckpt


# ---- the loop -----------------------------------------------------------------------------------------------


def _micro_batches(rows: Batch, size: int) -> Iterator[Batch]:
    n = len(next(iter(rows.values())))
    size = size or n
    for start in range(0, n, max(size, 1)):
        yield {k: v[start: start + size] for k, v in rows.items()}


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _targets(batch: Batch) -> int:
    return int((batch["labels"] != IGNORE).sum())


def wrap(model: nn.Module, d: Dist, fsdp: bool) -> nn.Module:
    """The module the loop calls: DDP (or FSDP2, sharding each block then the rest) under torchrun."""
    if d.world == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for stack in (getattr(model, "encoder", None), getattr(model, "decoder", None)):
            for block in stack or []:
                fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


@torch.no_grad()
def evaluate(model: nn.Module, data: TrainData, loss: LossFn, cfg: TrainConfig, d: Dist,
             dtype: torch.dtype) -> float:
    """Mean validation loss per target over this rank's share of every validation batch, summed over ranks."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros(2, dtype=torch.float64), 0
    batches = data.val_batches()
    for batch in batches[: cfg.eval_batches or None]:
        rows = rank_rows(batch, d)
        for micro in _micro_batches(rows, cfg.micro_batch):
            with torch.autocast(d.device.type, dtype=dtype, enabled=dtype != torch.float32):
                total[0] += float(loss(model, _to(micro, d.device)))
            count += _targets(micro)
    total[1] = count
    total = all_sum(total, d)
    model.train(was_training)
    return float(total[0] / total[1]) if total[1] else float("nan")


def train(
    model: nn.Module,
    data: TrainData,
    loss: LossFn,
    cfg: TrainConfig,
    run_dir: str | Path,
    d: Dist,
    *,
    resume: bool = False,
    run_info: dict[str, Any] | None = None,
    on_eval: Callable[[nn.Module, int], dict[str, Any]] | None = None,
    progress: bool = True,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train `model` (already on d.device) for cfg.steps optimizer steps; metrics and checkpoints go to run_dir.

    `on_eval(model, step)` runs on rank 0 after each validation (e.g. sample texts) and its dict is logged.
    `progress`: a live bar (on a terminal); `quiet`: not even a line per validation.
    Returns the last metrics record. Ctrl-C finishes the step under way, checkpoints it, then raises
    KeyboardInterrupt.
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    dtype = pick_precision(cfg.precision, d.device)
    if cfg.batch_size % d.world:
        raise LmforgeError(f"batch size {cfg.batch_size} does not split over {d.world} processes")
    torch.manual_seed(cfg.seed + d.rank)  # dropout; the data draws from its own per-step generators
    model.train()
    net = wrap(model, d, cfg.fsdp)
    if cfg.compile:
        model.compile()  # in place: parameter names (and so checkpoints) stay the same
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            fused=True)
    start = 0
    if resume and (found := checkpoints(ckpt_dir)):
        start = int(load_checkpoint(found[-1][1], net, opt, d)["step"])
    log = MetricsLog(run_dir / "metrics.jsonl", keep_until=start, enabled=d.rank == 0)
    bar = ProgressBar(cfg.steps, start, live=progress, quiet=quiet or d.rank != 0)
    extra = {"train_config": asdict(cfg), "run": run_info or {}}
    record: dict[str, Any] = {}
    finished = start
    stop = _StopAtStepEnd(enabled=d.world == 1)  # under torchrun, Ctrl-C stops every rank as it comes
    with bar, stop:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            record = _one_step(net, opt, data, loss, cfg, d, dtype, step)
            record.update(loss_metrics(loss))
            record["seconds"] = time.perf_counter() - t0
            record["tokens_per_s"] = cfg.batch_size * data.tokens_per_row / record["seconds"]
            finished = step + 1
            at_end = finished == cfg.steps
            if cfg.eval_every >= 0 and (at_end or (cfg.eval_every and finished % cfg.eval_every == 0)):
                record["val_loss"] = evaluate(net, data, loss, cfg, d, dtype)
                record["val_ppl"] = math.exp(min(record["val_loss"], 50))
                record.update(loss_metrics(loss, "val_"))
                if on_eval is not None and d.rank == 0:
                    record.update(on_eval(model, finished))
            log.write(record)
            bar.update(record)
            if finished % cfg.save_every == 0 or finished == cfg.steps or stop.requested:
                save_checkpoint(ckpt_dir, finished, net, opt, d, extra, cfg.keep)
                if d.rank == 0:
                    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
            if stop.requested:
                raise KeyboardInterrupt
    return record


def loss_metrics(loss: LossFn, prefix: str = "") -> dict[str, Any]:
    """What a loss object saw since it was last asked (its `take_metrics()`: DPO's reward accuracy, PPO's clip
    fraction ...), logged with the step; a plain loss function has none."""
    take = getattr(loss, "take_metrics", None)
    return {prefix + k: v for k, v in take().items()} if take is not None else {}


class _StopAtStepEnd:
    """Ctrl-C during training: finish the step under way (so the checkpoint is exactly step N), then stop; a
    second Ctrl-C stops at once. Only the main thread can take signals: elsewhere Ctrl-C acts as usual."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled, self.requested = enabled, False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopAtStepEnd:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _one_step(net: nn.Module, opt: torch.optim.Optimizer, data: TrainData, loss: LossFn, cfg: TrainConfig,
              d: Dist, dtype: torch.dtype, step: int) -> dict[str, Any]:
    lr = cfg.lr_at(step)
    for group in opt.param_groups:
        group["lr"] = lr
    batch = data.global_batch(step)
    n_targets = max(_targets(batch), 1)  # the same on every rank: each divides by the global count
    rows = rank_rows(batch, d)
    micros = list(_micro_batches(rows, cfg.micro_batch))
    loss_sum = torch.zeros((), dtype=torch.float64)
    for i, micro in enumerate(micros):
        # DDP averages gradients over ranks: scale by world so the result is the global sum / n_targets
        sync = i == len(micros) - 1 or not hasattr(net, "no_sync")
        with contextlib.nullcontext() if sync else net.no_sync():
            with torch.autocast(d.device.type, dtype=dtype, enabled=dtype != torch.float32):
                micro_loss = loss(net, _to(micro, d.device))
            (micro_loss * (d.world / n_targets)).backward()
        loss_sum += micro_loss.detach().double().cpu()
    grad_norm = (torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
    opt.step()
    opt.zero_grad(set_to_none=True)
    total = all_sum(loss_sum, d)
    return {"step": step + 1, "loss": float(total) / n_targets, "lr": lr, "grad_norm": float(grad_norm),
            "tokens": (step + 1) * cfg.batch_size * data.tokens_per_row}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
