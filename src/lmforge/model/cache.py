"""KV cache: per-row slots written by index, so rows join a running batch, leave it and have their slot reused
without copying anything.

Slot s keeps the key/value of its sequence's token at position p in column p: there is no padding in the
cache, a row's keys are columns 0..length-1, and which keys a query may see follows from positions alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmforge.errors import LmforgeError


class KVCache:
    """Keys/values of every self-attention layer for up to `slots` sequences of up to `max_len` tokens.

    `lengths` is host-side bookkeeping of the tokens each slot holds, kept by whoever schedules the rows (the
    engine), so a decode step never reads it back from the device. An encoder-decoder also keeps each slot's
    cross-attention keys/values (`memory_k`, `memory_v`) and which encoder positions are real (`memory_valid`).
    """

    def __init__(
        self, n_layer: int, slots: int, max_len: int, n_kv_head: int, head_dim: int,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, memory_len: int = 0,
    ) -> None:
        shape = (n_layer, slots, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slots, self.max_len = slots, max_len
        self.lengths = [0] * slots
        self.in_use = [False] * slots
        self.memory_len = memory_len
        self.memory_lengths = [0] * slots
        self.memory_k = self.memory_v = self.memory_valid = None
        if memory_len:
            mshape = (n_layer, slots, n_kv_head, memory_len, head_dim)
            self.memory_k = torch.zeros(mshape, device=device, dtype=dtype)
            self.memory_v = torch.zeros(mshape, device=device, dtype=dtype)
            self.memory_valid = torch.zeros(slots, memory_len, device=device, dtype=torch.bool)

    # ---- slots ---------------------------------------------------------------------------------

    def alloc(self) -> int:
        """The lowest free slot (so a decode batch over slots 0..k stays dense)."""
        for slot, used in enumerate(self.in_use):
            if not used:
                self.in_use[slot], self.lengths[slot], self.memory_lengths[slot] = True, 0, 0
                return slot
        raise LmforgeError(f"the KV cache has no free slot (all {self.slots} in use)")

    def release(self, slot: int) -> None:
        self.in_use[slot], self.lengths[slot], self.memory_lengths[slot] = False, 0, 0

    @property
    def n_free(self) -> int:
        return self.in_use.count(False)

    # ---- one forward call's view -----------------------------------------------------------------

    def step(self, first: int, positions: Tensor, kv_len: int | None = None, start: int | None = None) -> CacheStep:
        """The view a forward call over slots first..first+B-1 at `positions` (B, T) uses. `kv_len` (keys to
        read, = max position + 1) and `start` (all rows at start..start+T-1) come from the caller's
        bookkeeping; without them they are read from `positions` (a host sync)."""
        if kv_len is None:
            kv_len = int(positions.max()) + 1
        if kv_len > self.max_len:
            raise LmforgeError(f"context overflow: {kv_len} tokens > cache of {self.max_len}")
        if first < 0 or first + positions.shape[0] > self.slots:
            raise LmforgeError(f"cache rows {first}..{first + positions.shape[0] - 1} outside its {self.slots} slots")
        memory_len = max(self.memory_lengths[first : first + positions.shape[0]], default=0)
        return CacheStep(self, first, positions, kv_len, start, memory_len)

    def gather(self, slots: list[int], positions: Tensor, kv_len: int) -> CacheStep:
        """The view of a forward call over any slots (B of them, in this order) at `positions` (B, T): a
        decoder's prefill of several requests at once. Writes scatter into the slots; reads gather them."""
        if kv_len > self.max_len:
            raise LmforgeError(f"context overflow: {kv_len} tokens > cache of {self.max_len}")
        index = torch.tensor(slots, device=self.k.device)
        return CacheStep(self, slots[0], positions, kv_len, slots=index)

    def set_memory(self, first: int, memory_kv: list[tuple[Tensor, Tensor]], valid: Tensor) -> None:
        """Store the cross-attention keys/values of rows first..first+B-1 (each (B, n_kv, S, hd))."""
        assert self.memory_k is not None and self.memory_v is not None and self.memory_valid is not None
        B, S = valid.shape
        if S > self.memory_len:
            raise LmforgeError(f"encoder input of {S} tokens > the cache's {self.memory_len}")
        rows = slice(first, first + B)
        for layer, (k, v) in enumerate(memory_kv):
            self.memory_k[layer, rows, :, :S] = k
            self.memory_v[layer, rows, :, :S] = v
        self.memory_valid[rows] = False
        self.memory_valid[rows, :S] = valid
        for r in range(first, first + B):
            self.memory_lengths[r] = S


@dataclass
class CacheStep:
    """The cache as one forward call sees it: rows first..first+B-1, new tokens at `positions` (B, T)."""

    cache: KVCache
    first: int
    positions: Tensor  # (B, T)
    kv_len: int  # keys to read per row: max(positions) + 1
    start: int | None = None  # when every row writes positions start..start+T-1: a slice, not a scatter
    memory_len: int = 0  # encoder-decoder: encoder positions to read
    slots: Tensor | None = None  # (B,) the rows' slots when they are not first..first+B-1

    @property
    def rows(self) -> slice:
        return slice(self.first, self.first + self.positions.shape[0])

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this call's k, v (B, n_kv, T, hd) at their positions; return all keys/values to attend to."""
        if self.slots is not None:  # index (B, 1) x (B, T) -> (B, T, n_kv, hd), as below
            k_all, v_all, slot = self.cache.k[layer], self.cache.v[layer], self.slots[:, None]
            k_all[slot, :, self.positions] = k.transpose(1, 2).to(k_all.dtype)
            v_all[slot, :, self.positions] = v.transpose(1, 2).to(v_all.dtype)
            return k_all[self.slots, :, : self.kv_len], v_all[self.slots, :, : self.kv_len]
        k_rows, v_rows = self.cache.k[layer, self.rows], self.cache.v[layer, self.rows]  # views (B, n_kv, L, hd)
        if self.start is not None:
            T = k.shape[2]
            k_rows[:, :, self.start : self.start + T] = k
            v_rows[:, :, self.start : self.start + T] = v
        else:
            row = torch.arange(k.shape[0], device=k.device)[:, None]
            # index (B, T) -> (B, T, n_kv, hd); in the cache's dtype (bf16 under fp32 activations when quantized)
            k_rows[row, :, self.positions] = k.transpose(1, 2).to(k_rows.dtype)
            v_rows[row, :, self.positions] = v.transpose(1, 2).to(v_rows.dtype)
        return k_rows[:, :, : self.kv_len], v_rows[:, :, : self.kv_len]

    def memory(self, layer: int) -> tuple[Tensor, Tensor]:
        assert self.cache.memory_k is not None and self.cache.memory_v is not None
        S = self.memory_len
        return self.cache.memory_k[layer, self.rows, :, :S], self.cache.memory_v[layer, self.rows, :, :S]

    def memory_mask(self) -> Tensor:
        """(B, 1, 1, S) bool. Position 0 always counts, so a row of a free slot gives no NaN (its output is unused;
        a real row's first encoder position is always real)."""
        assert self.cache.memory_valid is not None
        valid = self.cache.memory_valid[self.rows, : self.memory_len].clone()
        valid[:, 0] = True
        return valid[:, None, None, :]
