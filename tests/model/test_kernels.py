"""The int4/int8 x int8 matmul kernels (model/kernels): the PyTorch fallback against a plain fp64 reference, the
native extension against the fallback (same activation quantization bit for bit, same exact block dot products,
only the fp32 summation order may differ), in both the plain and the precise (two-pass residual) activation
modes, the packed layouts, and the build/load fallbacks."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model import kernels as K
from lmforge.model.layers import Norm

RTOL = 1e-5  # relative to max |y|: what fp32 summation order may change


@pytest.fixture(scope="session")
def native() -> bool:
    """Build (or find up to date) the extension once per session; native tests skip only where no build works."""
    return K.available() or K.build()


def need(native: bool) -> None:
    if not native:
        pytest.skip("native int4/int8 kernels unavailable (no compiler / build failed); fallback only")


@cache
def weights(kind: str, n: int, k: int, half_scales: bool = False) -> tuple[tuple[Tensor, ...], Tensor]:
    """Random packed weights and their fp64 dequantized matrix (the reference's W)."""
    g = torch.Generator().manual_seed(n * 7919 + k)
    nb = k // K.QK
    scale = torch.rand(n, nb, generator=g) * 0.02 + 1e-3
    if half_scales:
        scale = scale.half().float()
    if kind == "int4":
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        offset = -8 * scale + torch.randn(n, nb, generator=g) * 0.01  # Q4_1-like: nonzero mean offsets
        if half_scales:
            offset = offset.half().float()
        packed = K.pack_int4(codes, scale, offset)
        w = codes.double().reshape(n, nb, K.QK) * scale.double()[..., None] + offset.double()[..., None]
    else:
        codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        packed = K.pack_int8(codes, scale)
        w = codes.double().reshape(n, nb, K.QK) * scale.double()[..., None]
    return packed, w.reshape(n, k)


def mm(kind: str) -> Callable[..., Tensor]:
    return K.int4_mm if kind == "int4" else K.int8_mm


def activations(m: int, k: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed + 31 * m + k)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 3  # rows of different scales
    return x.to(dtype)


def with_outliers(m: int, k: int, seed: int = 0) -> Tensor:
    """Activations like a real model's: a few channels (the same in every row) 100x larger than the rest, so the
    plain mode's per-block scale is set by them and the block's other values round to 0 or +-1."""
    x = activations(m, k, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    channels = torch.randperm(k, generator=g)[: max(1, k // 96)]
    x[:, channels] *= 100
    return x


def rel(a: Tensor, b: Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def reference(x: Tensor, w: Tensor, precise: bool = False) -> Tensor:
    """fp64: the quantized activations (q d, + q2 d2 when precise) times the dequantized weights."""
    qs = K.quantize_activations(x, native=False, precise=precise)
    m, k = x.shape
    xq = torch.zeros(m, k, dtype=torch.float64)
    for q, d in zip(qs[0::3], qs[1::3], strict=True):
        xq += (q.double().reshape(m, -1, K.QK) * d.double()[..., None]).reshape(m, k)
    return xq @ w.T


# ---- the fallback -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precise", [False, True])
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 16, 32), (3, 48, 576), (17, 1000, 1536), (64, 37, 96)])
def test_fallback_matches_dequantized_reference(kind: str, m: int, n: int, k: int, precise: bool) -> None:
    packed, w = weights(kind, n, k)
    x = activations(m, k)
    y = mm(kind)(x, packed, n, k, native=False, precise=precise)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert rel(y, reference(x, w, precise)) < RTOL


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quantized_result_close_to_unquantized(kind: str, native: bool) -> None:
    """The only approximation is the activations' int8 rounding: small next to x @ W.T in fp64."""
    n, k = 300, 576
    packed, w = weights(kind, n, k)
    x = activations(8, k)
    exact = x.double() @ w.T
    for use in (False, True) if native else (False,):
        y = mm(kind)(x, packed, n, k, native=use)
        err = float((y.double() - exact).norm() / exact.norm())
        assert err < 1e-2, (use, err)
        assert err > 1e-5, "suspiciously exact: were the activations quantized at all?"


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_precise_is_far_more_accurate_with_outliers(kind: str, native: bool) -> None:
    """The point of the precise mode: on activations with outlier channels the plain mode's error (against x @ W.T
    in fp64) is large, the precise mode's is ~1/100 of it (the residual pass adds ~7 bits)."""
    n, k = 300, 576
    packed, w = weights(kind, n, k)
    x = with_outliers(8, k)
    exact = x.double() @ w.T
    for use in (False, True) if native else (False,):
        plain = float((mm(kind)(x, packed, n, k, native=use).double() - exact).norm() / exact.norm())
        precise = float((mm(kind)(x, packed, n, k, native=use, precise=True).double() - exact).norm() / exact.norm())
        assert plain > 3e-3, (use, plain)  # the outliers do hurt the plain mode
        assert precise < plain / 50, (use, plain, precise)


# ---- native == fallback -------------------------------------------------------------------------------------


@pytest.mark.parametrize("precise", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [32, 576, 1536])
@pytest.mark.parametrize("n", [16, 48, 1000])
@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_native_matches_fallback(kind: str, m: int, n: int, k: int, dtype: torch.dtype, precise: bool,
                                 native: bool) -> None:
    need(native)
    packed, _ = weights(kind, n, k)
    x = activations(m, k, dtype) if dtype != torch.float32 or not precise else with_outliers(m, k)
    yn = mm(kind)(x, packed, n, k, precise=precise)
    yf = mm(kind)(x, packed, n, k, native=False, precise=precise)
    assert yn.dtype == torch.float32 and yn.shape == (m, n)
    assert rel(yn, yf) < RTOL


@pytest.mark.parametrize("precise", [False, True])
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 49, 64), (9, 1000, 576), (256, 40, 1536)])
def test_native_matches_fallback_f16_scales(kind: str, m: int, n: int, k: int, precise: bool, native: bool) -> None:
    """Exactly-f16 scales (GGUF's) are stored as f16: the same numbers, from the other code path. M = 256 is a
    prefill-sized batch: the kernel serves every M, so prefill gives the same numbers as decode."""
    packed, w = weights(kind, n, k, half_scales=True)
    assert packed[1].dtype == torch.float16
    x = activations(m, k)
    yf = mm(kind)(x, packed, n, k, native=False, precise=precise)
    assert rel(yf, reference(x, w, precise)) < RTOL
    need(native)
    assert rel(mm(kind)(x, packed, n, k, precise=precise), yf) < RTOL


@pytest.mark.parametrize("precise", [False, True])
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_native_is_deterministic_across_threads(kind: str, precise: bool, native: bool) -> None:
    """Parallel over output rows only: each output is summed by one thread in one order."""
    need(native)
    n, k = 1000, 576
    packed, _ = weights(kind, n, k)
    x = activations(5, k)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = mm(kind)(x, packed, n, k, precise=precise)
        torch.set_num_threads(2)
        y2 = mm(kind)(x, packed, n, k, precise=precise)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("precise", [False, True])
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_shapes_leading_dims_and_empty(kind: str, precise: bool, native: bool) -> None:
    n, k = 48, 64
    packed, _ = weights(kind, n, k)
    x = activations(6, k)
    flat = mm(kind)(x, packed, n, k, precise=precise)
    for use in (None, False):
        y = mm(kind)(x.reshape(2, 3, k), packed, n, k, native=use, precise=precise)
        assert y.shape == (2, 3, n)
        assert rel(y.reshape(6, n), flat) < RTOL
        assert mm(kind)(x[:0], packed, n, k, native=use, precise=precise).shape == (0, n)
    with pytest.raises(LmforgeError):
        mm(kind)(activations(2, 96).reshape(2, 3, 32), packed, n, k)


# ---- activation quantization --------------------------------------------------------------------------------


def test_quantize_ties_zero_blocks_and_native_bits(native: bool) -> None:
    k = 128
    x = torch.randn(5, k) * 2
    # block 0 of row 0: max 127 -> d = 1 exactly, so x / d keeps the .5 ties: half-even gives 2, -4, 0, 2, -2
    x[0, :32] = 0.0
    x[0, :6] = torch.tensor([127.0, 2.5, -3.5, 0.5, 1.5, -2.5])
    # block 1 of row 0: max 63.5 -> d = 0.5: 1.25 / 0.5 = 2.5 -> 2, 0.75 / 0.5 = 1.5 -> 2
    x[0, 32:64] = 0.0
    x[0, 32:35] = torch.tensor([63.5, 1.25, 0.75])
    x[1, 64:96] = 0.0  # an all-zero block: d = 0, q = 0
    x[2] = 0.0  # an all-zero row
    x[3, :32] = 1e-39  # subnormal block: d underflows towards 0, whatever it is both sides must agree
    q, d, S = K.quantize_activations(x, native=False)
    assert q.dtype == torch.int8 and d.dtype == torch.float32 and S.dtype == torch.int32
    assert q.shape == (5, k) and d.shape == S.shape == (5, k // 32)
    assert q[0, :6].tolist() == [127, 2, -4, 0, 2, -2] and d[0, 0] == 1.0
    assert q[0, 32:35].tolist() == [127, 2, 2] and d[0, 1] == 0.5
    assert d[1, 2] == 0 and not q[1, 64:96].any() and S[1, 2] == 0 and not q[2].any()
    assert torch.equal(S, q.reshape(5, -1, 32).sum(-1, dtype=torch.int32))
    assert int(q.abs().max()) == 127
    need(native)
    odd = torch.randn(2, 64)
    odd[0, 3], odd[1, 50] = float("nan"), float("nan")  # block 0's first half, block 1's second half
    # quotients at and within a few ulps of a half, where a multiply by 1 / d could round the other way (the
    # native quantizer then divides): every block's max is 127 d, the rest (j + 0.5) d nudged by -4..4 ulps
    g = torch.Generator().manual_seed(5)
    scale = torch.rand(64, 48, 1, generator=g) * 10 + 1e-3
    halves = torch.randint(-127, 127, (64, 48, 32), generator=g).float() + 0.5
    halves[..., 0] = 127.0
    nudged = halves * scale
    steps = torch.randint(-4, 5, nudged.shape, generator=g)
    for _ in range(4):
        nudged = torch.where(steps > 0, torch.nextafter(nudged, torch.tensor(float("inf"))), nudged)
        nudged = torch.where(steps < 0, torch.nextafter(nudged, torch.tensor(float("-inf"))), nudged)
        steps = steps - steps.sign()
    for xs in (x, x.bfloat16(), torch.randn(33, 1536) * 1e3, torch.randn(1, 32) * 1e-20, nudged.reshape(64, -1)):
        qn, dn, Sn = K.quantize_activations(xs)
        qf, df, Sf = K.quantize_activations(xs, native=False)
        assert torch.equal(qn, qf) and torch.equal(dn, df) and torch.equal(Sn, Sf)
    # a NaN in either half of a block (the vector max would hide one): the scalar path's answer
    qn, dn, Sn = K.quantize_activations(odd)
    qf, df, Sf = K.quantize_activations(odd, native=False)
    assert torch.equal(qn, qf) and torch.equal(Sn, Sf) and torch.equal(dn.isnan(), df.isnan())
    assert torch.equal(dn.nan_to_num(), df.nan_to_num())


def test_quantize_precise_second_pass_and_native_bits(native: bool) -> None:
    """The residual pass: the same quantizer on r = x - p, p = d1 q1 (two fp32 roundings in that order), bit for
    bit the same natively (built with -ffp-contract=off: a fused x - d1 q1 would differ in many blocks)."""
    k = 128
    x = with_outliers(6, k)
    x[0, 32:64] = torch.arange(-127, 128, 8).float()  # integers, max 127: d1 = 1 and q1 = x exactly, so r = 0
    x[0, 64:96] = 0.0  # an all-zero block: d1 = d2 = 0, q1 = q2 = 0
    x[1, :32] = 1e-39  # subnormal block
    x[2, 32:64] = torch.tensor([100.0] + [0.01 * (j + 1) for j in range(31)])  # one outlier, small rest
    qs = K.quantize_activations(x, native=False, precise=True)
    assert len(qs) == 6
    q1, d1, S1, q2, d2, S2 = qs
    assert q2.dtype == torch.int8 and d2.dtype == torch.float32 and S2.dtype == torch.int32
    assert q2.shape == (6, k) and d2.shape == S2.shape == (6, k // 32)
    # the first pass is the plain mode's, unchanged
    for a, b in zip(qs[:3], K.quantize_activations(x, native=False), strict=True):
        assert torch.equal(a, b)
    # the second pass is the plain quantizer on the residual, in that op order
    p = d1.repeat_interleave(32, dim=1) * q1.float()
    for a, b in zip(qs[3:], K.quantize_activations(x - p, native=False), strict=True):
        assert torch.equal(a, b)
    assert d1[0, 1] == 1.0 and d2[0, 1] == 0 and not q2[0, 32:64].any()  # exact first pass: no residual
    assert d1[0, 2] == 0 and d2[0, 2] == 0 and not q2[0, 64:96].any() and S2[0, 2] == 0
    # the outlier block: the small values all round to 0 on the first pass, the second pass resolves them
    assert not q1[2, 33:64].any() and int(q2[2, 33:64].abs().max()) > 0
    xq = q1.float() * d1.repeat_interleave(32, dim=1) + q2.float() * d2.repeat_interleave(32, dim=1)
    small = slice(33, 64)  # within half a second-pass step, max|r| / 254: ~1/250 of them, not all of them
    assert float((xq[2, small] - x[2, small]).abs().max()) <= float(d2[2, 1]) / 2 * 1.001
    assert float(d2[2, 1]) < float(x[2, small].abs().max()) / 120
    assert torch.equal(S2, q2.reshape(6, -1, 32).sum(-1, dtype=torch.int32))
    need(native)
    for xs in (x, x.bfloat16(), torch.randn(33, 1536) * 1e3, with_outliers(64, 1536, seed=3),
               torch.randn(1, 32) * 1e-20):
        got = K.quantize_activations(xs, precise=True)
        want = K.quantize_activations(xs, native=False, precise=True)
        assert len(got) == 6
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_precise_equals_plain_when_the_first_pass_is_exact(kind: str, native: bool) -> None:
    """Integer activations with max 127 per block quantize exactly (d1 = 1, r = 0, d2 = 0): the second pass
    adds exactly nothing."""
    n, k = 40, 96
    packed, _ = weights(kind, n, k)
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-127, 128, (3, k), generator=g).float()
    x[:, ::32] = 127.0
    for use in (False, True) if native else (False,):
        plain = mm(kind)(x, packed, n, k, native=use)
        assert rel(mm(kind)(x, packed, n, k, native=use, precise=True), plain) < RTOL


# ---- packing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(1, 32), (16, 64), (37, 96), (1000, 576)])
def test_pack_roundtrip(n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n + k)
    c4 = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s, o = torch.rand(n, k // 32, generator=g), torch.randn(n, k // 32, generator=g)
    nib, ps, po = K.pack_int4(c4, s, o)
    groups = -(-n // 16)
    assert nib.shape == (groups, k // 32 * 256) and ps.shape == po.shape == (groups, k // 32 * 16)
    assert ps.dtype == torch.float32  # random fp32 scales are not exactly f16
    codes, s2, o2 = K.unpack_int4((nib, ps, po), n, k)
    assert torch.equal(codes, c4) and torch.equal(s2, s) and torch.equal(o2, o)
    c8 = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    packed = K.pack_int8(c8, s.half().float())
    assert packed[0].shape == (groups, k // 32 * 512) and packed[1].dtype == torch.float16
    codes8, s8 = K.unpack_int8(packed, n, k)
    assert torch.equal(codes8, c8) and torch.equal(s8, s.half().float())
    csum = packed[2].reshape(groups, k // 32, 16).transpose(1, 2).reshape(groups * 16, -1)[:n]
    assert torch.equal(csum.int(), c8.reshape(n, -1, 32).sum(-1, dtype=torch.int32))


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(LmforgeError):
        K.pack_int4(torch.full((2, 32), 16, dtype=torch.uint8), torch.ones(2, 1), torch.zeros(2, 1))
    with pytest.raises(LmforgeError):
        K.pack_int4(torch.zeros(2, 48, dtype=torch.uint8), torch.ones(2, 1), torch.zeros(2, 1))
    with pytest.raises(LmforgeError):
        K.pack_int8(torch.zeros(2, 64, dtype=torch.int8), torch.ones(2, 1))


# ---- rms norm -----------------------------------------------------------------------------------------------


def rms_inputs(shape: tuple[int, ...], weight: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """x with rows of different scales (and an all-zero row where there are several), weight ones or random."""
    g = torch.Generator().manual_seed(seed + sum(shape))
    d = shape[-1]
    x = torch.randn(*shape, generator=g) * (torch.rand(*shape[:-1], 1, generator=g) * 3 + 0.01)
    if x.numel() > d:
        x.view(-1, d)[1] = 0.0  # mean 0: y = x * rsqrt(eps) * w = 0, no NaN
    w = torch.ones(d) if weight == "ones" else torch.randn(d, generator=g)
    return x, w


@pytest.mark.parametrize("weight", ["ones", "random"])
@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 7, 64), (300, 1536), (5, 33), (70, 100)])
def test_rms_norm_native_matches_torch(shape: tuple[int, ...], weight: str, native: bool) -> None:
    """Within a few ulps of F.rms_norm: the same ops in the same order, but for the sum of squares'. (5, 33):
    the scalar tail; (70, 100): 64-wide, 16-wide and tail steps, and the row-parallel branch (>= 64 rows)."""
    need(native)
    x, w = rms_inputs(shape, weight)
    ref = F.rms_norm(x, (shape[-1],), w, 1e-6)
    lib = K._load()
    assert lib is not None
    y = lib.rms_norm(x, w, 1e-6)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.data_ptr() != x.data_ptr()
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    if x.numel() > shape[-1]:
        assert not y.view(-1, shape[-1])[1].any()
    with torch.inference_mode():
        assert torch.equal(K.rms_norm(x, w, 1e-6), y)  # the public function takes the native path here


def test_rms_norm_native_is_deterministic_across_threads(native: bool) -> None:
    """Each row is summed by one thread in one order (300 rows of 1536 do split across threads)."""
    need(native)
    x, w = rms_inputs((300, 1536), "random")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = K.rms_norm(x, w, 1e-5)
        torch.set_num_threads(2)
        y2 = K.rms_norm(x, w, 1e-5)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y2)


def test_rms_norm_native_checks_its_inputs(native: bool) -> None:
    need(native)
    lib = K._load()
    assert lib is not None
    x = torch.randn(2, 64)
    for bad_x, bad_w in ((x, torch.ones(32)), (x, torch.ones(64, dtype=torch.float64)), (x.double(), torch.ones(64)),
                         (x.T, torch.ones(2)), (torch.tensor(1.0), torch.ones(1))):
        with pytest.raises(RuntimeError, match="rms_norm"):
            lib.rms_norm(bad_x, bad_w, 1e-6)
    assert lib.rms_norm(x[:0], torch.ones(64), 1e-6).shape == (0, 64)


def test_rms_norm_falls_back_where_native_cannot_serve(native: bool) -> None:
    """Autograd, other dtypes and non-contiguous x get F.rms_norm itself (the same bits, gradients included)."""
    x, w = rms_inputs((4, 96), "random")
    wp = torch.nn.Parameter(w.clone())
    y = K.rms_norm(x, wp, 1e-6)  # grad enabled and the weight requires it: autograd records
    assert y.grad_fn is not None and torch.equal(y, F.rms_norm(x, (96,), wp, 1e-6))
    y.sum().backward()
    assert wp.grad is not None and wp.grad.shape == (96,)
    xg = x.clone().requires_grad_()
    assert K.rms_norm(xg, w, 1e-6).grad_fn is not None
    for xs, ws in ((x.bfloat16(), w.bfloat16()), (x.T, torch.ones(4)), (x.double(), w.double())):
        assert torch.equal(K.rms_norm(xs, ws, 1e-6), F.rms_norm(xs, (xs.shape[-1],), ws, 1e-6))
    with torch.no_grad():  # the parameter still requires grad, but nothing is recorded: native when built
        y = K.rms_norm(x, wp, 1e-6)
    assert y.grad_fn is None
    torch.testing.assert_close(y, F.rms_norm(x, (96,), w, 1e-6), rtol=1e-6, atol=1e-6)


def test_norm_uses_native_rms_norm_only_at_inference(native: bool) -> None:
    """layers.Norm: the native kernel for fp32 RMSNorm without autograd, F.rms_norm (bit for bit) in training."""
    need(native)
    norm = Norm(ModelConfig(d_model=576, norm="rms", norm_eps=1e-5))
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576))
    x, _ = rms_inputs((1, 1, 576), "ones")
    lib = K._load()
    assert lib is not None
    ref = F.rms_norm(x, (576,), norm.weight, 1e-5)
    with torch.inference_mode():
        y = norm(x)
    assert torch.equal(y, lib.rms_norm(x, norm.weight, 1e-5))
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    y = norm(x)  # training: the weight requires grad
    assert y.grad_fn is not None and torch.equal(y, ref)


# ---- build and load -----------------------------------------------------------------------------------------


def _reset(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh load state (restored after the test): as in a new process."""
    monkeypatch.setattr(K, "_lib", None)
    monkeypatch.setattr(K, "_tried", False)
    monkeypatch.setattr(K, "_noticed", False)
    monkeypatch.setattr(K, "_failure", None)


def test_missing_extension_falls_back_with_one_notice(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    _reset(monkeypatch)
    monkeypatch.setattr(K, "_name", lambda: K._PREFIX + "not_built_anywhere")
    assert not K.available() and not K.available()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith("lmforge: native int4/int8 kernels unavailable (")
    assert err[0].endswith("); using the PyTorch fallback (slower)")
    packed, w = weights("int4", 16, 64)
    x = activations(2, 64)
    assert rel(K.int4_mm(x, packed, 16, 64), reference(x, w)) < RTOL  # native=None: the fallback, silently
    with pytest.raises(LmforgeError):
        K.int4_mm(x, packed, 16, 64, native=True)
    assert capsys.readouterr().err == ""


def test_quiet_rms_norm_load_defers_the_notice(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """An fp32 model's norms look for the extension quietly (nothing int4/int8 to warn about); the matmuls still
    give the one notice afterwards."""
    _reset(monkeypatch)
    monkeypatch.setattr(K, "_name", lambda: K._PREFIX + "not_built_anywhere")
    x, w = torch.randn(2, 64), torch.randn(64)
    assert torch.equal(K.rms_norm(x, w, 1e-6), F.rms_norm(x, (64,), w, 1e-6))
    assert capsys.readouterr().err == ""
    packed, _ = weights("int4", 16, 64)
    K.int4_mm(x, packed, 16, 64)
    K.int4_mm(x, packed, 16, 64)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("lmforge: native int4/int8 kernels unavailable (")


def test_mismatched_extension_is_refused(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    need(native)
    _reset(monkeypatch)
    monkeypatch.setattr(K, "ABI", K.ABI + 1000)  # as if the .so came from another version of the Python side
    assert not K.available()


def test_build_failure_returns_false(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from torch.utils import cpp_extension

    def broken(**_: object) -> None:
        raise RuntimeError("Error building extension 'lmforge_qmatmul_x'\nc++: fatal error")

    _reset(monkeypatch)
    monkeypatch.setattr(cpp_extension, "load", broken)
    assert K.build() is False
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "build failed: RuntimeError: Error building extension" in err[0]


def test_import_is_cheap() -> None:
    code = "import sys, lmforge.model.kernels; print('torch.utils.cpp_extension' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False" and out.stderr == ""
