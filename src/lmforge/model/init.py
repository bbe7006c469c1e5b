"""Weight init for training from scratch (GPT-2's recipe, as nanoGPT and litgpt use it).

normal(0, 0.02) for every Linear and Embedding, zero biases, unit norms; the projections that write into the
residual stream (attention out, MLP out) get std 0.02 / sqrt(2 * n_layer), so the residual's variance does not
grow with depth. A fresh model's first loss is then close to ln(vocab), the loss of a uniform guess.
"""

from __future__ import annotations

import math

import torch
from torch import nn

STD = 0.02
RESIDUAL_OUTPUTS = (".attn.out.weight", ".cross_attn.out.weight", ".mlp.fc_out.weight")


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    n_layer = sum(len(stack) for stack in (model.encoder, model.decoder) if stack is not None)  # type: ignore[arg-type]
    residual_std = STD / math.sqrt(2 * max(n_layer, 1))
    for name, p in model.named_parameters():  # tied Parameters are visited once
        if name.endswith(RESIDUAL_OUTPUTS):
            nn.init.normal_(p, 0.0, residual_std)
        elif p.ndim >= 2:  # Linear and Embedding weights
            nn.init.normal_(p, 0.0, STD)
        elif name.endswith("bias"):  # includes the MLM head's output bias
            nn.init.zeros_(p)
        else:  # norm scales
            nn.init.ones_(p)
