"""LoRA as a module swap: zero-initialised B changes nothing, only adapters (and modules_to_save) train, fused
parts get their own adapters, merging folds them exactly, and adapters round-trip through PEFT's format, in
both directions with PEFT itself on the transformers twin of the model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model.transformer import Transformer
from lmforge.train.lora import LoRAConfig, LoRALinear, add_lora, load_adapter, loras, merge_lora, save_adapter

TOKENS = torch.tensor([[5, 17, 200, 3, 99, 42, 7, 11], [9, 8, 7, 6, 5, 4, 3, 2]])
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT = ModelConfig(family="encoder", hf_model_type="bert", vocab_size=256, d_model=32, n_layer=2, n_head=4, d_ff=64,
                   max_seq_len=16, pos="learned", n_token_types=2, norm="layer", norm_eps=1e-12, post_norm=True,
                   gated_mlp=False, act="gelu", qkv_bias=True, attn_out_bias=True, mlp_bias=True, n_labels=3)


def tiny(name: str, seed: int = 0, n_labels: int = 0) -> Transformer:
    """A tiny model off its init (nonzero biases); the same seed gives the same weights. `n_labels`: a decoder
    with a classification (score) head too."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**BERT.to_dict()) if name == "bert" else ModelConfig.from_name(name)
    cfg.n_labels = cfg.n_labels or n_labels
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def run(model: nn.Module, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    """Logits: classification where there is a head for it (BERT: through pooler and classifier; decoders: the
    score head at the last token), else LM."""
    if model.cfg.family == "encoder":
        return model(tokens, head="classify")
    return model(tokens, head="classify", read_at=-1) if model.cfg.n_labels else model(tokens)


def randomise_b(model: nn.Module, seed: int = 1) -> None:
    """B away from zero, so every adapter shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name, targets", [
    ("tiny-llama", ["all-linear"]), ("tiny-llama", ["q_proj", "v_proj", "lm_head"]),
    ("tiny-gpt2", ["all-linear"]), ("tiny-gpt2", ["c_attn", "lm_head"]), ("bert", ["all-linear"]),
])
def test_zero_b_gives_the_base_model_exactly(name, targets):
    model = tiny(name).eval()
    with torch.no_grad():
        before = run(model)
        report = add_lora(model, LoRAConfig(r=4, targets=targets))
        assert torch.equal(run(model), before)
    assert report.modules and all(isinstance(model.get_submodule(m), LoRALinear) for m in report.modules)
    heads = {"lm_head", "classifier"} & set(report.modules)
    assert heads == ({"lm_head"} if "lm_head" in targets else set())  # all-linear leaves the heads alone


def test_a_step_trains_only_adapters_and_modules_to_save():
    model = tiny("bert")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    r, d, ff, layers, labels = 4, BERT.d_model, BERT.d_ff, BERT.n_layer, BERT.n_labels
    report = add_lora(model, LoRAConfig(r=r, alpha=8, modules_to_save=["classifier"]))

    # each part: A (r, in) + B (rows, r); q, k, v each their own; the pooler counts as a Linear (PEFT's all-linear)
    per_layer = 3 * (r * d + d * r) + (r * d + d * r) + (r * d + ff * r) + (r * ff + d * r)
    adapters = layers * per_layer + (r * d + d * r)
    classifier = d * labels + labels
    total = sum(p.numel() for p in base.values()) + adapters
    assert (report.trainable, report.total) == (adapters + classifier, total)
    assert report.percent == pytest.approx(100 * (adapters + classifier) / total)
    assert str(report) == (f"trainable params: {adapters + classifier:,d} || all params: {total:,d} || "
                           f"trainable%: {report.percent:.4f}")
    assert report.saved == ["classifier"] and "classifier" not in report.modules and "pooler" in report.modules

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0)
    labels_ = torch.tensor([0, 2])
    for _ in range(2):  # the first step moves B only (A's gradient is B^T-weighted: zero); the second moves A too
        opt.zero_grad()
        F.cross_entropy(run(model), labels_).backward()
        opt.step()
    after = dict(model.named_parameters())
    for name, p in after.items():
        if ".lora_" in name:
            continue
        original = base[name.replace(".base.", ".")]
        if name.startswith("classifier."):
            assert not torch.equal(p, original), name
        else:
            assert torch.equal(p, original) and p.grad is None, name  # frozen: bit-identical, no gradient kept
    assert sorted(trainable) == sorted(n for n in after if ".lora_" in n or n.startswith("classifier."))
    assert len(trainable) == 2 * (layers * 6 + 1) + 2  # A and B of every part, the pooler's, the classifier's
    for name in trainable:
        assert not torch.equal(after[name], start[name]), name


def test_fused_parts_get_their_own_adapters_and_the_others_stay_put():
    """q_proj + v_proj on our fused qkv (and up_proj on gate|up): k rows and gate rows never move."""
    model = tiny("tiny-llama")
    add_lora(model, LoRAConfig(r=4, targets=["q_proj", "v_proj", "up_proj"]))
    qkv, fc_in = model.decoder[0].attn.qkv, model.decoder[0].mlp.fc_in
    assert set(qkv.lora_A) == {"q_proj", "v_proj"} and set(fc_in.lora_A) == {"up_proj"}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        logits = model(TOKENS)
        F.cross_entropy(logits[:, :-1].reshape(-1, 256), TOKENS[:, 1:].reshape(-1)).backward()
        opt.step()
    cfg = model.cfg
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    x = torch.randn(2, 5, cfg.d_model)
    with torch.no_grad():
        out, base = qkv(x), qkv.base(x)
        assert torch.equal(out[..., q:q + kv], base[..., q:q + kv])  # k: untouched
        assert max_diff(out[..., :q], base[..., :q]) > 1e-4 and max_diff(out[..., q + kv:], base[..., q + kv:]) > 1e-4
        out, base = fc_in(x), fc_in.base(x)
        assert torch.equal(out[..., :cfg.d_ff], base[..., :cfg.d_ff])  # gate: untouched
        assert max_diff(out[..., cfg.d_ff:], base[..., cfg.d_ff:]) > 1e-4


def test_half_precision_base_keeps_fp32_adapters():
    """A bf16 base (as on a GPU): adapters stay fp32 like PEFT's, the output keeps the base's dtype, gradients
    reach the adapters, and merging folds them into the bf16 weights."""
    model = tiny("tiny-llama").to(torch.bfloat16).eval()
    with torch.no_grad():
        before = model(TOKENS)
    add_lora(model, LoRAConfig(r=4, targets=["q_proj", "v_proj", "lm_head"]))
    qkv = model.decoder[0].attn.qkv
    assert qkv.lora_A["q_proj"].dtype == torch.float32 and qkv.base.weight.dtype == torch.bfloat16
    out = model(TOKENS)
    assert out.dtype == torch.bfloat16 and torch.equal(out, before)
    out.float().logsumexp(-1).mean().backward()
    assert qkv.lora_B["v_proj"].grad is not None and qkv.lora_B["v_proj"].grad.abs().sum() > 0
    randomise_b(model)
    with torch.no_grad():
        unmerged = model(TOKENS).float()
        merge_lora(model)
        merged = model(TOKENS).float()
    assert model.decoder[0].attn.qkv.weight.dtype == torch.bfloat16
    assert max_diff(merged, unmerged) < 0.05 * unmerged.abs().max().item()  # bf16 rounding of the merged weights


@pytest.mark.parametrize("name, targets", [("tiny-llama", [*LLAMA_ALL, "lm_head"]), ("tiny-gpt2", ["all-linear"]),
                                           ("bert", ["all-linear"])])
def test_merge_gives_the_same_logits_and_plain_linears(name, targets):
    model = tiny(name).eval()
    keys = list(model.state_dict())
    add_lora(model, LoRAConfig(r=4, alpha=8, targets=targets))
    randomise_b(model)
    with torch.no_grad():
        unmerged = run(model)
        merge_lora(model)
        merged = run(model)
    assert max_diff(merged, unmerged) <= 1e-5 and max_diff(unmerged, run(tiny(name).eval())) > 1e-3
    assert not loras(model) and not hasattr(model, "lora_config")
    assert type(model.decoder[0].attn.qkv if model.decoder else model.encoder[0].attn.qkv) is nn.Linear
    assert list(model.state_dict()) == keys


def test_merge_refuses_a_lora_on_a_tied_head_and_changes_nothing():
    model = tiny("tiny-gpt2").eval()
    emb = model.tok_emb.weight.detach().clone()
    add_lora(model, LoRAConfig(r=4, targets=["c_attn", "lm_head"]))
    randomise_b(model)
    with torch.no_grad():
        before = run(model)
    with pytest.raises(LmforgeError, match="tied"):
        merge_lora(model)
    assert set(loras(model)) == {"lm_head", "decoder.0.attn.qkv", "decoder.1.attn.qkv"}
    assert torch.equal(model.tok_emb.weight, emb) and model.lm_head.weight is model.tok_emb.weight
    with torch.no_grad():
        assert torch.equal(run(model), before)


@pytest.mark.parametrize("name, cfg", [
    ("tiny-llama", LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])),
    ("tiny-llama-score", LoRAConfig(r=4, alpha=8, targets=["all-linear"], modules_to_save=["score"])),
    ("tiny-gpt2", LoRAConfig(r=2, alpha=4, targets=["all-linear"])),
    ("bert", LoRAConfig(r=4, alpha=16, dropout=0.1, modules_to_save=["classifier"])),
])
def test_adapter_round_trip(tmp_path, name, cfg):
    n_labels = 2 if name == "tiny-llama-score" else 0
    name = name.removesuffix("-score")
    model = tiny(name, n_labels=n_labels)
    report = add_lora(model, cfg)
    randomise_b(model)
    with torch.no_grad():
        for ours in report.saved:  # what a fine-tune would have changed
            model.get_submodule(ours).weight.add_(1.0)
        expected = run(model.eval())
    folder = tmp_path / "adapter"
    save_adapter(model, folder, base_model_name_or_path="org/base")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    spec = json.loads((folder / "adapter_config.json").read_text())
    assert (spec["peft_type"], spec["r"], spec["lora_alpha"], spec["lora_dropout"], spec["bias"]) == (
        "LORA", cfg.r, cfg.alpha, cfg.dropout, "none")
    assert spec["base_model_name_or_path"] == "org/base" and spec["fan_in_fan_out"] == (name == "tiny-gpt2")
    state = load_file(folder / "adapter_model.safetensors")
    if n_labels:
        assert spec["task_type"] == "SEQ_CLS" and spec["modules_to_save"] == ["score"]
        assert "lm_head" not in spec["target_modules"] and "score" not in spec["target_modules"]
        assert torch.equal(state["base_model.model.score.weight"], model.score.weight)
    elif name == "tiny-llama":
        assert spec["task_type"] == "CAUSAL_LM" and spec["target_modules"] == cfg.targets
        assert spec["modules_to_save"] is None and len(state) == 2 * 3 * 2
        assert state["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (32, 4)
        assert state["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 128)
    elif name == "tiny-gpt2":  # all-linear is written as the modules it found, as PEFT does
        assert "transformer.h.0.attn.c_attn" in spec["target_modules"] and "lm_head" not in spec["target_modules"]
        assert state["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (192, 2)
    else:
        assert spec["task_type"] == "SEQ_CLS" and spec["modules_to_save"] == ["classifier"]
        assert state["base_model.model.bert.encoder.layer.0.attention.self.key.lora_A.weight"].shape == (4, 32)
        assert torch.equal(state["base_model.model.classifier.weight"], model.classifier.weight)

    fresh = tiny(name, n_labels=n_labels)
    loaded = load_adapter(fresh, folder)
    assert (loaded.r, loaded.alpha, loaded.dropout, loaded.modules_to_save) == (cfg.r, cfg.alpha, cfg.dropout,
                                                                                cfg.modules_to_save)
    with torch.no_grad():
        assert torch.equal(run(fresh.eval()), expected)
    assert sorted(loras(fresh)) == sorted(loras(model))


def test_bad_input(tmp_path):
    with pytest.raises(LmforgeError, match=r"'query' match no module.*valid: .*q_proj"):
        add_lora(tiny("tiny-llama"), LoRAConfig(targets=["q_proj", "query"]))
    with pytest.raises(LmforgeError, match="valid: .*c_attn"):
        add_lora(tiny("tiny-gpt2"), LoRAConfig(targets=["q_proj"]))
    with pytest.raises(LmforgeError, match="modules_to_save.*'head'"):
        add_lora(tiny("bert"), LoRAConfig(modules_to_save=["head"]))
    with pytest.raises(LmforgeError, match="tied head"):
        add_lora(tiny("tiny-gpt2"), LoRAConfig(modules_to_save=["lm_head"]))
    with pytest.raises(LmforgeError, match="all-linear"):
        LoRAConfig(targets=["all-linear", "lm_head"])
    model = tiny("tiny-llama")
    add_lora(model, LoRAConfig(r=4, targets=["q_proj"]))
    with pytest.raises(LmforgeError, match="already has LoRA"):
        add_lora(model, LoRAConfig())
    save_adapter(model, tmp_path / "a", "x")
    other = tiny("tiny-gpt2")
    with pytest.raises(LmforgeError, match="'q_proj' match no module"):  # a Llama adapter on GPT-2
        load_adapter(other, tmp_path / "a")
    assert not loras(other) and all(p.requires_grad for p in other.parameters())  # refused before any change
    spec = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**spec, "use_dora": True}))
    with pytest.raises(LmforgeError, match="use_dora"):
        load_adapter(tiny("tiny-llama"), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**spec, "r": 8}))
    with pytest.raises(LmforgeError, match="shape"):
        load_adapter(tiny("tiny-llama"), tmp_path / "a")


# ---- PEFT on the transformers twin ---------------------------------------------------------------------------

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")


def llama_folder(folder: Path, write_tokenizer) -> Path:
    """tests/tiny.py's Llama (GQA, untied head), two layers. (tiny.py imports the root conftest by name, which
    this folder's conftest shadows.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=256, eos_token_id=256)
    LlamaForCausalLM(config).save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def gpt2_folder(folder: Path, write_tokenizer) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=257, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=256,
                        eos_token_id=256)
    GPT2LMHeadModel(config).save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def bert_cls_folder(folder: Path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def twins(tmp_path_factory, byte_tokenizer_writer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("twins")
    return {"llama": llama_folder(root / "llama", byte_tokenizer_writer),
            "gpt2": gpt2_folder(root / "gpt2", byte_tokenizer_writer),
            "bert": bert_cls_folder(root / "bert")}


def ours(kind: str, folder: Path) -> Transformer:
    from lmforge.weights.hf import load_hf_folder
    from lmforge.weights.load import build, load

    if kind == "bert":  # no tokenizer in this folder
        return build(*load_hf_folder(folder), inference=False)
    return load(folder, inference=False, device="cpu")[0]


def theirs(kind: str, folder: Path) -> nn.Module:
    import transformers

    cls = {"llama": transformers.LlamaForCausalLM, "gpt2": transformers.GPT2LMHeadModel,
           "bert": transformers.BertForSequenceClassification}[kind]
    return cls.from_pretrained(folder).eval()


def their_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def our_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return run(model.eval(), tokens)


CASES = {
    "llama": (LoRAConfig(r=4, alpha=8, targets=[*LLAMA_ALL, "lm_head"]),
              dict(target_modules=["q_proj", "v_proj", "gate_proj", "down_proj", "lm_head"], task_type="CAUSAL_LM")),
    "gpt2": (LoRAConfig(r=4, alpha=8, targets=["all-linear"]),
             dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM")),
    "bert": (LoRAConfig(r=4, alpha=8, targets=["all-linear"], modules_to_save=["classifier", "pooler"]),
             dict(target_modules="all-linear", task_type="SEQ_CLS")),
}


def tokens_for(kind: str) -> torch.Tensor:
    return TOKENS % 64 if kind == "bert" else TOKENS


@needs_peft
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_peft_loads_our_adapter(twins, tmp_path, kind):
    from peft import PeftModel

    model = ours(kind, twins[kind])
    add_lora(model, CASES[kind][0])
    randomise_b(model)
    if kind == "bert":  # a fresh head trained in full: pooler and classifier
        assert "pooler" not in loras(model)
        with torch.no_grad():
            model.classifier.bias.add_(0.5)
            model.pooler.weight.add_(0.1)
    tokens = tokens_for(kind)
    expected = our_logits(model, tokens)
    save_adapter(model, tmp_path / "adapter", str(twins[kind]))
    base = theirs(kind, twins[kind])
    assert max_diff(their_logits(base, tokens), expected) > 1e-3  # the adapter matters
    hf = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert max_diff(their_logits(hf, tokens), expected) <= 1e-5


@needs_peft
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_we_load_a_peft_adapter(twins, tmp_path, kind):
    from peft import LoraConfig, get_peft_model

    hf = get_peft_model(theirs(kind, twins[kind]), LoraConfig(r=4, lora_alpha=8, **CASES[kind][1]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    hf.save_pretrained(tmp_path / "adapter")
    tokens = tokens_for(kind)
    expected = their_logits(hf.eval(), tokens)
    model = ours(kind, twins[kind])
    cfg = load_adapter(model, tmp_path / "adapter")
    assert cfg.r == 4 and cfg.alpha == 8 and cfg.modules_to_save == (["classifier"] if kind == "bert" else [])
    assert max_diff(our_logits(model, tokens), expected) <= 1e-5
    if kind == "llama":  # PEFT's q and v adapters on our one qkv: the k rows have none
        assert set(model.decoder[0].attn.qkv.lora_A) == {"q_proj", "v_proj"}
