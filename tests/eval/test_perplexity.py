"""Perplexity: one window = the plain cross-entropy of the text; a sliding window scores every token once,
each with exactly the context its window gives it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.eval.perplexity import perplexity
from lmforge.model.transformer import Transformer


def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name("tiny-llama")).eval()


def nll_of(m: Transformer, context: list[int], target: int) -> float:
    logits = m(torch.tensor([context]))[0, -1]
    return -F.log_softmax(logits.float(), -1)[target].item()


def test_one_window_is_the_cross_entropy():
    m = model()
    ids = torch.randint(0, m.cfg.vocab_size, (40,)).tolist()
    with torch.no_grad():
        logits = m(torch.tensor([ids]))[0]
        ce = F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()
    got = perplexity(m, ids)
    assert got.tokens == 39 and got.perplexity == pytest.approx(math.exp(ce), rel=1e-5)


def test_sliding_window_scores_each_token_once_with_its_windows_context():
    m = model()
    ids = torch.randint(0, m.cfg.vocab_size, (23,)).tolist()
    window, stride = 8, 3
    # by hand: windows start at 0, 3, 6, ...; a token is scored in the first window that holds it at index >= 1
    # and is not already scored
    expected, scored, begin = 0.0, 1, 0
    with torch.no_grad():
        while scored < len(ids):
            end = min(begin + window, len(ids))
            for t in range(scored, end):
                expected += nll_of(m, ids[begin:t], ids[t])
            scored, begin = end, begin + stride
    got = perplexity(m, ids, window=window, stride=stride)
    assert got.tokens == 22 and got.nll == pytest.approx(expected, rel=1e-4)
    assert got.nll > perplexity(m, ids, window=23).nll * 0.5  # sanity: same order as the full-context value


def test_bad_inputs():
    m = model()
    with pytest.raises(LmforgeError, match="two tokens"):
        perplexity(m, [1])
    with pytest.raises(LmforgeError, match="stride"):
        perplexity(m, [1, 2, 3], window=4, stride=9)


@pytest.mark.slow
def test_smollm2_perplexity_equals_transformers(smollm, hf_smollm):
    """The real weights, fp32: our perplexity of a fixed text = transformers' (labels = the inputs, shifted)."""
    model, tokenizer = smollm
    text = ("The quick brown fox jumps over the lazy dog. Language models assign a probability to every next token, "
            "and perplexity is the exponential of their average negative log-likelihood on a text.")
    ids = tokenizer.encode(text)
    with torch.inference_mode():
        loss = hf_smollm(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    got = perplexity(model, ids)
    assert got.tokens == len(ids) - 1
    assert got.perplexity == pytest.approx(math.exp(loss), rel=1e-4)
