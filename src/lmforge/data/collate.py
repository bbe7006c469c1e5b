"""Token lists -> padded batches."""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE = -100  # a label the loss skips (prompt tokens, padding), as PyTorch's cross_entropy takes it
Batch = dict[str, Tensor]  # every training batch: tensors by name, first dimension the row, `labels` included


def pad_batch(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """Token lists -> (tokens, attention mask), each (B, longest). Left padding puts every row's last token in
    the last column; right padding starts every row at column 0 (encoders, training batches)."""
    longest = max(len(r) for r in rows)
    tokens = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(longest - len(row), longest) if left else slice(0, len(row))
        tokens[i, span], mask[i, span] = torch.tensor(row, dtype=torch.long), 1
    return tokens, mask
