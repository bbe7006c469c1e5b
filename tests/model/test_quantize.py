"""int8 / int4 weights: byte rows, GGUF blocks repacked without a float detour, the quantized Linears and whole
quantized models against their float originals, and the memory plan against what a load really holds."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from tiny import gguf_file

from lmforge.memory import weight_bytes
from lmforge.model import kernels
from lmforge.model.quantize import (
    Int4Linear,
    Int8Linear,
    dequantize_rows,
    pack_q4,
    pack_q8,
    q4_rows,
    q8_rows,
    quantize_int4,
    quantize_int8,
    quantized_nbytes,
    split_q4_rows,
)
from lmforge.weights.check import scan_gguf
from lmforge.weights.gguf import quantized_rows, raw_tensors
from lmforge.weights.load import load

T = GGMLQuantizationType


def _f16(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


def test_block_rows_pack_as_the_kernels_pack():
    """Q4_1 / Q8_0 block rows -> the kernels' layout by byte permutation = kernels.pack_* of the unpacked codes
    (37 rows: a partial last group of 16)."""
    torch.manual_seed(0)
    codes4 = torch.randint(0, 16, (37, 64), dtype=torch.uint8)
    scale, offset = _f16(torch.rand(37, 2)), _f16(torch.randn(37, 2))
    rows = q4_rows(codes4, scale, offset)
    back = split_q4_rows(rows)
    assert torch.equal(back[0], scale) and torch.equal(back[1], offset)
    for ours, theirs in zip(pack_q4(rows), kernels.pack_int4(codes4, scale, offset), strict=True):
        assert torch.equal(ours, theirs)
    codes8 = torch.randint(-127, 128, (37, 64), dtype=torch.int8)
    for ours, theirs in zip(pack_q8(q8_rows(codes8, scale)), kernels.pack_int8(codes8, scale), strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quantizers_stay_within_half_a_step(kind):
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    rows = quantize_int4(w) if kind == "int4" else quantize_int8(w)
    err = (dequantize_rows(rows, kind) - w).abs().reshape(48, 3, 32)
    spread = w.reshape(48, 3, 32)
    step = ((spread.amax(-1) - spread.amin(-1)) / 15) if kind == "int4" else spread.abs().amax(-1) / 127
    # half a step, plus fp16 rounding of the scale (and offset) times the largest code
    assert bool((err.amax(-1) <= 0.5 * step * 1.02 + 1e-6).all())


@pytest.mark.parametrize(("kind", "attn", "mlp"), [("int4", "Q4_1", "Q4_0"), ("int8", "Q8_0", "Q8_0")])
def test_gguf_blocks_repack_exactly(tmp_path, kind, attn, mlp):
    """Q4_0 / Q4_1 / Q8_0 blocks -> our block rows -> the same numbers gguf-py's dequantizer gives, bit for bit."""
    path = gguf_file(tmp_path / "t.gguf", attn=attn, mlp=mlp)
    for t in raw_tensors(path, scan_gguf(path)):
        if t.tensor_type in (T.F32, T.F16):
            continue
        rows, exact = quantized_rows(t, kind, 32)
        assert exact, t.name
        reference = torch.from_numpy(dequantize(t.data, t.tensor_type).astype("float32"))
        assert torch.equal(dequantize_rows(rows, kind), reference), t.name


@pytest.mark.parametrize(("dtype", "attn", "mlp"), [("int4", "Q4_1", "Q4_0"), ("int8", "Q8_0", "Q8_0")])
def test_quantized_load_keeps_the_files_weights(tmp_path, dtype, attn, mlp):
    """Loaded at int4 / int8, every Linear holds exactly the weights the fp32 load dequantizes (q/k rows permuted
    back on the bytes, q|k|v and gate|up fused), and the logits stay close."""
    path = gguf_file(tmp_path / "t.gguf", attn=attn, mlp=mlp)
    ref, _ = load(path, "float32")
    model, _ = load(path, dtype)
    body = Int4Linear if dtype == "int4" else Int8Linear
    for name in ("attn.qkv", "attn.out", "mlp.fc_in", "mlp.fc_out"):
        q = model.decoder[0].get_submodule(name)
        assert isinstance(q, body), name
        assert torch.equal(q.dequantized(), ref.decoder[0].get_submodule(name).weight), name
    assert isinstance(model.lm_head, Int8Linear)  # the tied head: int8 from the F16 embedding
    half, _ = load(path, "bfloat16")
    tokens = torch.randint(0, ref.cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = ref(tokens), model(tokens).float(), half(tokens).float()
    # the same weights, computed in bf16 with int8-quantized matmul inputs (and an int8 head): on this random
    # model that costs about what bf16 alone costs
    err, bf16_err = (a - b).abs().max(), (a - c).abs().max()
    assert 0 < err < 2.5 * bf16_err
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= (a.argmax(-1) == c.argmax(-1)).float().mean() - 0.1


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quantized_linear_matches_its_dequantized_weight(kind):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    q = Int4Linear.from_linear(linear) if kind == "int4" else Int8Linear.from_linear(linear)
    x = torch.randn(3, 7, 96)
    with torch.no_grad():
        reference = x @ q.dequantized().T + linear.bias
        y = q(x)
    assert y.shape == (3, 7, 40) and y.dtype == x.dtype
    assert (y - reference).abs().max() < 0.02 * reference.abs().max()  # int8 activations' rounding only
    assert sum(b.numel() * b.element_size() for b in q.buffers()) == quantized_nbytes(kind, 40, 96)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int4"])
def test_memory_plan_counts_the_loaded_weights_exactly(tmp_path, dtype):
    path = gguf_file(tmp_path / "t.gguf", attn="Q4_1", mlp="Q4_0")
    model, _ = load(path, dtype)
    held = {id(t): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    assert weight_bytes(model.cfg, dtype) == sum(held.values())
