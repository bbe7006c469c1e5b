"""Weight-only int8 and int4 Linears (one fp16 scale, and for int4 an offset, per 32 input columns of a row: GGUF's
Q8_0 and Q4_1 forms), swapped in through model/fast.py's `swap_linears`, heads included.

Both multiply through model/kernels: activations quantized to int8 per 32-value block, exact integer block dot
products (AVX512-VNNI in the native build; a pure-PyTorch fallback gives the same numbers anywhere else).
PyTorch's own packed kernels (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`) were measured here first:
2.6x and 2.5x slower at decode shapes, bf16 activations only, and per-row int8 scales that cannot hold Q8_0's.

Quantized weights travel as *block rows*: GGUF's own bytes, one uint8 row per output feature, K/32 blocks each,
    int4: Q4_1 blocks of 20 bytes: fp16 scale d | fp16 offset m | 16 bytes of codes (byte j: element j in the
          low nibble, element j + 16 in the high one); w = d * code + m
    int8: Q8_0 blocks of 34 bytes: fp16 scale d | 32 int8 codes; w = d * code
Row-wise operations (concatenating q, k and v into qkv, permuting GGUF's rotary rows) then work on quantized
weights exactly as on float ones, a GGUF file's Q4_1 / Q8_0 tensors are used as they are read, and packing them
for the kernels is a byte permutation: no pass over unpacked codes at load time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.model import kernels
from lmforge.model.fast import swap_linears
from lmforge.precision import QuantKind

GROUP = 32  # input columns sharing a scale: the kernels' block (and GGUF's Q4/Q8 block)
HEADS = ("lm_head", "mlm_head", "score", "classifier")


# ---- block rows ---------------------------------------------------------------------------------------

Q4_BLOCK, Q8_BLOCK = 20, 34  # bytes per 32 weights
# Activations quantized in two int8 passes (the second on the first's rounding error, ~15 bits): one pass, as
# llama.cpp does, turned SmolLM2's answer to "What is the capital of France?" into French word salad (so does
# llama.cpp's on the same file); the attention output projection's input, with its outlier channels, was enough.
PRECISE = True


def _f16_bytes(t: Tensor) -> Tensor:
    """(N, B) values -> (N, B, 2) bytes of their fp16."""
    return t.to(torch.float16).contiguous().view(torch.uint8).reshape(*t.shape, 2)


def _f16_field(blocks: Tensor, start: int) -> Tensor:
    """(N, B, bytes) blocks -> (N, B) fp32 of the fp16 at byte `start` of each block."""
    return blocks[..., start : start + 2].contiguous().view(torch.float16)[..., 0].float()


def q4_rows(codes: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    """codes (N, K) in 0..15, scale and offset (N, K/32) (rounded to fp16) -> Q4_1 block rows (N, K/32 * 20)."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n, k // 32, 2, 16)
    qs = c[:, :, 0] | (c[:, :, 1] << 4)  # (N, B, 16)
    return torch.cat([_f16_bytes(scale), _f16_bytes(offset), qs], dim=-1).reshape(n, -1)


def split_q4_rows(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Q4_1 block rows -> scale (N, B) fp32, offset (N, B) fp32, qs (N, B, 16) uint8."""
    blocks = rows.reshape(rows.shape[0], -1, Q4_BLOCK)
    return _f16_field(blocks, 0), _f16_field(blocks, 2), blocks[..., 4:]


def q8_rows(codes: Tensor, scale: Tensor) -> Tensor:
    """codes (N, K) int8, scale (N, K/32) (rounded to fp16) -> Q8_0 block rows (N, K/32 * 34)."""
    n, k = codes.shape
    qs = codes.to(torch.int8).contiguous().view(torch.uint8).reshape(n, k // 32, 32)
    return torch.cat([_f16_bytes(scale), qs], dim=-1).reshape(n, -1)


def split_q8_rows(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Q8_0 block rows -> scale (N, B) fp32, codes (N, B, 32) int8."""
    blocks = rows.reshape(rows.shape[0], -1, Q8_BLOCK)
    return _f16_field(blocks, 0), blocks[..., 2:].contiguous().view(torch.int8)


def in_features_of(rows: Tensor, kind: QuantKind) -> int:
    return rows.shape[1] // (Q4_BLOCK if kind == "int4" else Q8_BLOCK) * 32


def _f16(t: Tensor) -> Tensor:
    return t.to(torch.float16).float()


def quantize_int4(w: Tensor, group: int = GROUP) -> Tensor:
    """Float (N, K) -> Q4_1 block rows: each block's min..max spread over 16 levels (GGUF's Q4_1 rule)."""
    N, K = w.shape
    if K % group:
        raise LmforgeError(f"int4 needs the input size {K} to be a multiple of {group}")
    wg = w.detach().float().reshape(N, K // group, group)
    low, high = _f16(wg.amin(dim=-1)), wg.amax(dim=-1)  # (N, B)
    scale = _f16((high - low) / 15)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((wg - low[..., None]) / safe[..., None]).clamp(0, 15)
    return q4_rows(codes.reshape(N, K), scale, low)


def quantize_int8(w: Tensor, group: int = GROUP) -> Tensor:
    """Float (N, K) -> Q8_0 block rows, symmetric per block of 32: scale = max|w| / 127 (GGUF's Q8_0 rule)."""
    N, K = w.shape
    if K % group:
        raise LmforgeError(f"int8 needs the input size {K} to be a multiple of {group}")
    wg = w.detach().float().reshape(N, K // group, group)
    scale = _f16(wg.abs().amax(dim=-1) / 127)
    codes = torch.round(wg / torch.where(scale > 0, scale, 1.0)[..., None]).clamp(-127, 127)
    return q8_rows(codes.reshape(N, K), scale)


def dequantize_rows(rows: Tensor, kind: QuantKind) -> Tensor:
    """Block rows -> the fp32 weight they encode (N, K)."""
    n = rows.shape[0]
    if kind == "int8":
        scale, codes = split_q8_rows(rows)
        return (codes.float() * scale[..., None]).reshape(n, -1)
    scale, offset, qs = split_q4_rows(rows)
    codes = torch.cat([qs & 0xF, qs >> 4], dim=-1).float()  # (N, B, 32)
    return (codes * scale[..., None] + offset[..., None]).reshape(n, -1)


def _pad16(t: Tensor) -> Tensor:
    """Zero rows up to a whole number of the kernels' groups of 16 rows."""
    n = t.shape[0]
    g = -(-n // kernels.RG)
    return torch.cat([t, t.new_zeros(g * kernels.RG - n, *t.shape[1:])]) if g * kernels.RG != n else t


def _grouped(t: Tensor) -> Tensor:
    """(N, B) per-row, per-block values -> the kernels' (G, B * 16) table, [g][b][r] = t[16 g + r][b]."""
    padded = _pad16(t)
    return padded.reshape(-1, kernels.RG, t.shape[1]).transpose(1, 2).reshape(padded.shape[0] // kernels.RG, -1)


def _gather(rows: Tensor, block: int, start: int, shape: tuple[int, ...], inner: tuple[int, ...]) -> Tensor:
    """One copy out of block rows (N padded to whole groups of 16, B blocks of `block` units each) into the
    kernels' order: dims (G, B, *shape, 16 rows, *inner) read at unit `start` of each block."""
    n, width = rows.shape
    group_stride = kernels.RG * width
    sizes = (n // kernels.RG, width // block, *shape, kernels.RG, *inner)
    strides = (group_stride, block, *[math.prod(inner) * math.prod(shape[i + 1:]) for i in range(len(shape))],
               width, *[math.prod(inner[i + 1:]) for i in range(len(inner))])
    return rows.as_strided(sizes, strides, rows.storage_offset() + start).contiguous().reshape(sizes[0], -1)


def pack_q4(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Q4_1 block rows -> the kernels' int4 layout (= kernels.pack_int4 of the same weights). A block's byte j
    already holds elements j and j + 16, exactly the kernels' byte [t][r][i] with j = 4 t + i: packing is one
    strided copy per table, the codes never unpacked."""
    rows = _pad16(rows.contiguous())
    halves = rows.view(torch.int16)  # fp16 fields as 2-byte units: a block is 10 of them
    nib = _gather(rows, Q4_BLOCK, 4, (4,), (4,))  # [g][b][t][r][i]
    scale = _gather(halves, Q4_BLOCK // 2, 0, (), ()).view(torch.float16)  # [g][b][r]
    offset = _gather(halves, Q4_BLOCK // 2, 1, (), ()).view(torch.float16)
    return nib, scale, offset


def pack_q8(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Q8_0 block rows -> the kernels' int8 layout: codes [g][b][t][r][i] (t < 8), fp16 scales, per-block code
    sums (for the kernels' +128 trick)."""
    rows = _pad16(rows.contiguous())
    codes = _gather(rows, Q8_BLOCK, 2, (8,), (4,)).view(torch.int8)
    scale = _gather(rows.view(torch.int16), Q8_BLOCK // 2, 0, (), ()).view(torch.float16)
    block_codes = rows.reshape(rows.shape[0], -1, Q8_BLOCK)[..., 2:].view(torch.int8)
    # |sum| <= 32 * 127; a slice of rows at a time, as the sum widens each code to int32 first (a head's codes
    # would take 4x their size at once)
    csum = torch.cat([part.sum(-1, dtype=torch.int32).to(torch.int16) for part in block_codes.split(4096)])
    csum = _grouped(csum).contiguous()
    return codes, scale, csum


# ---- the Linears -------------------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """y = x @ W.T + b with W as block codes (Int4Linear, Int8Linear), multiplied by model/kernels: the input
    quantized to int8 per 32 values (two passes when `precise`), exact integer block dots, fp32 out."""

    KIND: QuantKind
    pack: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
    matmul: Callable[..., Tensor]
    unpack: Callable[[tuple[Tensor, ...], int, int], Tensor]

    def __init__(self, rows: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features_of(rows, self.KIND), rows.shape[0]
        codes, scale, extra = type(self).pack(rows)  # extra: int4's offsets, int8's per-block code sums
        self.precise = PRECISE
        self.register_buffer("qweight", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("extra", extra)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Module) -> QuantLinear:
        return cls((quantize_int4 if cls.KIND == "int4" else quantize_int8)(linear.weight), linear.bias)

    def dequantized(self) -> Tensor:
        """The fp32 weight (N, K) the codes encode."""
        return type(self).unpack((self.qweight, self.scale, self.extra), self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        y = type(self).matmul(x.reshape(-1, self.in_features), (self.qweight, self.scale, self.extra),
                              self.out_features, self.in_features, precise=self.precise)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def native_spec(self) -> tuple:
        """This Linear as kernels.decode_block takes it (layers.native_linear)."""
        return (4 if self.KIND == "int4" else 8, self.qweight, self.scale, self.extra, self.bias, self.out_features,
                self.in_features, self.precise)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.KIND} group 32"


class Int4Linear(QuantLinear):
    """4-bit codes with an fp16 scale and offset per 32 input columns of a row (GGUF Q4_1)."""

    KIND = "int4"
    pack, matmul, unpack = staticmethod(pack_q4), staticmethod(kernels.int4_mm), staticmethod(kernels.dequantize_int4)


class Int8Linear(QuantLinear):
    """int8 codes with an fp16 scale per 32 input columns of a row (GGUF Q8_0)."""

    KIND = "int8"
    pack, matmul, unpack = staticmethod(pack_q8), staticmethod(kernels.int8_mm), staticmethod(kernels.dequantize_int8)


def quantized_nbytes(kind: QuantKind, n: int, k: int) -> int:
    """Bytes an Int4Linear / Int8Linear of this shape holds (bias aside): kernels' layout, rows padded to whole
    groups of 16, fp16 scales (ours are rounded to fp16 when quantizing, GGUF's are fp16)."""
    groups, blocks = -(-n // kernels.RG), k // kernels.QK
    per_block = 16 * 16 + 2 * 16 * 2 if kind == "int4" else 16 * 32 + 16 * 2 + 16 * 2  # codes + scales (+ offsets)
    return groups * blocks * per_block


def quant_linear(rows: Tensor, kind: QuantKind, bias: Tensor | None = None) -> QuantLinear:
    return (Int4Linear if kind == "int4" else Int8Linear)(rows, bias)


def layer_kind(kind: QuantKind, group: int, name: str, in_features: int) -> QuantKind | None:
    """What a Linear becomes: heads int8 even under int4 (the output layer is the most rounding-sensitive; GGUF's
    Q4 files keep it at 6 or 8 bits for the same reason), int8 where no group divides the input size, and
    float (None) where not even 32 does."""
    if in_features % 32:
        return None
    if kind == "int4" and (name.split(".")[-1] in HEADS or in_features % group):
        return "int8"
    return kind


def quantize(model: nn.Module, kind: QuantKind, group: int = GROUP, include_heads: bool = True) -> int:
    """Swap every Linear of a float model for its int8 / int4 version (heads int8); returns how many."""

    def make(name: str, linear: nn.Linear) -> nn.Module | None:
        k = layer_kind(kind, group, name, linear.in_features)
        if k is None:
            return None
        if k == "int4":
            return Int4Linear.from_linear(linear)
        return Int8Linear.from_linear(linear)

    with torch.no_grad():
        return swap_linears(model, make, include_heads)
