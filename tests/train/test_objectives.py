"""The objectives build the batches their papers describe: BERT's 15% with 80/10/10, T5's sentinel spans."""

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.train.objectives import IGNORE, CausalLM, MaskedLM, SpanCorruption


def test_causal_lm_targets_are_the_next_tokens():
    windows = torch.arange(2 * 9).reshape(2, 9)
    batch = CausalLM(block=8).batch(windows, torch.Generator())
    assert batch["tokens"].shape == batch["labels"].shape == (2, 8)
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    assert torch.equal(batch["labels"][:, -1], windows[:, -1])


def test_masked_lm_selects_15_percent_with_80_10_10():
    vocab, cls_id, sep_id, mask_id = 1000, 1, 2, 3
    obj = MaskedLM(block=130, vocab_size=vocab, cls_id=cls_id, sep_id=sep_id, mask_id=mask_id,
                   specials=(0, cls_id, sep_id, mask_id))
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(10, vocab, (512, 128), generator=g)
    windows[:, ::16] = sep_id  # document separators inside the window: never masked
    batch = obj.batch(windows, torch.Generator().manual_seed(1))
    tokens, labels = batch["tokens"], batch["labels"]
    original = torch.cat([torch.full((512, 1), cls_id), windows, torch.full((512, 1), sep_id)], dim=1)
    assert tokens.shape == labels.shape == (512, 130)
    assert torch.equal(tokens[:, 0], original[:, 0]) and torch.equal(tokens[:, -1], original[:, -1])
    selected = labels != IGNORE
    eligible = ~torch.isin(original, torch.tensor([cls_id, sep_id]))
    assert not (selected & ~eligible).any()
    assert torch.equal(labels[selected], original[selected])  # the labels are the original tokens
    share = selected.sum() / eligible.sum()
    assert abs(float(share) - 0.15) < 0.005
    masked = (tokens == mask_id) & selected
    unchanged = (tokens == original) & selected
    replaced = selected & ~masked & ~unchanged
    n = selected.sum()
    assert abs(float(masked.sum() / n) - 0.8) < 0.015
    # a random replacement can draw the original token (1 in 1000): the "unchanged" share is ~10.01%
    assert abs(float(unchanged.sum() / n) - 0.1) < 0.01
    assert abs(float(replaced.sum() / n) - 0.1) < 0.01
    assert not ((tokens != original) & ~selected).any()  # nothing outside the selection changes


def test_span_corruption_input_and_target_rebuild_the_text():
    sentinels = tuple(range(999, 899, -1))  # <extra_id_0> = 999, <extra_id_1> = 998, ...
    obj = SpanCorruption(raw=100, eos_id=1, start_id=0, sentinels=sentinels)
    windows = torch.randint(10, 800, (16, 100), generator=torch.Generator().manual_seed(0))
    batch = obj.batch(windows, torch.Generator().manual_seed(3))
    enc_len, dec_len, n_spans = SpanCorruption.lengths_for(100)
    assert batch["tokens"].shape == (16, enc_len) and batch["labels"].shape == (16, dec_len)
    assert (n_spans, enc_len, dec_len) == (5, 91, 21)  # 15 noise tokens in 5 spans
    assert torch.equal(batch["decoder_tokens"][:, 1:], batch["labels"][:, :-1])
    assert (batch["decoder_tokens"][:, 0] == 0).all()
    span_lengths = []
    for row, inp, tgt in zip(windows, batch["tokens"], batch["labels"], strict=True):
        assert inp[-1] == 1 and tgt[-1] == 1
        spans, current = {}, None
        for t in tgt[:-1].tolist():  # sentinel, its span, next sentinel, ...
            if t in sentinels:
                current = t
                spans[current] = []
            else:
                spans[current].append(t)
        assert list(spans) == list(sentinels[:n_spans])  # numbered in order
        rebuilt = []
        for t in inp[:-1].tolist():
            rebuilt += spans[t] if t in spans else [t]
        assert rebuilt == row.tolist()
        span_lengths += [len(s) for s in spans.values()]
    assert min(span_lengths) >= 1 and sum(span_lengths) / len(span_lengths) == 3.0


def test_span_corruption_needs_sentinels():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from lmforge.tokenizer import Tokenizer

    backend = HFTokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3}, unk_token="<unk>"))
    with pytest.raises(LmforgeError, match="sentinel"):
        SpanCorruption.for_tokenizer(64, Tokenizer(backend, eos_token="</s>", pad_token="<pad>"))
