"""Tiny random BERTs built in transformers (masked LM, sequence classification) match ours: logits, right-padded
ragged batches against one-by-one, sentence embeddings, and the HF export round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, BertConfig

from lmforge.embeddings import embed
from lmforge.weights.load import export_hf, load

TOL = 1e-4
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away", "a", "big", "red", "ball", "##s", "##ed"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
V = len(SPECIAL) + len(WORDS)
TEXTS = ["the cat sat on the mat", "a dog", "", "the big red balls ran far far away and the cat sat"]


def write_wordpiece_tokenizer(folder: Path) -> None:
    """A real BERT WordPiece tokenizer.json ([CLS] text [SEP], lower-cased) over a tiny vocabulary."""
    from tokenizers.implementations import BertWordPieceTokenizer

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    BertWordPieceTokenizer(vocab, lowercase=True).save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "[PAD]", "unk_token": "[UNK]",
              "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def make_hf(kind: str, seed: int = 0):
    config = BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )
    torch.manual_seed(seed)
    auto = AutoModelForMaskedLM if kind == "mlm" else AutoModelForSequenceClassification
    model = auto.from_config(config)
    with torch.no_grad():  # move off the init (zero biases, unit norms) so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.05))
    return model.eval()


@pytest.fixture(scope="module", params=["mlm", "cls"])
def pair(request, tmp_path_factory):
    """(kind, transformers model, its folder, our model, our tokenizer)."""
    folder = tmp_path_factory.mktemp(f"bert-{request.param}")
    hf = make_hf(request.param)
    hf.save_pretrained(folder)
    write_wordpiece_tokenizer(folder)
    model, tok = load(folder)
    return request.param, hf, folder, model, tok


def batch(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, as a BERT expects them."""
    ids = tok.encode_batch(texts)
    longest = max(map(len, ids))
    tokens = torch.zeros(len(ids), longest, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, row in enumerate(ids):
        tokens[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return tokens, mask


def head(kind: str, model, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hidden = model.encode(tokens, mask)
    return model.mlm_logits(hidden) if kind == "mlm" else model.classify(hidden)


def hf_head(hf, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=tokens, attention_mask=mask, token_type_ids=torch.zeros_like(tokens)).logits


def test_config_and_family(pair):
    kind, _, _, model, tok = pair
    cfg = model.cfg
    assert (cfg.family, cfg.hf_model_type, cfg.d_model, cfg.n_layer, cfg.n_head, cfg.d_ff) == (
        "encoder", "bert", 32, 2, 4, 64
    )
    assert cfg.mlm_head == (kind == "mlm")
    assert cfg.n_labels == (3 if kind == "cls" else 0)
    assert tok.encode("the cats") == [2, 5, 6, 18, 3]  # [CLS] the cat ##s [SEP]


def test_logits_match_transformers(pair):
    kind, hf, _, model, tok = pair
    tokens, mask = batch(tok, TEXTS)
    assert not bool(mask.all())  # padding is exercised
    ours, ref = head(kind, model, tokens, mask), hf_head(hf, tokens, mask)
    if kind == "mlm":  # pad positions' outputs are unused and differ by design; compare the real ones
        ours, ref = ours[mask.bool()], ref[mask.bool()]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= TOL


def test_padded_batch_equals_one_by_one(pair):
    kind, _, _, model, tok = pair
    tokens, mask = batch(tok, TEXTS)
    batched = head(kind, model, tokens, mask)
    hidden = model.encode(tokens, mask)
    for i, text in enumerate(TEXTS):
        one_tokens, one_mask = batch(tok, [text])
        n = one_tokens.shape[1]
        one = head(kind, model, one_tokens, one_mask)
        if kind == "mlm":
            torch.testing.assert_close(batched[i, :n], one[0], atol=TOL, rtol=0)
        else:
            torch.testing.assert_close(batched[i], one[0], atol=TOL, rtol=0)
        torch.testing.assert_close(hidden[i, :n], model.encode(one_tokens, one_mask)[0], atol=TOL, rtol=0)


def test_export_round_trip(pair, tmp_path):
    kind, hf, _, model, tok = pair
    export_hf(model, tok, tmp_path)
    auto = AutoModelForMaskedLM if kind == "mlm" else AutoModelForSequenceClassification
    hf2 = auto.from_pretrained(tmp_path).eval()
    tokens, mask = batch(tok, TEXTS)
    ref, again = hf_head(hf, tokens, mask), hf_head(hf2, tokens, mask)
    assert (ref - again).abs().max().item() <= TOL
    ours2, tok2 = load(tmp_path)
    assert tok2.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    torch.testing.assert_close(head(kind, ours2, tokens, mask), head(kind, model, tokens, mask), atol=0, rtol=0)


def test_embed_plain_bert_folder_is_mean_pooled(pair):
    """A BERT folder without sentence-transformers files embeds as sentence-transformers would: mean, no norm."""
    kind, hf, folder, model, tok = pair
    if kind != "mlm":
        pytest.skip("one head is enough")
    vectors = embed(TEXTS, model=str(folder), batch_size=3)
    assert vectors.shape == (len(TEXTS), 32) and vectors.dtype == np.float32
    tokens, mask = batch(tok, TEXTS)
    with torch.no_grad():
        hidden = hf.bert(input_ids=tokens, attention_mask=mask).last_hidden_state
    m = mask[..., None].float()
    expected = ((hidden * m).sum(1) / m.sum(1)).numpy()
    np.testing.assert_allclose(vectors, expected, atol=TOL, rtol=0)
