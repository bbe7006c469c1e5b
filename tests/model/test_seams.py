"""Module seams: every projection (heads included) is a module called as a module, so hooks fire, autocast
applies, biases get gradients, and a swapped-in LoRA-shaped wrapper, int8 Linear or oneDNN Linear works
everywhere. Also: init for training from scratch, dropout, and the heads reached through forward."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.model.fast import OneDNNLinear, plain_linears, swap_linears, use_onednn
from lmforge.model.quantize import Int4Linear, Int8Linear, quantize
from lmforge.model.transformer import Transformer

TOKENS = torch.tensor([[5, 17, 200, 3, 99, 42, 7, 11], [9, 8, 7, 6, 5, 4, 3, 2]])
LINEARS = (nn.Linear, OneDNNLinear, Int8Linear, Int4Linear)


def tiny(name: str = "tiny-gpt2", **changes) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(name)
    for k, v in changes.items():
        setattr(cfg, k, v)
    model = Transformer(cfg)
    with torch.no_grad():  # off the init: nonzero biases, so a lost bias shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inference(model: Transformer) -> Transformer:
    model = copy.deepcopy(model).eval().requires_grad_(False)
    use_onednn(model, measure=False)  # the swapped path, whichever is faster on this CPU
    return model


def projection_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, LINEARS)}


def fired(model: nn.Module, run) -> dict[str, torch.dtype]:
    """Run `run()` with a forward hook on every projection; name -> output dtype of those that fired."""
    seen: dict[str, torch.dtype] = {}
    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(n, out.dtype))
               for n, m in model.named_modules() if isinstance(m, LINEARS)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_hooks_fire_on_every_projection_in_inference_and_training(name):
    model = tiny(name)
    fast = inference(model)
    assert isinstance(fast.lm_head, OneDNNLinear) and isinstance(fast.decoder[0].attn.qkv, OneDNNLinear)
    expected = projection_names(model)
    assert "lm_head" in expected and len(expected) == 4 * model.cfg.n_layer + 1
    assert set(fired(fast, lambda: fast(TOKENS))) == expected
    assert set(fired(model.train(), lambda: model(TOKENS).sum().backward())) == expected


def test_tied_head_is_a_module_sharing_the_embedding():
    model = tiny("tiny-gpt2")
    assert model.cfg.tie_embeddings and model.lm_head.weight is model.tok_emb.weight
    # exactly one Parameter (the embedding) is reached twice: the head holds no copy of its own
    assert len(list(model.named_parameters(remove_duplicate=False))) == len(list(model.parameters())) + 1
    with torch.no_grad():
        ref = model(TOKENS)
        hidden = model(TOKENS, head="hidden")
    torch.testing.assert_close(ref, hidden @ model.tok_emb.weight.T)
    fast = inference(model)
    assert fast.lm_head.weight is fast.tok_emb.weight
    back = copy.deepcopy(fast)
    plain_linears(back)
    assert type(back.lm_head) is nn.Linear and back.lm_head.weight is back.tok_emb.weight


def test_bias_gradients_flow_on_plain_and_swapped_linears():
    model = tiny("tiny-gpt2")
    for candidate in (model.train(), inference(model).requires_grad_(True)):
        candidate.zero_grad()
        F.cross_entropy(candidate(TOKENS)[:, :-1].reshape(-1, 256), TOKENS[:, 1:].reshape(-1)).backward()
        biases = {n: p for n, p in candidate.named_parameters() if n.endswith("bias")}
        assert len(biases) > 10
        for n, p in biases.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_autocast_reaches_every_projection():
    model = tiny("tiny-llama")
    for candidate in (model.eval(), inference(model)):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            dtypes = fired(candidate, lambda c=candidate: c(TOKENS))
        assert set(dtypes) == projection_names(candidate)
        assert set(dtypes.values()) == {torch.bfloat16}


class LoRA(nn.Module):
    """LoRA's shape: the frozen base plus a low-rank update B(A(x)) * scale."""

    def __init__(self, base: nn.Module, rank: int = 4, scale: float = 2.0) -> None:
        super().__init__()
        self.base, self.scale = base, scale
        self.A = nn.Linear(base.in_features, rank, bias=False)
        self.B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.B(self.A(x)) * self.scale


@pytest.mark.parametrize("start", ["plain", "onednn"])
def test_lora_shaped_wrapper_swapped_in_everywhere(start):
    model = tiny("tiny-llama", tie_embeddings=True)
    model = model.eval() if start == "plain" else inference(model)
    with torch.no_grad():
        before = model(TOKENS)
    n = swap_linears(model, lambda _name, linear: LoRA(linear))
    assert n == 4 * model.cfg.n_layer + 1 and isinstance(model.lm_head, LoRA)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), before)  # B = 0: the base model exactly
        model.lm_head.B.weight.normal_()  # now the head's update must show, exactly as computed by hand
        hidden = model(TOKENS, head="hidden")
        head = model.lm_head
        expected = hidden @ model.tok_emb.weight.T + head.B(head.A(hidden)) * head.scale
        torch.testing.assert_close(model(TOKENS), expected, atol=1e-5, rtol=1e-5)
    # the adapters train, the tied base does not move
    model.requires_grad_(False)
    adapters = {n: p for n, p in model.named_parameters() if n.endswith((".A.weight", ".B.weight"))}
    assert len(adapters) == 2 * n
    for p in adapters.values():
        p.requires_grad_(True)
    model(TOKENS).logsumexp(-1).mean().backward()
    for name, p in adapters.items():  # every B learns; an A learns only where its B is already nonzero (the head)
        moves = name.endswith(".B.weight") or name == "lm_head.A.weight"
        assert p.grad is not None and (p.grad.abs().sum() > 0) == moves, name


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_linears_swapped_in_head_included(kind):
    model = inference(tiny("tiny-llama"))
    with torch.no_grad():
        ref = model(TOKENS)
        assert quantize(model, kind) == 4 * model.cfg.n_layer + 1
        assert isinstance(model.lm_head, Int8Linear)  # heads stay int8 under int4
        body = (Int8Linear if kind == "int8" else Int4Linear)
        assert all(isinstance(b.attn.qkv, body) for b in model.decoder)
        out = model(TOKENS)
        # the head by hand: its dequantized weights times the hidden state
        hidden = model(TOKENS, head="hidden")
        by_hand = hidden @ model.lm_head.dequantized().T
        assert (out - by_hand).abs().max() < 0.02 * by_hand.abs().max()
    err = (out - ref).abs().max().item()
    # quantized: close, not equal (4-bit noise adds up over a random model's layers)
    assert 0 < err < (0.05 if kind == "int8" else 0.2) * ref.abs().max().item()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > (0.9 if kind == "int8" else 0.75)


def test_fresh_init_loss_is_near_ln_vocab():
    """SmolLM2's shape, freshly initialised for training: the first loss is that of a uniform guess."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("smollm2-135m")
    cfg.n_layer = 6  # the shape of a layer is what matters; 6 keep the test quick
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 64))
    with torch.no_grad():
        loss = F.cross_entropy(model(tokens)[:, :-1].reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1 * math.log(cfg.vocab_size)
    out = model.decoder[0].attn.out.weight
    assert abs(out.std().item() - 0.02 / math.sqrt(2 * cfg.n_layer)) < 2e-3  # residual projections scaled down
    assert model.decoder[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_dropout_only_in_training():
    model = tiny("tiny-llama", dropout=0.5, attn_dropout=0.5)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(TOKENS), model(TOKENS))
        model.train()
        torch.manual_seed(1)
        a = model(TOKENS)
        torch.manual_seed(2)
        assert not torch.allclose(a, model(TOKENS))


def test_heads_through_forward():
    """LM logits, a decoder score head read at a chosen token per row (reward/value), MLM and classification."""
    decoder = tiny("tiny-llama", n_labels=1)
    with torch.no_grad():
        lm = decoder(TOKENS)
        hidden = decoder(TOKENS, head="hidden")
        scores = decoder(TOKENS, head="classify")  # (B, T, 1): a value per token
        at = torch.tensor([3, 7])
        read = decoder(TOKENS, head="classify", read_at=at)  # (B, 1): a reward at each row's last answer token
        last = decoder(TOKENS, read_at=-1)
    assert lm.shape == (2, 8, 256) and scores.shape == (2, 8, 1) and read.shape == (2, 1)
    torch.testing.assert_close(read, scores[torch.arange(2), at])
    torch.testing.assert_close(scores, hidden @ decoder.score.weight.T)
    torch.testing.assert_close(last, lm[:, -1])
    # DDP-style check: a backward through forward(head="classify") reaches the score head
    decoder.train()
    decoder(TOKENS, head="classify", read_at=at).sum().backward()
    assert decoder.score.weight.grad is not None and decoder.score.weight.grad.abs().sum() > 0

    cfg = ModelConfig(family="encoder", vocab_size=64, d_model=32, n_layer=1, n_head=4, d_ff=64, max_seq_len=16,
                      pos="learned", norm="layer", post_norm=True, gated_mlp=False, act="gelu", qkv_bias=True,
                      attn_out_bias=True, mlp_bias=True, n_token_types=2, n_labels=3, mlm_head=True)
    torch.manual_seed(0)
    encoder = Transformer(cfg).eval()
    tokens = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        hidden = encoder(tokens, head="hidden")
        assert encoder(tokens, head="classify").shape == (2, 3)
        mlm = encoder(tokens)  # default head of an MLM checkpoint
        transformed = encoder.mlm_norm(F.gelu(encoder.mlm_dense(hidden)))
        expected = transformed @ encoder.tok_emb.weight.T + encoder.mlm_head.bias
        torch.testing.assert_close(mlm, expected)
    assert encoder.mlm_head.weight is encoder.tok_emb.weight


def test_load_picks_the_faster_matmul_path(monkeypatch):
    from lmforge.model import fast

    model = tiny("tiny-llama").eval().requires_grad_(False)
    for decision, swapped in ((False, 0), (True, 4 * model.cfg.n_layer + 1)):
        calls = []
        monkeypatch.setattr(fast, "_DECISIONS", {})
        monkeypatch.setattr(fast, "onednn_is_faster", lambda _m, d=decision, c=calls: c.append(1) or d)
        assert use_onednn(copy.deepcopy(model)) == swapped
        assert use_onednn(copy.deepcopy(model)) == swapped and len(calls) == 1  # measured once per process
    monkeypatch.setenv("LMFORGE_ONEDNN", "1")  # the user's word wins over the measurement
    assert use_onednn(copy.deepcopy(model)) == 4 * model.cfg.n_layer + 1
    monkeypatch.setenv("LMFORGE_ONEDNN", "0")
    assert use_onednn(copy.deepcopy(model)) == 0
    monkeypatch.delenv("LMFORGE_ONEDNN")
    assert isinstance(fast.onednn_is_faster(model), bool)
