"""Objectives on preference pairs: DPO (and its variants) on a policy, Bradley–Terry on a reward model.

Both are losses for the one training loop (loop.py): called with a pair batch (data/preferences.py,
collate_pairs), they return the loss summed over the batch's pairs, and `take_metrics()` hands the loop what they
saw since it last asked (reward accuracy, margins), which it logs with the step.

DPO (Rafailov et al. 2023) with policy log-probs (pi_c, pi_r) and the reference's (ref_c, ref_r) of the chosen
and rejected answers, and h = (pi_c - ref_c) - (pi_r - ref_r):
  sigmoid  -log sigmoid(beta h)                                  (the paper's loss)
           with label smoothing eps: (1 - eps) of it plus eps of -log sigmoid(-beta h) (conservative DPO)
  robust   ((1 - eps)(-log sigmoid(beta h)) - eps(-log sigmoid(-beta h))) / (1 - 2 eps)  (Chowdhury et al. 2024)
  ipo      (h - 1 / (2 beta))^2 on per-token mean log-probs (Azar et al. 2023)
  rpo      sigmoid plus alpha times the chosen answer's negative log-likelihood per token (Pang et al. 2024):
           DPO alone can lower both answers' likelihood; the NLL term keeps the chosen one likely.
The implicit rewards beta (pi - ref) of each side give the logged accuracy (chosen above rejected) and margin.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.data.collate import Batch
from lmforge.data.preferences import SIDES
from lmforge.errors import LmforgeError

DPO_LOSSES = ("sigmoid", "robust", "ipo", "rpo")


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP holds the model in .module


def side(batch: Batch, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """One side's tokens, answer flags and attention (B, T), cut to its own longest row: a short chosen answer
    is not padded to a long rejected one (on pairs like "Paris." vs a paragraph, that padding was a third of the
    work)."""
    mask = batch[f"{name}_mask"]
    width = int(mask.sum(1).max())
    return batch[f"{name}_tokens"][:, :width], batch[f"{name}_answer"][:, :width], mask[:, :width]


def answer_logits(model: nn.Module, tokens: Tensor, answer: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The model's next-token logits at every position that predicts an answer token, and what they predict.
    Returns (logits (N, V), targets (N,), row of each (N,)). The LM head runs on those N positions only: over a
    49k vocabulary it is the costliest layer, and the prompt's positions need none of it."""
    inputs, targets, trained = tokens[:, :-1], tokens[:, 1:], answer[:, 1:].bool()
    hidden = model(inputs, attention_mask=mask[:, :-1], head="hidden")  # (R, T-1, d)
    rows = trained.nonzero()[:, 0]
    return unwrap(model).lm_logits(hidden[trained]), targets[trained], rows


def answer_logps(model: nn.Module, tokens: Tensor, answer: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's summed log-probability of its answer tokens (R,) and how many there are (R,)."""
    logits, targets, rows = answer_logits(model, tokens, answer, mask)
    logp = -F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
    sums = torch.zeros(tokens.shape[0], dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)
    return sums, answer[:, 1:].sum(1)


def dpo_loss(pi_chosen: Tensor, pi_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float,
             kind: str = "sigmoid", label_smoothing: float = 0.0) -> Tensor:
    """Per-pair DPO loss (B,) from the four log-probs (for ipo: per-token means). rpo's NLL term is added by the
    caller, which has the token counts."""
    h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    eps = label_smoothing
    if kind in ("sigmoid", "rpo"):
        return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    if kind == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    if kind == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise LmforgeError(f"unknown DPO loss {kind!r} ({', '.join(DPO_LOSSES)})")


class _Tally:
    """Sums of per-pair statistics since the loop last asked."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, n: int, **values: Tensor) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach().double().sum())
        self.n += n

    def take(self) -> dict[str, float]:
        out = {k: v / self.n for k, v in self.sums.items()} if self.n else {}
        self.sums, self.n = {}, 0
        return out


class DPOObjective:
    """The loop's DPO loss: pairs whose `ref_*` log-probs were computed beforehand (reference_logps)."""

    def __init__(self, beta: float = 0.1, kind: str = "sigmoid", label_smoothing: float = 0.0,
                 rpo_alpha: float = 1.0) -> None:
        if kind not in DPO_LOSSES:
            raise LmforgeError(f"unknown DPO loss {kind!r} ({', '.join(DPO_LOSSES)})")
        if beta <= 0:
            raise LmforgeError(f"beta must be > 0, not {beta}")
        if not 0 <= label_smoothing < 0.5:
            raise LmforgeError(f"label smoothing must be in [0, 0.5), not {label_smoothing}")
        self.beta, self.kind, self.label_smoothing, self.rpo_alpha = beta, kind, label_smoothing, rpo_alpha
        self.tally = _Tally()

    def __call__(self, model: nn.Module, batch: Batch) -> Tensor:
        B = batch["labels"].shape[0]
        (pi_c, n_c), (pi_r, n_r) = (answer_logps(model, *side(batch, name)) for name in SIDES)
        ref_c, ref_r = batch["ref_chosen"].to(pi_c.dtype), batch["ref_rejected"].to(pi_c.dtype)
        n_c, n_r = n_c.clamp(min=1), n_r.clamp(min=1)
        if self.kind == "ipo":  # IPO compares per-token means: long answers do not dominate the margin
            loss = dpo_loss(pi_c / n_c, pi_r / n_r, ref_c / n_c, ref_r / n_r, self.beta, "ipo")
        else:
            loss = dpo_loss(pi_c, pi_r, ref_c, ref_r, self.beta, self.kind, self.label_smoothing)
        nll = -pi_c / n_c
        if self.kind == "rpo":
            loss = loss + self.rpo_alpha * nll
        chosen, rejected = self.beta * (pi_c - ref_c), self.beta * (pi_r - ref_r)
        self.tally.add(B, reward_accuracy=(chosen > rejected).double(), reward_margin=chosen - rejected,
                       chosen_reward=chosen, rejected_reward=rejected, chosen_nll=nll)
        return loss.sum()

    def take_metrics(self) -> dict[str, float]:
        return self.tally.take()


@torch.no_grad()
def reference_logps(model: nn.Module, batches: list[Batch]) -> list[tuple[Tensor, Tensor]]:
    """The (chosen, rejected) summed answer log-probs of each batch under `model` as it is now (the reference:
    the base before training, or a LoRA model inside adapters_off)."""
    was = model.training
    model.eval()
    out = []
    for batch in batches:
        chosen, rejected = (answer_logps(model, *side(batch, name))[0].double().cpu() for name in SIDES)
        out.append((chosen, rejected))
    model.train(was)
    return out


# ---- reward model -------------------------------------------------------------------------------------------


def reward_scores(model: nn.Module, tokens: Tensor, mask: Tensor) -> Tensor:
    """A reward model's scalar for each right-padded row (R,): its score head read at the row's last token (the
    answer's end of turn: the whole answer is in view there)."""
    last = mask.sum(1) - 1
    return model(tokens, attention_mask=mask, head="classify", read_at=last)[:, 0].float()


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """-log P(chosen preferred) = -log sigmoid(r_chosen - r_rejected), per pair (B,)."""
    return -F.logsigmoid(chosen - rejected)


class RewardObjective:
    """The loop's reward-model loss on pair batches: Bradley–Terry; logs pairwise accuracy and margin."""

    def __init__(self) -> None:
        self.tally = _Tally()

    def __call__(self, model: nn.Module, batch: Batch) -> Tensor:
        B = batch["labels"].shape[0]
        chosen, rejected = (reward_scores(model, tokens, mask) for tokens, _, mask in (side(batch, n) for n in SIDES))
        self.tally.add(B, accuracy=(chosen > rejected).double(), margin=chosen - rejected)
        return bradley_terry_loss(chosen, rejected).sum()

    def take_metrics(self) -> dict[str, Any]:
        return self.tally.take()
