"""KV cache: preallocated buffers, filled in place, so a decode step allocates nothing per layer."""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.config import ModelConfig


def pad_batch(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """Token lists -> (tokens, attention mask), each (B, longest). Decoders take left padding (every row
    ends at the last slot), encoders right padding (every row starts at position 0)."""
    longest = max(len(r) for r in rows)
    tokens = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(longest - len(row), longest) if left else slice(0, len(row))
        tokens[i, span], mask[i, span] = torch.tensor(row, dtype=torch.long), 1
    return tokens, mask


def left_pad_counts(keep: Tensor) -> Tensor:
    """(B, T) bool with True for real tokens, pads only at the left -> (B,) count of leading pads."""
    return (~keep).long().cumprod(dim=1).sum(dim=1)


class KVCache:
    """Keys/values of every self-attention layer for a batch of sequences that advance together.

    Rows of different lengths are left-padded: `valid` marks the real slots and `pad` is each row's
    count of leading pads, so a slot's position is `slot - pad[row]` (same tokens as one by one).
    For an encoder-decoder, `memory` holds each decoder layer's cross-attention keys/values and
    `memory_mask` the encoder padding, computed once from the encoder output.
    """

    def __init__(
        self, cfg: ModelConfig, batch: int, max_len: int, n_layer: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        shape = (n_layer, 2, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.kv = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)
        self.padded = False  # fast path: no pads anywhere -> no masks at decode
        self.length = 0
        self.max_len = max_len
        self.memory: list[tuple[Tensor, Tensor]] | None = None
        self.memory_mask: Tensor | None = None

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        return self.kv[i, 0], self.kv[i, 1]

    def set_padding(self, attention_mask: Tensor) -> None:
        """Record the left padding of the prompt chunk about to be written at slot `length`."""
        T = attention_mask.shape[1]
        keep = attention_mask.bool()
        self.valid[:, self.length : self.length + T] = keep
        if not bool(keep.all()):
            self.padded = True
            if self.length == 0:
                self.pad = left_pad_counts(keep)

    def select(self, rows: Tensor) -> None:
        """Keep only these batch rows: finished sequences leave the batch instead of costing compute."""
        self.kv = self.kv[:, :, rows]
        self.valid, self.pad = self.valid[rows], self.pad[rows]
        if self.memory is not None:
            self.memory = [(k[rows], v[rows]) for k, v in self.memory]
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask[rows]
