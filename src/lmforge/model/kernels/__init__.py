"""int4 / int8 weight x int8 activation matmuls (llama.cpp's trick): a native CPU kernel (qmatmul.cpp) and a
pure-PyTorch fallback that gives the same numbers on any device from the same packed tensors.

Math (blocks of 32 input columns, b = k // 32):
    weights   int4: w = s[n,b] * c[n,k] + o[n,b], c in 0..15 (GGUF Q4_1; Q4_0 is o = -8 s)
              int8: w = s[n,b] * c[n,k], c int8 (GGUF Q8_0)
    activations, per row and block: d = max|x| / 127 (0 for an all-zero block), q = round-half-even(x / d)
              clamped to +-127 (0 where d is 0), S = sum q
    y[m,n] = sum_b s[n,b] d[m,b] I[m,n,b] (+ o[n,b] d[m,b] S[m,b] for int4),  I = sum_k c q  exactly
Both sides quantize the activations bit for bit the same way and compute the same exact integer block dot
products; only the fp32 summation order differs (tests/model/test_kernels.py: within ~1e-5 of max|y|).
Compared with x @ w.T in fp32, the activation quantization costs ~0.5% relative error on random data.
The matmuls are inference only: they carry no gradients.

precise=True (int4_mm, int8_mm, quantize_activations): two-pass (residual) activation quantization. Real
activations have outlier channels; one of them sets a block's d, and the block's other values round to 0 or
+-1 (SmolLM2-135M's greedy answers turn to word salad, and llama.cpp's own Q8_1 activations do the same). So
each block is quantized twice, the second time its residual in fp32, in this order (two roundings, never fused:
qmatmul.cpp is built with -ffp-contract=off):
    q1, d1, S1 as above;   p = d1 * q1;   r = x - p   (q1 = 0 where d1 is not > 0: r = x there)
    q2, d2, S2 = the same quantizer on r
    y[m,n] = sum_b s[n,b] (d1 I1 + d2 I2) (+ o[n,b] (d1 S1 + d2 S2) for int4),  I_j = sum_k c q_j exactly
About 14 bits of activation precision instead of 7 (error ~1/100 of the plain mode's), for a second set of
integer dots against the same unpacked weight registers: the weights are still read once per call. Measured
(same machine, one thread, M = 1, plain -> precise): int4 (3072, 576) 0.050 -> 0.059 ms, (576, 1536) 0.026 ->
0.036 ms, (49152, 576) 1.94 -> 2.05 ms, int8 (49152, 576) 3.27 -> 3.44 ms; at M = 64, compute-bound, the
integer work doubles: int4 (3072, 576) 2.9 -> 4.3 ms.

The kernel serves every M, decode and prefill alike, so the numbers never change regime with the batch size.
Measured on the 2-core AVX512-VNNI Xeon, one thread, int4 at (N, K) = (3072, 576): 0.07 ms at M = 1 against
0.9 ms for fp32 F.linear on an already-dequantized weight, 3 vs 6 ms at M = 64; at M = 512 (prefill) it runs
vpdpbusd at ~2 G/s per core (this CPU's rate for the instruction alone) and ties MKL's fp32 sgemm on the same
shapes, the two-pass activations' doubled integer work included. Dequantizing per call would only add to
F.linear's side, so no prefill path switches to it. Weights are read from memory once per call for all M rows
of a tile (<= 8): a decode batch costs about one weight read; longer inputs pass over the weights in L2-sized
chunks of groups, each tile of rows in turn (qmatmul.cpp's run_groups).

Packed layouts (plain tensors, registrable as buffers; qmatmul.cpp's header says why): output rows in groups of
16, G = ceil(N / 16) (zero rows pad the last group), nb = K / 32, within a group and block the 16 rows'
codes interleaved 4 bytes at a time so each 32-bit lane of an AVX512 register belongs to one output row:
    int4: nib uint8 (G, 256 nb): [g][b][t][r][i] (t < 4, r < 16, i < 4) = code[16g+r][32b+4t+i] in the low
          nibble | code[16g+r][32b+16+4t+i] in the high nibble
    int8: codes int8 (G, 512 nb): [g][b][t][r][i] (t < 8) = code[16g+r][32b+4t+i]
    scale (and int4's offset) (G, 16 nb): [g][b][r] = s[16g+r][b]; float16 when every value is exactly a
          float16 (GGUF's scales are), else float32
    int8's csum int16 (G, 16 nb): [g][b][r] = sum of row 16g+r's codes in block b (for the +128 trick)
unpack_int4 / unpack_int8 / dequantize_int4 / dequantize_int8 invert them, on any device.

rms_norm(x, weight, eps): fp32 RMSNorm over the last dimension, one pass per row in qmatmul.cpp (PyTorch's CPU
F.rms_norm is a composite of ~6 ops: ~42 us per call at decode's (1, 1, 576) on the build machine, and a decode
step calls it twice per layer); within a few ulps of F.rms_norm (only the sum of squares' order differs), and
F.rms_norm itself wherever the extension cannot serve (another device or dtype, autograd, no build).

decode.cpp (same extension) fuses the decode step, one token per row: decode_attention (rope on q and k, the KV
cache write, grouped-query attention over each row's own columns, reading a bf16 or fp32 cache as it is: SDPA
needed the whole bf16 cache converted to fp32 every step), silu_mul (a gated MLP's middle) and decode_block (a
whole pre-norm block: the same calls the block's modules make, from one Python call instead of ~10). The model's
PyTorch path is their fallback and reference (tests/model/test_decode_kernels.py). On the 2-core Xeon, SmolLM2
int4 at 512 tokens of context: 28-31 ms per token through the modules and SDPA, 22-24 with decode_attention,
15 with decode_block; 8 rows: 176 -> 39 ms per step. For prompts it has rope_heads (apply_rope on q and k in
one pass, the same bits) and prefill_attention (a prompt's causal attention from column 0 against the keys just
cached: tiles of 4 query rows x 16 transposed keys, ~1.45x SDPA's CPU kernel; AVX512 only).

The extension is compiled by `python -m lmforge.model.kernels --build` (make install runs it) into
<venv>/lmforge-kernels/<name>/, where <name> hashes the C++ sources, the torch and Python versions, the flags
and the CPU's feature flags: an edited source, another torch or a venv moved to another CPU (-march=native!)
finds no module of its name and falls back, rather than loading a stale or illegal-instruction one. Import of
this module is cheap: nothing is compiled or loaded until the first call needs it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import LmforgeError

QK = 32  # input columns per block (one activation scale, one weight scale)
RG = 16  # output rows per packed group (the 16 fp32 lanes of an AVX512 register)
ABI = 7  # must match kAbi in qmatmul.cpp

_SOURCES = [Path(__file__).with_name(name) for name in ("qmatmul.cpp", "decode.cpp")]
_HEADER = Path(__file__).with_name("kernels.h")
# -fopenmp: at::parallel_for is inline OpenMP in the headers; -ffp-contract=off: the precise mode's residual
# x - d * q must be two fp32 roundings like PyTorch's, and GCC fuses them into an FMA by default (even -std=c++17)
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]
_LDFLAGS = ["-fopenmp"]
_PREFIX = "lmforge_qmatmul_"
_FALLBACK_CHUNK = 1 << 22  # elements of the (nb, M, N-chunk) block dot products held at once by the fallback

_lock = threading.Lock()
_lib: ModuleType | None = None
_tried = False
_noticed = False
_failure: str | None = None  # why the one load failed: its notice waits for a caller that is not quiet


# ---- build and load -----------------------------------------------------------------------------------------


def _cpu_flags() -> str:
    """The CPU's feature flags, so a .so built with -march=native is only ever loaded on a CPU that has them."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() + " " + platform.processor()


def _name() -> str:
    h = hashlib.sha256()
    sources = (f.read_bytes() for f in (*_SOURCES, _HEADER))
    for part in (*sources, torch.__version__.encode(), sys.version.encode(), " ".join(_CFLAGS).encode(),
                 _cpu_flags().encode()):
        h.update(part)
        h.update(b"\0")
    return _PREFIX + h.hexdigest()[:16]


def build_root() -> Path:
    """Where the extension lives: inside the venv (removed with it), or the user's cache for a read-only prefix."""
    root = Path(sys.prefix) / "lmforge-kernels"
    if os.access(sys.prefix, os.W_OK) or root.is_dir():
        return root
    return Path.home() / ".cache" / "lmforge-kernels"


def _notice(reason: str) -> None:
    global _noticed
    if not _noticed:
        _noticed = True
        print(f"lmforge: native int4/int8 kernels unavailable ({reason}); using the PyTorch fallback (slower)",
              file=sys.stderr)


def _check(mod: ModuleType) -> ModuleType:
    if getattr(mod, "abi", lambda: None)() != ABI:
        raise RuntimeError(f"module {mod.__name__} has another interface version")
    return mod


def _import() -> ModuleType:
    name = _name()
    so = build_root() / name / f"{name}.so"
    if not so.is_file():
        raise FileNotFoundError("not built for this source, torch and CPU; run `python -m lmforge.model.kernels "
                                "--build`")
    if name in sys.modules:
        return _check(sys.modules[name])
    spec = importlib.util.spec_from_file_location(name, so)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {so}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[name] = mod
    return _check(mod)


def _load(quiet: bool = False) -> ModuleType | None:
    """The extension, imported once per process; None when it is missing or unusable, after one notice to the
    first caller that is not quiet (rms_norm is: an fp32 model that never uses int4/int8 has nothing to be told)."""
    global _lib, _tried, _failure
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _lib = _import()
                except Exception as e:  # any failure means "use the fallback", never a crash
                    _failure = _one_line(e)
                _tried = True
    if _lib is None and _failure is not None and not quiet:
        _notice(_failure)
    return _lib


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def available() -> bool:
    """Whether the native extension is built for this source/torch/CPU and loads."""
    return _load() is not None


def isa() -> str | None:
    """The loaded extension's code path ("avx512vnni", "avx2" or "scalar"), None without one."""
    lib = _load()
    return None if lib is None else str(lib.isa())


def build(verbose: bool = False) -> bool:
    """Compile (or find up to date) and load the extension. Never raises: False, with the one-line notice, when
    there is no compiler or ninja or the build fails."""
    global _lib, _tried
    try:
        from torch.utils import cpp_extension  # slow to import: only here, never at module import

        name = _name()
        root = build_root()
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        mod = cpp_extension.load(name=name, sources=[str(f) for f in _SOURCES], build_directory=str(folder),
                                 extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS, is_python_module=True, verbose=verbose)
        with _lock:
            _lib, _tried = _check(mod), True
        for old in root.glob(_PREFIX + "*"):  # earlier sources' builds: never loaded again
            if old.name != name and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        return True
    except Exception as e:
        if verbose:
            print(str(e), file=sys.stderr)
        _notice(f"build failed: {_one_line(e)}")
        return False


# ---- packing ------------------------------------------------------------------------------------------------


def _blocks(k: int) -> int:
    if k <= 0 or k % QK:
        raise LmforgeError(f"the input size {k} must be a positive multiple of {QK}")
    return k // QK


def _groups(n: int) -> int:
    return -(-n // RG)


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)


def _grouped(t: Tensor, n: int) -> Tensor:
    """(N, nb) per-row values -> (G, nb * 16), [g][b][r] = t[16 g + r][b] (zero rows pad the last group)."""
    g, nb = _groups(n), t.shape[1]
    return _pad_rows(t, g * RG).reshape(g, RG, nb).transpose(1, 2).reshape(g, nb * RG).contiguous()


def _ungrouped(t: Tensor, n: int) -> Tensor:
    """(G, nb * 16) -> (N, nb) fp32, the inverse of _grouped."""
    g = t.shape[0]
    return t.reshape(g, -1, RG).transpose(1, 2).reshape(g * RG, -1)[:n].float()


def _scales(*ts: Tensor, n: int) -> list[Tensor]:
    """fp32 scales -> float16 when every one of them is exactly a float16 (a sixth fewer bytes to read per
    weight, and decode is bound by those reads), else float32."""
    fs = [t.detach().float() for t in ts]
    exact = all(bool(torch.isfinite(f).all()) and torch.equal(f.half().float(), f) for f in fs)
    dtype = torch.float16 if exact else torch.float32
    return [_grouped(f.to(dtype), n) for f in fs]


def pack_int4(codes: Tensor, scale: Tensor, offset: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """codes (N, K) in 0..15, scale and offset (N, K/32) -> (nib, scale, offset), the layout in the docstring."""
    n, k = codes.shape
    nb = _blocks(k)
    if scale.shape != (n, nb) or offset.shape != (n, nb):
        raise LmforgeError(f"int4 scale and offset must be ({n}, {nb}), got {tuple(scale.shape)} and "
                           f"{tuple(offset.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise LmforgeError("int4 codes must lie in 0..15")
    g = _groups(n)
    # column 32 b + 16 h + 4 t + i of row 16 g + r -> [g, r, b, h, t, i]
    c = _pad_rows(codes.detach().to(torch.uint8), g * RG).reshape(g, RG, nb, 2, 4, 4)
    nib = c[:, :, :, 0] | (c[:, :, :, 1] << 4)  # (g, r, b, t, i): h = 0 low nibble, h = 1 high
    nib = nib.permute(0, 2, 3, 1, 4).reshape(g, nb * 256).contiguous()  # [g][b][t][r][i]
    s, o = _scales(scale, offset, n=n)
    return nib, s, o


def pack_int8(codes: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """codes (N, K) int8, scale (N, K/32) -> (codes, scale, csum), the layout in the docstring."""
    n, k = codes.shape
    nb = _blocks(k)
    if scale.shape != (n, nb):
        raise LmforgeError(f"int8 scale must be ({n}, {nb}), got {tuple(scale.shape)}")
    if codes.dtype != torch.int8 and codes.numel() and (int(codes.min()) < -128 or int(codes.max()) > 127):
        raise LmforgeError("int8 codes must lie in -128..127")
    g = _groups(n)
    c = codes.detach().to(torch.int8)
    csum = c.reshape(n, nb, QK).sum(-1, dtype=torch.int32).to(torch.int16)  # |sum| <= 4096
    c = _pad_rows(c, g * RG).reshape(g, RG, nb, 8, 4).permute(0, 2, 3, 1, 4).reshape(g, nb * 512).contiguous()
    (s,) = _scales(scale, n=n)
    return c, s, _grouped(csum, n)


def unpack_int4(packed: tuple[Tensor, ...], n: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(nib, scale, offset) -> codes (N, K) uint8, scale and offset (N, K/32) fp32. Plain tensor ops: any device."""
    nib, s, o = packed[:3]
    g, nb = _groups(n), _blocks(k)
    v = nib.reshape(g, nb, 1, 4, RG, 4)  # [g, b, -, t, r, i]
    codes = torch.cat([v & 0x0F, v >> 4], dim=2)  # [g, b, h, t, r, i]
    codes = codes.permute(0, 4, 1, 2, 3, 5).reshape(g * RG, k)[:n]  # [g, r, b, h, t, i]
    return codes, _ungrouped(s, n), _ungrouped(o, n)


def unpack_int8(packed: tuple[Tensor, ...], n: int, k: int) -> tuple[Tensor, Tensor]:
    """(codes, scale, csum) -> codes (N, K) int8, scale (N, K/32) fp32."""
    codes, s = packed[:2]
    g, nb = _groups(n), _blocks(k)
    codes = codes.reshape(g, nb, 8, RG, 4).permute(0, 3, 1, 2, 4).reshape(g * RG, k)[:n]
    return codes, _ungrouped(s, n)


def dequantize_int4(packed: tuple[Tensor, ...], n: int, k: int) -> Tensor:
    """Packed int4 -> the fp32 (N, K) weight s * c + o (for references and tests; the matmuls never build it)."""
    codes, s, o = unpack_int4(packed, n, k)
    return (codes.float().reshape(n, -1, QK) * s[..., None] + o[..., None]).reshape(n, k)


def dequantize_int8(packed: tuple[Tensor, ...], n: int, k: int) -> Tensor:
    """Packed int8 -> the fp32 (N, K) weight s * c."""
    codes, s = unpack_int8(packed, n, k)
    return (codes.float().reshape(n, -1, QK) * s[..., None]).reshape(n, k)


# ---- the fallback -------------------------------------------------------------------------------------------


def _quantize_blocks(xb: Tensor) -> tuple[Tensor, Tensor]:
    """xb (M, nb, 32) fp32 -> q (M, nb, 32) integer-valued fp32, d (M, nb). qmatmul.cpp's quantize_block must
    give the same bits: true division x / d (not x * (1 / d)) and round-half-even."""
    d = xb.abs().amax(dim=-1) / 127
    ok = d > 0
    q = torch.round(xb / torch.where(ok, d, 1.0)[..., None]).clamp(-127, 127)
    return torch.where(ok[..., None], q, 0.0), d


def _quantize_torch(x: Tensor, precise: bool = False) -> tuple[Tensor, ...]:
    """The activation quantizer in PyTorch: (q int8, d fp32, S int32), then the residual's (q2, d2, S2) when
    precise. Bit for bit what qmatmul.cpp's quantize_acts gives."""
    m, k = x.shape
    xb = x.float().reshape(m, k // QK, QK)
    q, d = _quantize_blocks(xb)
    out = [q.reshape(m, k).to(torch.int8), d, q.sum(dim=-1).to(torch.int32)]
    if precise:
        # two fp32 roundings in this order (eager PyTorch never fuses them), as residual_block in qmatmul.cpp
        p = d[..., None] * q
        q2, d2 = _quantize_blocks(xb - p)
        out += [q2.reshape(m, k).to(torch.int8), d2, q2.sum(dim=-1).to(torch.int32)]
    return tuple(out)


def _block_dots(q: Tensor, c: Tensor) -> Tensor:
    """q (M, K), c (N, K) integer-valued -> I (nb, M, N), exact in fp32: |I| <= 32 * 127 * 128 < 2**24, so any
    summation order (and TF32's 10-bit inputs, wide enough for these codes) gives the exact integer."""
    m, k = q.shape
    n = c.shape[0]
    qb = q.float().reshape(m, k // QK, QK).transpose(0, 1)  # (nb, M, 32)
    cb = c.float().reshape(n, k // QK, QK).permute(1, 2, 0)  # (nb, 32, N)
    return torch.bmm(qb, cb)


def _fallback(x: Tensor, codes: Tensor, s: Tensor, o: Tensor | None, precise: bool = False) -> Tensor:
    qs = _quantize_torch(x, precise)
    passes, (m, nb) = len(qs) // 3, qs[1].shape  # 2 passes when precise
    q = torch.cat(qs[0::3])  # (passes M, K): one bmm gives both passes' block dots
    d = torch.stack(qs[1::3])  # (passes, M, nb)
    dT = d.permute(2, 0, 1).reshape(nb, passes * m, 1)
    dS = (d * torch.stack(qs[2::3]).float()).sum(dim=0)  # d1 S1 (+ d2 S2): the int4 offset term's factor
    n = codes.shape[0]
    step = max(1, _FALLBACK_CHUNK // max(1, passes * m * nb))
    out = []
    for n0 in range(0, n, step):
        sT = s[n0:n0 + step].T[:, None, :]  # (nb, 1, Nc)
        # the kernel's order: the exact integer dots times d (d1 I1 + d2 I2 when precise), times s, summed over
        # blocks
        f = _block_dots(q, codes[n0:n0 + step]) * dT
        if passes > 1:
            f = f.reshape(nb, passes, m, f.shape[-1]).sum(dim=1)
        y = (f * sT).sum(dim=0)
        if o is not None:
            y = y + dS @ o[n0:n0 + step].T
        out.append(y)
    return torch.cat(out, dim=1) if len(out) != 1 else out[0]


# ---- the public matmuls -------------------------------------------------------------------------------------


def _native(x: Tensor, native: bool | None) -> ModuleType | None:
    """The extension to use for x, or None for the fallback; native=True insists (LmforgeError if impossible).
    Kept to a few attribute reads: at M = 1 a small layer's kernel takes tens of microseconds."""
    if native is False:
        return None
    lib = _lib if _lib is not None else _load()  # not `_tried`: a quiet first load (rms_norm) owes the notice
    if lib is not None and x.device.type == "cpu":
        return lib
    if native:
        raise LmforgeError("the native int4/int8 kernel needs a CPU tensor and a built extension "
                           "(`python -m lmforge.model.kernels --build`)")
    return None


def _rows(x: Tensor, k: int) -> Tensor:
    if x.shape[-1] != k or k <= 0 or k % QK:
        raise LmforgeError(f"expected inputs of size {k} (a positive multiple of {QK}) in the last dimension, "
                           f"got {tuple(x.shape)}")
    return x.reshape(-1, k)


def _matmul(kind: str, x: Tensor, packed: tuple[Tensor, ...], n: int, k: int, native: bool | None,
            precise: bool) -> Tensor:
    lib = _native(x, native)
    entry = getattr(lib, f"{kind}_mm", None)
    if entry is not None and x.dim() == 2:  # the decode fast path: no Python-side reshapes or checks
        return entry(x, packed[0], packed[1], packed[2], n, k, precise)
    x2 = _rows(x, k)
    if entry is not None:
        y = entry(x2, packed[0], packed[1], packed[2], n, k, precise)
    else:
        with torch.no_grad():
            if kind == "int4":
                codes, s, o = unpack_int4(packed, n, k)
                y = _fallback(x2, codes, s, o, precise)
            else:
                codes, s = unpack_int8(packed, n, k)
                y = _fallback(x2, codes, s, None, precise)
    return y.reshape(*x.shape[:-1], n)


def int4_mm(x: Tensor, packed: tuple[Tensor, ...], n: int, k: int, native: bool | None = None, *,
            precise: bool = False) -> Tensor:
    """x (..., K), any float dtype (computed in fp32) -> (..., N) float32: x quantized per block to int8 (twice,
    the second time its residual, when precise: see the module docstring), times the int4 weights. The extension
    checks shapes and dtypes itself (RuntimeError)."""
    return _matmul("int4", x, packed, n, k, native, precise)


def int8_mm(x: Tensor, packed: tuple[Tensor, ...], n: int, k: int, native: bool | None = None, *,
            precise: bool = False) -> Tensor:
    """x (..., K), any float dtype (computed in fp32) -> (..., N) float32: x quantized per block to int8 (twice
    when precise), times the int8 weights. The extension checks shapes and dtypes itself (RuntimeError)."""
    return _matmul("int8", x, packed, n, k, native, precise)


@overload
def quantize_activations(x: Tensor, native: bool | None = None, *,
                         precise: Literal[False] = False) -> tuple[Tensor, Tensor, Tensor]: ...


@overload
def quantize_activations(x: Tensor, native: bool | None = None, *,
                         precise: Literal[True]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]: ...


@overload
def quantize_activations(x: Tensor, native: bool | None = None, *, precise: bool) -> tuple[Tensor, ...]: ...


def quantize_activations(x: Tensor, native: bool | None = None, *, precise: bool = False) -> tuple[Tensor, ...]:
    """x (M, K) -> q int8 (M, K), d fp32 (M, K/32), S int32 (M, K/32); precise: then the residual's pass
    q2, d2, S2 of the same shapes and dtypes (a 6-tuple). Native and fallback agree bit for bit."""
    if x.dim() != 2:
        raise LmforgeError(f"expected (M, K) activations, got {tuple(x.shape)}")
    _rows(x, x.shape[1])
    lib = _native(x, native)
    with torch.no_grad():
        if lib is not None:
            return tuple(lib.quantize(x, precise))
        return _quantize_torch(x, precise)


# ---- rms norm -----------------------------------------------------------------------------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x * rsqrt(mean(x^2, -1) + eps) * weight over the last dimension: the native one-pass kernel for a
    contiguous fp32 CPU x and an fp32 weight when autograd has nothing to record (grad disabled, or neither
    requires grad), else F.rms_norm (the same numbers within a few ulps). Called ~60 times per decoded token:
    only attribute reads and one grad-mode call stand before the native call."""
    # cheapest tests first; the extension is only looked for once x is one it could take (a CUDA model never
    # loads it), and quietly (see _load)
    if x.dtype is torch.float32 and weight.dtype is torch.float32 and x.is_cpu and x.is_contiguous() and (
            not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad)):
        lib = _lib if _tried else _load(quiet=True)
        if lib is not None:
            return lib.rms_norm(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


# ---- the decode step's fused ops (decode.cpp) ----------------------------------------------------------------


def _inference_lib() -> ModuleType | None:
    """The extension for an inference-only fused op, looked for quietly (an fp32 model has nothing to be told)."""
    return _lib if _tried else _load(quiet=True)


def decode_attention(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, first: int,
                     positions: Tensor, n_head: int, scale: float) -> Tensor | None:
    """One new token per row, fused (decode.cpp's header has the math): qkv (B, (H + 2 G) hd) fp32, cos/sin
    (B, hd) at each row's position, the layer's cache k/v (slots, G, L, hd) fp32 or bf16, rows first..first+B-1 at
    positions (B,) int64 -> (B, H hd) fp32, the key and value written into the cache. None when the extension
    is not there: the caller then runs the model's own PyTorch path (rope, cache write, SDPA), the reference."""
    lib = _inference_lib()
    if lib is None:
        return None
    return lib.decode_attention(qkv, cos, sin, k_cache, v_cache, first, positions, n_head, scale)


def decode_block(x: Tensor, attn_norm: Tensor, mlp_norm: Tensor, eps: float, linears: list[tuple], cos: Tensor,
                 sin: Tensor, k_cache: Tensor, v_cache: Tensor, first: int, positions: Tensor, n_head: int,
                 scale: float) -> Tensor | None:
    """A pre-norm RMSNorm / rotary / SwiGLU block at one token per row, x (B, d) -> (B, d), in one native call
    (decode.cpp): the same kernels the block's modules call one by one, so the same numbers. `linears`: qkv, out,
    fc_in, fc_out as layers.native_linear describes them. None without the extension (the caller runs the
    block's modules)."""
    lib = _inference_lib()
    if lib is None:
        return None
    return lib.decode_block(x, attn_norm, mlp_norm, eps, linears, cos, sin, k_cache, v_cache, first, positions,
                            n_head, scale)


def silu_mul(x: Tensor) -> Tensor | None:
    """silu(x[..., :F]) * x[..., F:] for a contiguous fp32 CPU x (..., 2F) in one pass, or None where the
    extension cannot serve it fast (missing; or many rows without AVX512, where its exp is scalar): the caller
    then runs F.silu(gate) * up."""
    lib = _inference_lib()
    if lib is None or (x.numel() > 1 << 16 and lib.isa() != "avx512vnni"):
        return None
    return lib.silu_mul(x)


def rope_heads(x: Tensor, cos: Tensor, sin: Tensor, n_heads: int) -> Tensor | None:
    """apply_rope on the first n_heads heads of each row of a contiguous fp32 CPU x (M, W), cos / sin (M, hd) at each
    row's position -> (M, n_heads hd), one pass (decode.cpp); the same products and sum, so the same bits. None
    without the extension: the caller runs apply_rope."""
    lib = _inference_lib()
    return None if lib is None else lib.rope_heads(x, cos, sin, n_heads)


def prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, first: int, T: int, n_head: int,
                      scale: float) -> Tensor | None:
    """Causal attention of T new tokens per row from column 0, rows first..first+B-1: q (B T, >= H hd) fp32 with
    each token's query heads first, the layer's cache k/v (slots, G, L, hd) fp32 or bf16 already holding this
    call's keys and values -> (B T, H hd) fp32, in tiles of 4 query rows x 16 keys (decode.cpp). None without the
    extension, for a head size other than 32/64/128, or without AVX512: the caller runs SDPA."""
    lib = _inference_lib()
    if lib is None or lib.isa() != "avx512vnni" or k_cache.shape[-1] not in (32, 64, 128):
        return None
    return lib.prefill_attention(q, k_cache, v_cache, first, T, n_head, scale)
