"""Sampling: the inverse-CDF draw and the nucleus (top-p) found among the top candidates or, when their mass
falls short, over the whole sorted vocabulary: both give exactly the nucleus distribution."""

from __future__ import annotations

import math

import torch

from lmforge.sampling import NUCLEUS_CANDIDATES, SamplingParams, draw, sample


def test_draw_follows_the_weights_and_never_picks_a_zero_weight():
    g = torch.Generator().manual_seed(0)
    weights = torch.tensor([[0.0, 1.0, 0.0, 3.0, 0.0], [2.0, 0.0, 0.0, 0.0, 2.0]])
    picks = torch.stack([draw(weights, g) for _ in range(8000)])  # (n, 2)
    first = torch.bincount(picks[:, 0], minlength=5) / 8000
    second = torch.bincount(picks[:, 1], minlength=5) / 8000
    assert first[[0, 2, 4]].sum() == 0 and abs(float(first[3]) - 0.75) < 0.02
    assert second[[1, 2, 3]].sum() == 0 and abs(float(second[0]) - 0.5) < 0.02


def nucleus_counts(probs: list[float], top_p: float, n: int = 4000) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    logits = torch.log(torch.tensor([probs]))
    params = SamplingParams(temperature=1.0, top_p=top_p)
    picks = torch.cat([sample(logits, None, params, g) for _ in range(n)])
    return torch.bincount(picks, minlength=len(probs)) / n


def test_top_p_keeps_exactly_the_nucleus_renormalised():
    rest = [0.05 / 300] * 300  # a long tail beyond the candidates
    counts = nucleus_counts([0.5, 0.3, 0.15, *rest], top_p=0.8)
    # the mass before token 2 is 0.8: it is dropped; 0 and 1 keep their 5:3 odds
    assert counts[2:].sum() == 0 and abs(float(counts[0]) - 0.625) < 0.03


def test_top_p_beyond_the_candidates_sorts_the_whole_vocabulary():
    V = 4 * NUCLEUS_CANDIDATES
    probs = torch.linspace(2.0, 1.0, V)  # decreasing, nearly flat: the nucleus is most of the vocabulary
    probs = (probs / probs.sum()).tolist()
    counts = nucleus_counts(probs, top_p=0.9, n=6000)
    kept = next(i for i in range(V) if sum(probs[:i]) >= 0.9)  # tokens 0..kept-1 stay
    assert counts[kept:].sum() == 0
    assert counts[NUCLEUS_CANDIDATES:kept].sum() > 0.3  # found beyond the candidates
    assert math.isclose(float(counts[: NUCLEUS_CANDIDATES].sum()), sum(probs[:NUCLEUS_CANDIDATES]) / sum(
        probs[:kept]), abs_tol=0.03)
