"""The decode step's fused native ops (kernels/decode.cpp) against the model's own PyTorch path, their reference:
rope + KV-cache write + grouped-query attention in one call, and a gated MLP's silu(gate) * up."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.config import ModelConfig
from lmforge.model import kernels as K
from lmforge.model.layers import apply_rope, rope_tables
from lmforge.model.quantize import quantize
from lmforge.model.transformer import Transformer
from lmforge.train.lora import LoRAConfig, add_lora


@pytest.fixture(scope="session")
def native() -> bool:
    if not (K.available() or K.build()):
        pytest.skip("native kernels unavailable (no compiler / build failed): the PyTorch path is the only one")
    return True


def tiny(n_head: int, n_kv_head: int, head_dim: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, d_model=48, n_layer=2, n_head=n_head, n_kv_head=n_kv_head, head_dim=head_dim,
                      d_ff=80, max_seq_len=96)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def decode(model: Transformer, kv_dtype: torch.dtype, fused: bool | str, monkeypatch: pytest.MonkeyPatch,
           steps: int = 3) -> tuple[list[Tensor], Tensor, Tensor]:
    """Prefill four rows of different lengths into a cache, then `steps` batched decode steps (rows at different
    positions, slot 1 left free as the engine's dummy rows are) -> (each step's logits, the cache's k and v).
    fused: True = the whole block natively, "attention" = only the attention, False = the PyTorch path."""
    with monkeypatch.context() as m:
        if fused is not True:
            m.setattr(K, "decode_block", lambda *a, **k: None)
        if fused is False:
            m.setattr(K, "decode_attention", lambda *a, **k: None)
            m.setattr(K, "rope_heads", lambda *a, **k: None)
            m.setattr(K, "prefill_attention", lambda *a, **k: None)
        cache = model.new_cache(4, 96, dtype=kv_dtype)
        lengths = [30, 0, 7, 61]
        g = torch.Generator().manual_seed(1)
        with torch.inference_mode():
            for slot, n in enumerate(lengths):
                if n:
                    tokens = torch.randint(0, 97, (1, n), generator=g)
                    positions = torch.arange(n)[None]
                    model(tokens, positions, cache.step(slot, positions, kv_len=n, start=0))
            out = []
            for _ in range(steps):
                tokens = torch.randint(0, 97, (4, 1), generator=g)
                positions = torch.tensor(lengths)[:, None]
                out.append(model(tokens, positions, cache.step(0, positions, kv_len=max(lengths) + 1), read_at=0))
                lengths = [n + 1 for n in lengths]
        return out, cache.k.clone(), cache.v.clone()


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n_head", "n_kv_head", "head_dim"),
                         [(4, 2, 16), (3, 3, 32), (6, 2, 12), (2, 1, 64), (2, 2, 128)])
def test_fused_decode_attention_matches_the_model_path(native: bool, kv_dtype: torch.dtype, n_head: int,
                                                       n_kv_head: int, head_dim: int,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Same logits and caches within fp32 rounding; the first layer's cache bit-equal (its inputs are: rope is
    the same two products and a sum, and the bf16 store rounds to nearest even like Tensor.to). head_dim 12: the
    scalar path; 16 and 32: the vector one."""
    model = tiny(n_head, n_kv_head, head_dim)
    fused, k1, v1 = decode(model, kv_dtype, True, monkeypatch)
    plain, k2, v2 = decode(model, kv_dtype, False, monkeypatch)
    assert torch.equal(k1[0], k2[0]) and torch.equal(v1[0], v2[0])
    tol = 2e-5 if kv_dtype == torch.float32 else 1e-2  # a bf16 rounding may flip with a last-bit change
    torch.testing.assert_close(k1.float(), k2.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(v1.float(), v2.float(), rtol=tol, atol=tol)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * float(b.abs().max()))
    assert not torch.equal(fused[0], fused[1])  # the steps moved on


@pytest.mark.parametrize("quant", [None, "int4", "int8"])
def test_native_block_equals_the_modules_bit_for_bit(native: bool, quant: str | None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """decode_block makes the calls the block's modules make, in their order: equal logits and caches."""
    model = tiny(4, 2, 32)
    if quant:
        quantize(model, quant)  # type: ignore[arg-type]
        model.lm_head.bias = None
        for block in model.decoder:  # a bias on one projection: QuantLinear's y + bias in both paths
            block.attn.qkv.bias = torch.nn.Parameter(torch.randn(block.attn.qkv.out_features), requires_grad=False)
    block, k1, v1 = decode(model, torch.bfloat16, True, monkeypatch)
    modules, k2, v2 = decode(model, torch.bfloat16, "attention", monkeypatch)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)
    assert all(torch.equal(a, b) for a, b in zip(block, modules, strict=True))


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_native_block_follows_replaced_weights(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocks' native plans are cached: a weight replaced by another tensor, a Linear replaced by a quantized
    one, or a norm cast to bf16 after a first decode is what the next decode uses (or leaves to the modules)."""
    model = tiny(4, 2, 32)
    decode(model, torch.float32, True, monkeypatch)  # plans cached
    fc_out = model.decoder[0].mlp.fc_out
    fc_out.weight = torch.nn.Parameter(torch.randn_like(fc_out.weight), requires_grad=False)
    quantize(model.decoder[1], "int8")
    blocks = counted(monkeypatch, "decode_block")
    native_out, *_ = decode(model, torch.float32, True, monkeypatch)
    assert len(blocks) == 3 * model.cfg.n_layer
    modules_out, *_ = decode(model, torch.float32, "attention", monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(native_out, modules_out, strict=True))
    model.decoder[0].attn_norm.to(torch.bfloat16)  # the same Parameter object, now bf16: not the native block's
    blocks.clear()
    decode(model, torch.float32, True, monkeypatch)
    assert len(blocks) == 3 * (model.cfg.n_layer - 1)


def counted(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(K, name)

    def counting(*args: object) -> Tensor | None:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(K, name, counting)
    return calls


def test_native_paths_are_taken_and_left_when_a_hook_or_adapter_needs_the_modules(
        native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode steps run each block natively (never prefill); a forward hook on a projection, or a LoRA adapter,
    sends the block back through its modules (the attention alone stays native), and the hook fires."""
    model = tiny(4, 2, 16)
    blocks, attention = counted(monkeypatch, "decode_block"), counted(monkeypatch, "decode_attention")
    decode(model, torch.float32, True, monkeypatch, steps=2)
    assert len(blocks) == 2 * model.cfg.n_layer and not attention
    seen: list[int] = []
    handle = model.decoder[0].mlp.fc_out.register_forward_hook(lambda *_: seen.append(1))
    blocks.clear()
    decode(model, torch.float32, True, monkeypatch, steps=2)
    handle.remove()
    assert len(blocks) == 2 * (model.cfg.n_layer - 1) and len(attention) == 2
    assert len(seen) == 3 + 2  # three prefills, two steps
    blocks.clear()
    add_lora(model, LoRAConfig(r=2, targets=["q_proj"]))
    decode(model, torch.float32, True, monkeypatch, steps=1)
    assert not blocks


def test_decode_attention_is_deterministic_across_threads(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each (row, kv head) is one thread's work in one order."""
    model = tiny(4, 2, 16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode(model, torch.bfloat16, True, monkeypatch)[0]
        torch.set_num_threads(2)
        two = decode(model, torch.bfloat16, True, monkeypatch)[0]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def test_decode_attention_checks_its_inputs(native: bool) -> None:
    lib = K._load()
    assert lib is not None
    k = torch.zeros(2, 2, 8, 16)
    qkv, cs, pos = torch.zeros(1, 8 * 16), torch.zeros(1, 16), torch.tensor([3])
    lib.decode_attention(qkv, cs, cs, k, k.clone(), 1, pos, 4, 0.25)  # fine
    bad = [
        (qkv[:, :-1], cs, k, 0, pos, 4),  # qkv too narrow
        (qkv, cs[:, :8], k, 0, pos, 4),  # cos of the wrong size
        (qkv, cs, k.double(), 0, pos, 4),  # cache dtype
        (qkv, cs, k, 2, pos, 4),  # past the last slot
        (qkv, cs, k, 0, torch.tensor([8]), 4),  # past the cache's columns
        (qkv, cs, k, 0, pos.int(), 4),  # positions dtype
        (torch.zeros(1, 7 * 16), cs, k, 0, pos, 3),  # 3 query heads on 2 kv heads
    ]
    for q, c, cache, first, p, heads in bad:
        with pytest.raises(RuntimeError, match="decode_attention"):
            lib.decode_attention(q, c, c, cache, cache.clone(), first, p, heads, 0.25)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("B", "T", "H", "G", "hd"), [(1, 37, 9, 3, 64), (2, 5, 4, 4, 32), (1, 130, 2, 1, 128)])
def test_prefill_attention_matches_sdpa(native: bool, kv_dtype: torch.dtype, B: int, T: int, H: int, G: int,
                                        hd: int) -> None:
    """The native prompt attention (tiles of 4 query rows x 16 keys) = causal SDPA over the same cached keys and
    values, rows in their own slots past `first`, a T that fills neither a tile nor a key block."""
    if K.isa() != "avx512vnni":
        pytest.skip("prefill_attention is AVX512 only")
    g = torch.Generator().manual_seed(T)
    q = torch.randn(B * T, (H + 2 * G) * hd, generator=g)  # a fused projection's rows: query heads first
    k_cache = torch.randn(B + 1, G, T + 9, hd, generator=g).to(kv_dtype)
    v_cache = torch.randn(B + 1, G, T + 9, hd, generator=g).to(kv_dtype)
    y = K.prefill_attention(q, k_cache, v_cache, 1, T, H, hd**-0.5)
    qh = q[:, : H * hd].view(B, T, H, hd).transpose(1, 2)
    k, v = (c[1:, :, :T].float() for c in (k_cache, v_cache))
    ref = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=hd**-0.5, enable_gqa=True)
    assert y is not None
    torch.testing.assert_close(y, ref.transpose(1, 2).reshape(B * T, H * hd), rtol=1e-5, atol=1e-5)
    lib = K._load()
    with pytest.raises(RuntimeError, match="prefill_attention"):
        lib.prefill_attention(q, k_cache, v_cache, 2, T, H, 0.1)  # rows past the cache's slots
    with pytest.raises(RuntimeError, match="prefill_attention"):
        lib.prefill_attention(q[:, :8], k_cache, v_cache, 0, T, H, 0.1)  # rows narrower than the query heads


@pytest.mark.parametrize(("rows", "n_heads", "n_kv", "hd"), [(5, 3, 1, 16), (300, 9, 3, 64), (2, 1, 1, 6)])
def test_rope_heads_equals_apply_rope_bit_for_bit(native: bool, rows: int, n_heads: int, n_kv: int, hd: int) -> None:
    """Prefill's native rotary (the q and k heads of the fused projection, each row at its own position) gives
    apply_rope's bits: the same two rounded products and rounded sum. 300 rows take the row-parallel branch."""
    g = torch.Generator().manual_seed(rows)
    qkv = torch.randn(rows, (n_heads + 2 * n_kv) * hd, generator=g) * 3
    cos_table, sin_table = rope_tables(hd, 512, 10000.0)
    positions = torch.randint(0, 512, (rows,), generator=g)
    cos, sin = cos_table[positions], sin_table[positions]
    n_qk = n_heads + n_kv
    ref = apply_rope(qkv.view(rows, -1, hd)[:, :n_qk], cos[:, None], sin[:, None]).reshape(rows, -1)
    with torch.inference_mode():
        y = K.rope_heads(qkv, cos, sin, n_qk)
    assert y is not None and torch.equal(y, ref)
    lib = K._load()
    with pytest.raises(RuntimeError, match="rope_heads"):
        lib.rope_heads(qkv, cos[:, :-1].contiguous(), sin[:, :-1].contiguous(), n_qk)  # an odd head_dim
    with pytest.raises(RuntimeError, match="rope_heads"):
        lib.rope_heads(qkv, cos[:, ::2], sin[:, ::2], n_qk)  # strided tables
    with pytest.raises(RuntimeError, match="rope_heads"):
        lib.rope_heads(qkv, cos, sin, n_heads + 2 * n_kv + 1)  # more heads than the row holds


@pytest.mark.parametrize("shape", [(1, 1, 2 * 1536), (3, 7, 2 * 40), (300, 2 * 1536), (2, 2 * 5)])
def test_silu_mul_matches_torch(native: bool, shape: tuple[int, ...]) -> None:
    """Within a few ulps of F.silu(gate) * up: 16-wide steps, a scalar tail, the row-parallel branch, and
    values far into both tails of exp (silu -> 0 and silu -> x) and NaN."""
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g) * 4
    x.view(-1)[: min(8, x.numel() // 2)] = torch.tensor([-150.0, -90.0, -20.0, 0.0, 20.0, 90.0, 150.0, float("nan")])[
        : min(8, x.numel() // 2)]
    gate, up = x.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    with torch.inference_mode():
        y = K.silu_mul(x)
    if x.numel() > 1 << 16 and K.isa() != "avx512vnni":  # its exp is scalar there: PyTorch's ops are faster
        assert y is None
        return
    assert y is not None and y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=3e-6, atol=1e-30, equal_nan=True)
