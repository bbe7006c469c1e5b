"""torchrun, when present: which process this is, on which device, and the two collectives the loop needs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from lmforge.errors import LmforgeError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")


def pick_device(choice: str = "auto", local_rank: int = 0) -> torch.device:
    """auto: this process's GPU when CUDA is present, else the CPU."""
    if choice == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(choice)
    except RuntimeError:
        raise LmforgeError(f"unknown device {choice!r} (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmforgeError("--device cuda, but no CUDA GPU is available")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def setup(device: str = "auto") -> Dist:
    """One process, or one of torchrun's: the process group is started from torchrun's environment
    (nccl between GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world == 1:
        return Dist(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def teardown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def session(device: str = "auto") -> Iterator[Dist]:
    """setup() ... teardown(), whatever happens in between."""
    d = setup(device)
    try:
        yield d
    finally:
        teardown(d)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def all_sum(t: Tensor, d: Dist) -> Tensor:
    """Sum over ranks (a copy; gloo and nccl both take float64 on their own devices)."""
    if d.world == 1:
        return t
    t = t.to(d.device).clone()
    dist.all_reduce(t)
    return t.cpu()


def rank_rows(batch: dict[str, Tensor], d: Dist) -> dict[str, Tensor]:
    """This rank's contiguous share of a global batch's rows (training batches split evenly: the loop checks)."""
    if d.world == 1:
        return batch
    n = len(next(iter(batch.values())))
    # as tensor_split: the first n % world ranks take one row more, so no row is lost (a share may be empty)
    start = d.rank * (n // d.world) + min(d.rank, n % d.world)
    stop = start + n // d.world + (d.rank < n % d.world)
    return {k: v[start:stop] for k, v in batch.items()}
