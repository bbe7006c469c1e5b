"""Tiny random BERTs built in transformers (masked LM, sequence classification) match ours: logits, right-padded
ragged batches against one-by-one, sentence embeddings, and the HF export round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, BertConfig

from lmforge.data.collate import pad_batch
from lmforge.embeddings import embed
from lmforge.errors import LmforgeError
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


def saved(kind: str, tmp_path_factory):
    """(kind, transformers model, its folder, our model, our tokenizer)."""
    folder = tmp_path_factory.mktemp(f"bert-{kind}")
    hf = make_hf(kind)
    hf.save_pretrained(folder)
    write_wordpiece_tokenizer(folder)
    model, tok = load(folder)
    return kind, hf, folder, model, tok


@pytest.fixture(scope="module", params=["mlm", "cls"])
def pair(request, tmp_path_factory):
    return saved(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def mlm(tmp_path_factory):
    return saved("mlm", tmp_path_factory)


def batch(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, as a BERT expects them."""
    return pad_batch(tok.encode_batch(texts), pad_id=0)


def head(kind: str, model, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(tokens, attention_mask=mask, head="mlm" if kind == "mlm" else "classify")


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
    hidden = model.encoder_forward(tokens, mask)
    for i, text in enumerate(TEXTS):
        one_tokens, one_mask = batch(tok, [text])
        n = one_tokens.shape[1]
        one = head(kind, model, one_tokens, one_mask)
        if kind == "mlm":
            torch.testing.assert_close(batched[i, :n], one[0], atol=TOL, rtol=0)
        else:
            torch.testing.assert_close(batched[i], one[0], atol=TOL, rtol=0)
        torch.testing.assert_close(hidden[i, :n], model.encoder_forward(one_tokens, one_mask)[0], atol=TOL, rtol=0)


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


def test_embed_plain_bert_folder_is_mean_pooled(mlm):
    """A BERT folder without sentence-transformers files embeds as sentence-transformers would: mean, no norm."""
    _, hf, folder, _, tok = mlm
    vectors = embed(TEXTS, model=str(folder), batch_size=3)
    assert vectors.shape == (len(TEXTS), 32) and vectors.dtype == np.float32
    tokens, mask = batch(tok, TEXTS)
    with torch.no_grad():
        hidden = hf.bert(input_ids=tokens, attention_mask=mask).last_hidden_state
    m = mask[..., None].float()
    expected = ((hidden * m).sum(1) / m.sum(1)).numpy()
    np.testing.assert_allclose(vectors, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("pooling, normalize", [("cls", False), ("mean", True)])
def test_embed_sentence_transformers_folder(mlm, tmp_path, pooling, normalize):
    """A folder saved by sentence-transformers itself (its current config format): pooling and normalisation
    follow it, and the vectors equal its own."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models

    folder = mlm[2]
    modules = [models.Transformer(str(folder), max_seq_length=8), models.Pooling(32, pooling_mode=pooling)]
    st = SentenceTransformer(modules=modules + ([models.Normalize()] if normalize else []), device="cpu")
    st.save(str(tmp_path))
    with pytest.warns(UserWarning, match="1 of 4 texts were longer than 8 tokens"):
        ours = embed(TEXTS, model=str(tmp_path))
    np.testing.assert_allclose(ours, st.encode(TEXTS), atol=TOL, rtol=0)
    model, _ = load(tmp_path)
    assert (model.cfg.pooling, model.cfg.normalize_embeddings, model.cfg.truncate_len) == (pooling, normalize, 8)


def test_unsupported_sentence_transformers_pooling_is_refused(mlm, tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models

    folder = mlm[2]
    st = SentenceTransformer(modules=[models.Transformer(str(folder)), models.Pooling(32, pooling_mode="max")])
    st.save(str(tmp_path))
    with pytest.raises(LmforgeError, match="pooling max"):
        load(tmp_path)


def test_onednn_fast_path_equals_plain_path_and_training_still_works(mlm):
    """Loading for inference swaps in oneDNN Linears (heads included); they equal plain nn.Linear, see a weight
    changed in place at once, and fall back to autograd-able F.linear when gradients are wanted."""
    import copy

    from torch import nn

    from lmforge.model.fast import OneDNNLinear, plain_linears, use_onednn

    _, _, _, loaded, tok = mlm
    model = copy.deepcopy(loaded)
    plain_linears(model)
    assert use_onednn(model, measure=False) > 0  # as `load` does where oneDNN measures faster
    assert isinstance(model.mlm_head, OneDNNLinear) and model.mlm_head.weight is model.tok_emb.weight
    plain = copy.deepcopy(model)
    assert plain_linears(plain) > 0
    assert not any(isinstance(m, OneDNNLinear) for m in plain.modules())
    assert isinstance(plain.mlm_head, nn.Linear) and plain.mlm_head.weight is plain.tok_emb.weight
    tokens, mask = batch(tok, TEXTS)
    with torch.no_grad():
        fast = model(tokens, attention_mask=mask, head="mlm")
        torch.testing.assert_close(fast, plain(tokens, attention_mask=mask, head="mlm"), atol=TOL, rtol=0)

    # a weight changed in place is seen by the fast path at once (nothing is cached beside the module)
    fc = model.encoder[0].mlp.fc_in
    with torch.no_grad():
        fc.weight.mul_(0.5)
        plain.encoder[0].mlp.fc_in.weight.mul_(0.5)
        changed = model(tokens, attention_mask=mask, head="mlm")
        expected = plain(tokens, attention_mask=mask, head="mlm")
        fc.weight.mul_(2.0)
    torch.testing.assert_close(changed, expected, atol=TOL, rtol=0)
    assert (changed - fast).abs().max() > 1e-3

    fc.weight.requires_grad_(True)
    try:
        model(tokens, attention_mask=mask, head="mlm").sum().backward()
        assert fc.weight.grad is not None and fc.weight.grad.abs().sum() > 0
    finally:
        fc.weight.requires_grad_(False)
        fc.weight.grad = None


def test_pretraining_checkpoint_with_gamma_beta_names(tmp_path):
    """BertForPreTraining (its unused next-sentence head) saved with the original gamma/beta LayerNorm names."""
    from safetensors.torch import load_file, save_file
    from transformers import BertForPreTraining

    config = make_hf("mlm").config
    torch.manual_seed(1)
    hf = BertForPreTraining(config).eval()
    hf.save_pretrained(tmp_path)
    write_wordpiece_tokenizer(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}
    assert renamed.keys() != state.keys()
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, tok = load(tmp_path)
    assert model.cfg.mlm_head
    tokens, mask = batch(tok, TEXTS)
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=mask).prediction_logits
    ours = model(tokens, attention_mask=mask, head="mlm")
    assert (ours - ref)[mask.bool()].abs().max().item() <= TOL
