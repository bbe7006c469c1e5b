"""More HF families and config corners, each a tiny random model built in transformers and compared with ours:
Qwen3 (q/k RMSNorm, explicit head_dim, attention_bias), Phi-3 (fused qkv_proj and gate_up_proj), Llama and
Mistral with attention_bias / mlp_bias, configs without tie_word_embeddings, tying decided by the checkpoint,
generation_config.json EOS ids, what we refuse, the T5 export's tying and GGUF user-defined tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import hf_logits, randomized
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    T5Config,
    T5ForConditionalGeneration,
)

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.weights.hf import config_from_hf, config_to_hf, load_hf_folder
from lmforge.weights.load import export_hf, load

V = 257  # = the byte tokenizer's vocabulary
TOL = 1e-4
PROMPTS = [[5, 17, 200, 3, 99, 42, 7], [11, 250, 64, 1, 128, 77, 33, 8, 19, 240, 6, 55, 100], [140]]
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=256, eos_token_id=256)


def qwen3(**kw):  # head_dim 32 != 64 // 4: the config's head_dim must be read, not derived
    return Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=32, rope_theta=30000.0, **kw)


# name -> (config factory, drop tie_word_embeddings from the saved config.json)
CASES = {
    "qwen3": (lambda: qwen3(tie_word_embeddings=True), False),
    "qwen3-bias-untied": (lambda: qwen3(tie_word_embeddings=False, attention_bias=True), False),
    "phi3": (lambda: Phi3Config(**SMALL | {"pad_token_id": None}, num_key_value_heads=2, tie_word_embeddings=False,
                                rope_theta=20000.0), False),
    "phi3-tied-gqa1": (lambda: Phi3Config(**SMALL | {"pad_token_id": None}, num_key_value_heads=1,
                                          tie_word_embeddings=True), False),
    "llama-bias": (lambda: LlamaConfig(**SMALL, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                                       tie_word_embeddings=False), False),
    # transformers' Mistral has no biases at all: attention_bias in its config is ignored, so must it be by us
    "mistral-bias": (lambda: MistralConfig(**SMALL, num_key_value_heads=2, attention_bias=True, sliding_window=None,
                                           tie_word_embeddings=False), False),
    # no tie_word_embeddings in config.json: untied because the checkpoint has lm_head.weight ...
    "mistral-untied-nokey": (lambda: MistralConfig(**SMALL, num_key_value_heads=4, sliding_window=None,
                                                   tie_word_embeddings=False), True),
    # ... and tied because it has none (transformers' default, untied, would leave a random head)
    "qwen2-tied-nokey": (lambda: Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True), True),
}


def make_hf(config, seed: int = 0):
    torch.manual_seed(seed)
    return randomized(AutoModelForCausalLM.from_config(config), seed)


def ours_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy tokens by repeated full forwards (no cache): independent of any generation API."""
    out = list(ids)
    for _ in range(n):
        out.append(int(ours_logits(model, out)[-1].argmax()))
    return out[len(ids) :]


def drop_config_key(folder: Path, key: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config))


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


def head_is_tied(model) -> bool:
    """No head of its own: none at all, or a module that shares the embedding's Parameter."""
    head = getattr(model, "lm_head", None)
    return head is None or head.weight is model.tok_emb.weight


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, byte_tokenizer_writer):
    """(name, transformers model, its folder, our model, our tokenizer)."""
    name = request.param
    factory, drop_tie = CASES[name]
    hf = make_hf(factory(), seed=list(CASES).index(name))
    folder = tmp_path_factory.mktemp(f"hf-{name}")
    hf.save_pretrained(folder)
    if drop_tie:
        drop_config_key(folder, "tie_word_embeddings")
    byte_tokenizer_writer(folder)
    model, tok = load(folder)
    return name, hf, folder, model, tok


def test_config_read(case):
    name, hf, folder, model, tok = case
    cfg = model.cfg
    kind = name.split("-")[0]
    assert cfg.hf_model_type == kind and cfg.vocab_size == V == tok.vocab_size
    assert (cfg.n_head, cfg.n_kv_head) == (4, hf.config.num_key_value_heads)
    assert cfg.qk_norm == (kind == "qwen3")
    assert cfg.head_dim == (32 if kind == "qwen3" else 16)
    has_head = "lm_head.weight" in load_file(folder / "model.safetensors")
    assert cfg.tie_embeddings == (not has_head) == hf.config.tie_word_embeddings
    assert head_is_tied(model) == cfg.tie_embeddings
    expected_bias = {"qwen3-bias-untied": (True, True, False), "llama-bias": (True, True, True),
                     "qwen2-tied-nokey": (True, False, False)}.get(name, (False, False, False))
    assert (cfg.qkv_bias, cfg.attn_out_bias, cfg.mlp_bias) == expected_bias
    if kind == "qwen3":
        assert cfg.rope_base == 30000.0 and cfg.norm_eps == 1e-6
        norm = model.decoder[0].attn.q_norm.weight
        assert norm.shape == (32,) and not torch.equal(norm, torch.ones(32))
        assert torch.equal(norm, hf.model.layers[0].self_attn.q_norm.weight)
    if name == "mistral-bias":  # the case tests something: the key is there, and transformers made no biases
        assert json.loads((folder / "config.json").read_text())["attention_bias"] is True
        assert hf.model.layers[0].self_attn.q_proj.bias is None
    if kind == "phi3":  # fused in the checkpoint, fused the same way in ours: copied as they are
        layer = hf.model.layers[1]
        assert torch.equal(model.decoder[1].attn.qkv.weight, layer.self_attn.qkv_proj.weight)
        assert torch.equal(model.decoder[1].mlp.fc_in.weight, layer.mlp.gate_up_proj.weight)


def test_logits_match(case):
    _, hf, _, model, _ = case
    for ids in PROMPTS:
        ours, theirs = ours_logits(model, ids), hf_logits(hf, ids)
        assert ours.shape == theirs.shape == (len(ids), V)
        assert theirs.abs().max() > 0.5  # a real signal, not all-near-zero logits
        assert (ours - theirs).abs().max().item() <= TOL


def test_greedy_matches_transformers(case):
    _, hf, _, model, _ = case
    for p in PROMPTS[:2]:
        ids = torch.tensor([p])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                              eos_token_id=None, pad_token_id=0)
        ours = greedy(model, p, 12)
        assert out[0, len(p) :].tolist() == ours
        assert len(set(ours)) >= 3  # a varied continuation, not one token repeated


def test_export_round_trip(case, tmp_path):
    name, hf, _, model, tok = case
    export_hf(model, tok, tmp_path)
    names = set(load_file(tmp_path / "model.safetensors"))
    assert ("lm_head.weight" in names) == (not model.cfg.tie_embeddings)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] == model.cfg.tie_embeddings  # always explicit in what we write
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(theirs) is type(hf)
    back, _ = load(tmp_path)
    assert back.cfg.to_dict() | {"name": ""} == model.cfg.to_dict() | {"name": ""}
    for ids in PROMPTS:
        ref = hf_logits(hf, ids)
        assert (hf_logits(theirs, ids) - ref).abs().max().item() <= TOL
        assert (ours_logits(back, ids) - ref).abs().max().item() <= TOL


# ---- tying decided by the checkpoint ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def untied_qwen2(tmp_path_factory, byte_tokenizer_writer):
    """An untied Qwen2 saved by transformers: (model, folder)."""
    hf = make_hf(Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=False), seed=1)
    folder = tmp_path_factory.mktemp("qwen2-untied")
    hf.save_pretrained(folder)
    byte_tokenizer_writer(folder)
    return hf, folder


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_config_says_tied_but_checkpoint_has_its_own_head(untied_qwen2, tmp_path):
    """transformers trusts the checkpoint (a different lm_head.weight is kept, untied): so do we."""
    hf, folder = untied_qwen2
    folder = copy_folder(folder, tmp_path / "m")
    edit_config(folder, tie_word_embeddings=True)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model, _ = load(folder)
    assert not model.cfg.tie_embeddings and not head_is_tied(model)
    for ids in PROMPTS:
        ref = hf_logits(hf, ids)
        assert (hf_logits(theirs, ids) - ref).abs().max().item() <= TOL
        assert (ours_logits(model, ids) - ref).abs().max().item() <= TOL


def test_config_says_tied_and_head_equals_embedding(untied_qwen2, tmp_path):
    """A checkpoint that stores the tied head as a copy (torch .bin files do) stays tied: no second matrix."""
    _, folder = untied_qwen2
    folder = copy_folder(folder, tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    edit_config(folder, tie_word_embeddings=True)
    cfg, ours = load_hf_folder(folder)
    assert cfg.tie_embeddings and "lm_head.weight" not in ours


def test_config_says_untied_but_no_head_is_an_error(untied_qwen2, tmp_path):
    _, folder = untied_qwen2
    folder = copy_folder(folder, tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LmforgeError, match="lm_head"):
        load_hf_folder(folder)


NO_TIE_KEY = {
    "llama": lambda: LlamaConfig(**SMALL, tie_word_embeddings=False),
    "mistral": lambda: MistralConfig(**SMALL, num_key_value_heads=4, sliding_window=None, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**SMALL, num_key_value_heads=4, tie_word_embeddings=False),
    "qwen3": lambda: qwen3(tie_word_embeddings=False),
    "phi3": lambda: Phi3Config(**SMALL | {"pad_token_id": None}, tie_word_embeddings=False),
}


@pytest.mark.parametrize("kind", list(NO_TIE_KEY))
def test_missing_tie_key_follows_the_checkpoint(tmp_path, kind):
    """Every Llama-like family: without tie_word_embeddings, lm_head.weight present = untied, absent = tied."""
    make_hf(NO_TIE_KEY[kind]()).save_pretrained(tmp_path)
    drop_config_key(tmp_path, "tie_word_embeddings")
    cfg, ours = load_hf_folder(tmp_path)
    assert not cfg.tie_embeddings and "lm_head.weight" in ours
    state = load_file(tmp_path / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg, ours = load_hf_folder(tmp_path)
    assert cfg.tie_embeddings and "lm_head.weight" not in ours


# ---- generation_config.json ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config_eos", "gen_eos", "expected"),
    [(256, [256, 7, 9], [256, 7, 9]), (256, 7, [256, 7]), ([256, 5], [5, 3], [256, 5, 3]), (None, 7, [7]),
     (256, None, [256])],
)
def test_generation_config_eos_ids_are_added(untied_qwen2, tmp_path, config_eos, gen_eos, expected):
    _, folder = untied_qwen2
    folder = copy_folder(folder, tmp_path / "m")
    edit_config(folder, eos_token_id=config_eos)
    gen = json.loads((folder / "generation_config.json").read_text()) | {"eos_token_id": gen_eos}
    (folder / "generation_config.json").write_text(json.dumps(gen))
    cfg, _ = load_hf_folder(folder)
    assert cfg.eos_token_ids == expected
    model, _ = load(folder)
    assert model.cfg.eos_token_ids == expected


def test_bad_generation_config_is_a_clear_error(untied_qwen2, tmp_path):
    _, folder = untied_qwen2
    folder = copy_folder(folder, tmp_path / "m")
    (folder / "generation_config.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="generation_config.json"):
        load_hf_folder(folder)


# ---- what we refuse -----------------------------------------------------------------------------------------


def phi3_config(**changes) -> dict:
    base = Phi3Config(**SMALL | {"pad_token_id": None}, num_key_value_heads=2).to_dict()
    return base | {"max_position_embeddings": 4096} | changes


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"partial_rotary_factor": 0.75, "rope_parameters": None, "rope_theta": 1e4}, "partial"),  # Phi-4-mini's
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial"),
        ({"rope_parameters": None, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8,
                                                    "long_factor": [1.0] * 8}}, "longrope"),
        ({"rope_parameters": None, "rope_scaling": {"type": "su"}}, "su"),
        ({"rope_parameters": None, "rope_scaling": {"type": "yarn"}}, "yarn"),
        ({"sliding_window": 2047}, "sliding"),  # Phi-3-mini-4k's
    ],
)
def test_phi3_unsupported_features_are_refused(changes, match):
    with pytest.raises(LmforgeError, match=match):
        config_from_hf(phi3_config(**changes))


def test_phi3_window_as_long_as_the_context_is_full_attention():
    assert config_from_hf(phi3_config(sliding_window=4096)).max_seq_len == 4096
    assert config_from_hf(phi3_config(sliding_window=None)).hf_model_type == "phi3"


@pytest.mark.parametrize(
    ("kind", "changes", "refused"),
    [
        ("mistral", {}, True),  # no sliding_window key: MistralConfig's default window of 4096 applies
        ("mistral", {"sliding_window": None}, False),
        ("qwen3", {"use_sliding_window": True, "sliding_window": 1024, "max_window_layers": 0}, True),
        ("qwen3", {"use_sliding_window": True, "sliding_window": 1024, "max_window_layers": 2}, False),
        ("qwen2", {"use_sliding_window": False, "sliding_window": 1024}, False),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 1024,
                   "layer_types": ["full_attention", "sliding_attention"]}, True),
    ],
)
def test_sliding_window_as_transformers_applies_it(kind, changes, refused):
    config = dict(model_type=kind, vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6) | changes
    if refused:
        with pytest.raises(LmforgeError, match="sliding"):
            config_from_hf(config)
    else:
        assert config_from_hf(config).hf_model_type == kind


def test_qwen3_head_dim_default_is_128():
    config = dict(model_type="qwen3", vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6)
    assert config_from_hf(config).head_dim == Qwen3Config(**SMALL).head_dim == 128


def test_export_refuses_what_the_family_cannot_express():
    with pytest.raises(LmforgeError, match="phi3"):
        config_to_hf(ModelConfig(hf_model_type="phi3", qkv_bias=True))
    with pytest.raises(LmforgeError, match="qwen3"):
        config_to_hf(ModelConfig(hf_model_type="qwen3", qk_norm=False))
    assert config_to_hf(ModelConfig(hf_model_type="qwen3", qk_norm=True, qkv_bias=True, attn_out_bias=True))[
        "attention_bias"]


# ---- T5: the export of a tied model loads back tied ---------------------------------------------------------


def write_t5_tokenizer(folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))


@pytest.mark.parametrize("version", ["v1.0-tied-scaled", "v1.1-tied-unscaled", "v1.1-untied"])
def test_t5_export_keeps_tying(tmp_path, version):
    """save_hf_folder writes an unscaled tied T5 with an lm_head.weight copy (for older transformers): loading
    that back must see the copy as the embedding again (tied, no second matrix), and keep the scaling."""
    vocab, d = 64, 32
    config = T5Config(vocab_size=vocab, d_model=d, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                      feed_forward_proj="relu" if version.startswith("v1.0") else "gated-gelu",
                      tie_word_embeddings=version.startswith("v1.0"), decoder_start_token_id=0)
    torch.manual_seed(0)
    hf = T5ForConditionalGeneration(config).eval()
    if version == "v1.1-untied":
        hf.lm_head.weight = torch.nn.Parameter(torch.randn(vocab, d))
    hf.save_pretrained(tmp_path / "a")
    write_t5_tokenizer(tmp_path / "a", vocab)
    model, tok = load(tmp_path / "a")
    tied = version != "v1.1-untied"
    assert model.cfg.tie_embeddings == tied
    assert model.cfg.logit_scale == (d**-0.5 if version.startswith("v1.0") else 1.0)
    export_hf(model, tok, tmp_path / "b")
    cfg, state = load_hf_folder(tmp_path / "b")
    assert (cfg.tie_embeddings, cfg.logit_scale) == (tied, model.cfg.logit_scale)
    assert ("lm_head.weight" in state) == (not tied)
    back, _ = load(tmp_path / "b")
    assert head_is_tied(back) == tied
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in model.parameters())
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


# ---- GGUF: user-defined tokens decode as transformers decodes them ------------------------------------------


def test_gguf_user_defined_token_decodes_like_transformers(tmp_path):
    """llama.cpp token type 4 (user-defined, like Qwen3's <think>) is an added token but not a special one: our
    decode with its defaults (which skip special tokens) keeps it, as transformers' decode with its defaults does."""
    from gguf import GGUFWriter
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from lmforge.tokenizer import Tokenizer
    from lmforge.weights.gguf import metadata, open_gguf

    b2u = bytes_to_unicode()
    merges = ["Ġ t", "h e", "Ġt he"]
    user = ["<think>", "</think>", "<a b>", "日本"]  # the last two are not in the byte-level alphabet
    tokens = [b2u[b] for b in range(256)] + [m.replace(" ", "") for m in merges] + ["<|endoftext|>"] + user
    types = [1] * (256 + len(merges)) + [3] + [4] * len(user)
    path = tmp_path / "tok.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|endoftext|>"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = Tokenizer.from_gguf(metadata(open_gguf(path)))
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    think, end = tokens.index("<think>"), tokens.index("</think>")
    cases = [
        [think, 104, 105, end, 32, 258],
        [104, think, 32, think, tokens.index("<a b>"), 10, tokens.index("日本")],
        [think],
    ]
    for ids in cases:
        assert ours.decode(ids) == theirs.decode(ids)
        assert "<think>" in ours.decode(ids)
    eot = tokens.index("<|endoftext|>")  # a control token: skipped by our default, kept by theirs
    assert ours.decode([think, eot]) == theirs.decode([think, eot], skip_special_tokens=True) == "<think>"
