"""Tiny random decoders built in transformers (Llama GQA, Qwen2 qkv-bias tied, GPT-2) match ours exactly:
logits, the KV cache, left-padded batches, greedy generation, sharded checkpoints and the HF export round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import engine_tokens, hf_logits, randomized
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from lmforge.weights.load import export_hf, load

V = 257  # = the byte tokenizer's vocabulary
TOL = 1e-4


def llama_config():
    return LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, rope_theta=5000.0, max_position_embeddings=128,
        rms_norm_eps=1e-6, bos_token_id=256, eos_token_id=256,
    )


def qwen2_config():
    return Qwen2Config(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, tie_word_embeddings=True, rope_theta=20000.0, max_position_embeddings=128,
        rms_norm_eps=1e-6, bos_token_id=256, eos_token_id=256,
    )


def gpt2_config():
    return GPT2Config(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=256, eos_token_id=256,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


CONFIGS = {"llama": llama_config, "qwen2": qwen2_config, "gpt2": gpt2_config}
PROMPTS = [
    [5, 17, 200, 3, 99, 42, 7],
    [11, 250, 64, 1, 128, 77, 33, 8, 19, 240, 6, 55, 100],
    [140],
    [9, 9, 9, 31, 250, 2],
]


def make_hf(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    return randomized(AutoModelForCausalLM.from_config(CONFIGS[kind]()), seed)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory, byte_tokenizer_writer):
    """(kind, transformers model, its folder, our model, our tokenizer)."""
    kind = request.param
    hf = make_hf(kind)
    folder = tmp_path_factory.mktemp(f"hf-{kind}")
    hf.save_pretrained(folder)
    byte_tokenizer_writer(folder)
    model, tok = load(folder)
    return kind, hf, folder, model, tok


def test_config_read(pair):
    kind, hf, _, model, tok = pair
    cfg = model.cfg
    assert cfg.hf_model_type == kind
    assert cfg.vocab_size == V == tok.vocab_size
    if kind == "llama":
        assert (cfg.n_head, cfg.n_kv_head, cfg.rope_base, cfg.tie_embeddings) == (4, 2, 5000.0, False)
        assert model.lm_head is not None
    if kind == "qwen2":
        assert cfg.qkv_bias and not cfg.attn_out_bias and cfg.tie_embeddings and cfg.rope_base == 20000.0
        assert model.lm_head.weight is model.tok_emb.weight  # tied: the head's module shares the Parameter
        assert model.decoder[0].attn.qkv.bias.abs().sum() > 0
    if kind == "gpt2":
        assert (cfg.pos, cfg.norm, cfg.gated_mlp, cfg.act) == ("learned", "layer", False, "gelu_tanh")


def test_logits_match(pair):
    _, hf, _, model, _ = pair
    for ids in PROMPTS:
        ours = model(torch.tensor([ids]))[0]
        theirs = hf_logits(hf, ids)
        assert ours.shape == theirs.shape == (len(ids), V)
        assert theirs.abs().max() > 0.5  # a real signal, not all-near-zero logits
        assert (ours - theirs).abs().max().item() <= TOL


def cached_logits(model, cache, slot: int, ids: list[int], start: int, scatter: bool = False) -> torch.Tensor:
    """Feed ids at positions start.. into one cache row -> (T, V) logits. `scatter` writes by index, not slice."""
    positions = torch.arange(start, start + len(ids))[None]
    step = cache.step(slot, positions, kv_len=start + len(ids), start=None if scatter else start)
    return model(torch.tensor([ids]), positions, step)[0]


def test_cache_equals_full_forward(pair):
    """Chunked prefill (several tokens into a non-empty cache) and one-token steps equal one full forward."""
    _, _, _, model, _ = pair
    ids = PROMPTS[1]
    full = model(torch.tensor([ids]))[0]
    for chunks in ([len(ids)], [1] * len(ids), [5, 1, 4, 3], [4, 6, 3]):
        for scatter in (False, True):
            cache = model.new_cache(2, 32)
            pieces, start = [], 0
            for n in chunks:
                pieces.append(cached_logits(model, cache, 1, ids[start : start + n], start, scatter))
                start += n
            assert (torch.cat(pieces) - full).abs().max().item() <= TOL, (chunks, scatter)


def test_rows_of_different_lengths_decode_together(pair):
    """Rows prefilled into their own slots, then decoded in one batched forward at their own positions: each
    row's logits equal its own full forward, whatever the other rows hold."""
    _, _, _, model, _ = pair
    rows = [PROMPTS[0] + [12, 13, 14], PROMPTS[1] + [12, 13, 14], PROMPTS[2] + [12, 13, 14]]
    cache = model.new_cache(len(rows), 32)
    for slot, r in enumerate(rows):
        cached_logits(model, cache, slot, r[:-3], 0)
    outs = []
    for back in (3, 2, 1):  # one token per row per step, each at its own position
        tokens = torch.tensor([[r[-back]] for r in rows])
        positions = torch.tensor([[len(r) - back] for r in rows])
        step = cache.step(0, positions, kv_len=max(len(r) for r in rows) - back + 1)
        outs.append(model(tokens, positions, step))
    batched = torch.cat(outs, dim=1)
    for i, r in enumerate(rows):
        alone = model(torch.tensor([r]))[0, -3:]
        assert (batched[i] - alone).abs().max().item() <= TOL


def test_batched_logits_equal_one_by_one(pair):
    _, _, _, model, _ = pair
    longest = max(len(p) for p in PROMPTS)
    tokens = torch.full((len(PROMPTS), longest), 0, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, p in enumerate(PROMPTS):
        tokens[i, longest - len(p) :] = torch.tensor(p)
        mask[i, longest - len(p) :] = 1
    batched = model(tokens, attention_mask=mask)
    assert torch.isfinite(batched).all()
    for i, p in enumerate(PROMPTS):
        alone = model(torch.tensor([p]))[0]
        assert (batched[i, longest - len(p) :] - alone).abs().max().item() <= TOL


def test_greedy_batched_equals_one_by_one_and_hf(pair):
    _, hf, _, model, _ = pair
    batched = engine_tokens(model, PROMPTS, eos_ids=[], max_new_tokens=32, temperature=0)
    for i, p in enumerate(PROMPTS):
        (alone,) = engine_tokens(model, [p], eos_ids=[], max_new_tokens=32, temperature=0)
        assert batched[i] == alone and len(alone) == 32
        ids = torch.tensor([p])
        with torch.no_grad():
            # eos_token_id=None: no early stop and no EOS suppression, exactly 32 free greedy steps like ours
            out = hf.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32, eos_token_id=None,
                pad_token_id=0,
            )
        assert out.shape[1] == len(p) + 32
        assert out[0, len(p) :].tolist() == alone
        assert len(set(alone)) >= 5  # a varied continuation, not one token repeated


def test_sharded_checkpoint_loads(pair, tmp_path, byte_tokenizer_writer):
    kind, hf, _, model, _ = pair
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    byte_tokenizer_writer(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    sharded, _ = load(tmp_path)
    ids = torch.tensor([PROMPTS[1]])
    assert torch.equal(sharded(ids), model(ids))


def test_export_round_trip(pair, tmp_path):
    kind, hf, _, model, tok = pair
    out = tmp_path / "export"
    export_hf(model, tok, out)
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert (out / "tokenizer.json").exists()
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs) is type(hf)
    back, back_tok = load(out)
    assert back.cfg.to_dict() | {"name": ""} == model.cfg.to_dict() | {"name": ""}
    assert back_tok.encode("héllo wörld") == tok.encode("héllo wörld")
    for ids in PROMPTS:
        ref = hf_logits(hf, ids)
        assert (hf_logits(theirs, ids) - ref).abs().max().item() <= TOL
        assert (back(torch.tensor([ids]))[0] - ref).abs().max().item() <= TOL


def test_export_preserves_tying(pair, tmp_path):
    kind, _, _, model, tok = pair
    export_hf(model, tok, tmp_path)
    from safetensors.torch import load_file

    names = set(load_file(Path(tmp_path) / "model.safetensors"))
    assert ("lm_head.weight" in names) == (kind == "llama")
