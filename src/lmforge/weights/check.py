"""Checks that read no tensor data: config values within sane bounds, a GGUF file's layout, a safetensors
header against the file's length, and the stored tensor names and shapes against what the config builds.

`inspect` relies on these to vouch for a checkpoint without loading it, and `load` runs them first, so that
a corrupt or mismatched checkpoint is refused with one clear line before anything large is read or
allocated (a corrupt shape or count must never turn into a huge allocation or an endless parse).
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import numbers
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError

Shapes = dict[str, tuple[int, ...]]

# ---- config values ------------------------------------------------------------------------------------

# (min, max) per integer field: far beyond any real model, small enough that a corrupt value cannot ask
# for a huge allocation (RoPE tables are computed, not stored) or a model with a billion layers
_INT_LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 24), "d_model": (1, 1 << 16), "n_layer": (1, 1024), "n_decoder_layer": (0, 1024),
    "n_head": (1, 1024), "n_kv_head": (1, 1024), "head_dim": (1, 1 << 12), "d_ff": (1, 1 << 20),
    "max_seq_len": (1, 1 << 24), "rel_buckets": (0, 1 << 16), "rel_max_distance": (0, 1 << 24),
    "n_token_types": (0, 1 << 16), "n_labels": (0, 1 << 20), "truncate_len": (0, 1 << 24),
}
_MAX_TABLE = 1 << 27  # max_seq_len * head_dim of the RoPE tables (512 MiB each in fp32; 1M context x 128)


def _is_int(value: Any) -> bool:
    """An integer (numpy's too), not a bool, a float or a string: what JSON values must be for a size."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_config(cfg: ModelConfig) -> None:
    """Every size a positive integer within bounds, every float finite: else one LmforgeError line."""

    def bad(field: str, value: Any, want: str) -> LmforgeError:
        return LmforgeError(f"bad config for {cfg.name}: {field} must be {want}, got {value!r}"[:300])

    for field, (lo, hi) in _INT_LIMITS.items():
        value = getattr(cfg, field)
        if not _is_int(value) or not lo <= value <= hi:
            raise bad(field, value, f"an integer in [{lo}, {hi}]")
    for field in ("rope_base", "norm_eps", "logit_scale", "attn_scale"):
        value = getattr(cfg, field)
        if value is None and field == "attn_scale":
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad(field, value, "a finite number")
    if cfg.rope_base <= 0:
        raise bad("rope_base", cfg.rope_base, "> 0")
    if cfg.norm_eps < 0:
        raise bad("norm_eps", cfg.norm_eps, ">= 0")
    if cfg.pos == "rope" and cfg.max_seq_len * cfg.head_dim > _MAX_TABLE:
        raise bad("max_seq_len * head_dim", cfg.max_seq_len * cfg.head_dim, f"<= {_MAX_TABLE}")
    for field in ("bos_token_id", "pad_token_id", "decoder_start_token_id"):
        value = getattr(cfg, field)
        if value is not None and not _is_int(value):
            raise bad(field, value, "a token id (an integer)")
    if not isinstance(cfg.eos_token_ids, list) or not all(_is_int(i) for i in cfg.eos_token_ids):
        raise bad("eos_token_ids", cfg.eos_token_ids, "a list of token ids")


def meta_model(cfg: ModelConfig) -> Any:
    """The Transformer cfg describes, on the meta device (nothing allocated); a config it cannot be built
    from is an LmforgeError."""
    from lmforge.model.transformer import Transformer

    check_config(cfg)
    try:
        with torch.device("meta"):
            return Transformer(cfg)
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError, AssertionError, ZeroDivisionError) as e:
        raise LmforgeError(f"bad config for {cfg.name}: the model cannot be built ({type(e).__name__}: {e})") from None


def weight_shapes(model: Any) -> Shapes:
    """Name -> shape of every weight a checkpoint stores for this model (tied copies left out)."""
    tied = set(model.tied_names()) if hasattr(model, "tied_names") else set()
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}


def expected_shapes(cfg: ModelConfig) -> Shapes:
    """Name -> shape of every weight a checkpoint for this config stores."""
    return weight_shapes(meta_model(cfg))


def check_fits(expected: Shapes, stored: Mapping[str, Tensor | tuple[int, ...]]) -> None:
    """The stored tensors (ours names) are exactly the weights the config builds, each of the right shape.
    BERT's pooler is the one extra tensor allowed: checkpoints carry it and the embedding model never uses it."""
    names = {k for k in stored if k in expected or not k.startswith("pooler.")}
    missing, unexpected = set(expected) - names, names - set(expected)
    if missing or unexpected:
        what = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        n = len(missing) or len(unexpected)
        raise LmforgeError(f"weights do not fit the config: {what}" + (f" and {n - 3} more" if n > 3 else ""))
    for name in sorted(names):
        value = stored[name]
        shape = tuple(value.shape) if isinstance(value, Tensor) else tuple(value)
        if shape != expected[name]:
            raise LmforgeError(f"wrong shape for {name}: {shape}, the config wants {expected[name]}")


def _meta(shapes: Shapes) -> dict[str, Tensor]:
    return {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}


def _to_ours(
    rules: list[Any], theirs: dict[str, Tensor], prefix: str, fix: Callable[[str, Tensor], Tensor] | None, where: str
) -> Shapes:
    from lmforge.weights.names import to_ours

    try:
        ours = to_ours(theirs, rules, prefix, fix)
    except (RuntimeError, ValueError, IndexError) as e:  # parts of a fused tensor that do not stack, ...
        raise LmforgeError(f"tensor shapes in {where} do not fit together: {str(e).splitlines()[0][:200]}") from None
    return {name: tuple(t.shape) for name, t in ours.items()}


# ---- HF folders -------------------------------------------------------------------------------------------


def _corrupt(path: Path, detail: str) -> LmforgeError:
    return LmforgeError(f"corrupt weights in {path.parent}: {path.name}: {detail}")


def safetensors_shapes(path: Path) -> Shapes:
    """Name -> shape from a .safetensors header, after checking the file holds every byte the header
    promises (a truncated download is refused here, not when a tensor is first touched)."""
    from safetensors import SafetensorError, safe_open

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"{size} bytes, too short for a safetensors header")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > 100_000_000:
                raise _corrupt(path, f"header of {n} bytes in a file of {size} bytes (truncated?)")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise _corrupt(path, "header is not a JSON object")
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            offsets = info.get("data_offsets") if isinstance(info, dict) else None
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
                raise _corrupt(path, f"bad header entry for {name!r}")
            end = max(end, offsets[1])
        if 8 + n + end > size:
            raise _corrupt(path, f"the header needs {8 + n + end} bytes, the file has {size} (truncated?)")
        with safe_open(path, framework="pt") as f:  # the library's own validation of the header
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, TypeError, AttributeError, RecursionError) as e:
        raise _corrupt(path, str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from None


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise LmforgeError(f"bad {index.name} in {folder}: {str(e).splitlines()[0][:200]}") from None
        for shard in shards:
            if not isinstance(shard, str) or Path(shard).is_absolute() or ".." in Path(shard).parts:
                raise LmforgeError(f"bad {index.name} in {folder}: shard {shard!r} is not a file in the folder")
            if not (folder / shard).is_file():
                raise LmforgeError(f"missing weights in {folder}: {shard} (listed in {index.name})")
        return [folder / shard for shard in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise LmforgeError(f"no model.safetensors (or index) in {folder}")


def hf_folder_shapes(folder: Path) -> Shapes:
    """Their name -> shape for every tensor of an HF folder, from the headers alone."""
    shapes: Shapes = {}
    for path in _weight_files(folder):
        if path.suffix == ".safetensors":
            shapes.update(safetensors_shapes(path))
            continue
        try:  # pytorch_model.bin: the pickle's structure only, tensors on the meta device
            state = torch.load(path, map_location="meta", weights_only=True)
            shapes.update({k: tuple(v.shape) for k, v in state.items()})
        except Exception as e:  # torch.load raises whatever the pickle makes it: all mean a corrupt file
            raise _corrupt(path, str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from None
    return shapes


def check_hf_folder(folder: Path, cfg: ModelConfig) -> Shapes:
    """The folder's tensors (headers only) are exactly what cfg builds, the way load_hf_folder maps them.
    Returns the expected shapes (ours)."""
    from lmforge.weights.hf import _conv1d_fix
    from lmforge.weights.names import HF_PREFIXES, HF_RULES

    raw = _meta(hf_folder_shapes(folder))
    kind = cfg.hf_model_type
    if kind == "bert":
        raw = {k.removesuffix(".gamma") + ".weight" if k.endswith(".gamma") else
               k.removesuffix(".beta") + ".bias" if k.endswith(".beta") else k: v for k, v in raw.items()}
    if kind == "gpt2":
        raw.pop("lm_head.weight", None)  # always a tied copy
    elif cfg.family != "encoder":
        # load_hf_folder decides tying from the config and, when they disagree, from the checkpoint (comparing
        # the head with the embedding); the shapes to check are the same either way: a head, if one is stored
        cfg = dataclasses.replace(cfg, tie_embeddings="lm_head.weight" not in raw)
    fix = _conv1d_fix if kind == "gpt2" else None
    if kind not in HF_RULES:
        raise LmforgeError(f"unsupported model_type {kind!r}")
    expected = expected_shapes(cfg)
    check_fits(expected, _to_ours(HF_RULES[kind], raw, HF_PREFIXES.get(kind, ""), fix, str(folder)))
    return expected


# ---- GGUF --------------------------------------------------------------------------------------------------

# value type -> struct format (GGUF: u8 i8 u16 i16 u32 i32 f32 bool [string] [array] u64 i64 f64)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_MAX_ITEMS = 1 << 24  # per metadata array: vocabularies have ~10^5 entries


@dataclasses.dataclass
class GgufTensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: fastest-varying first
    type: int
    offset: int  # from the start of the data section
    n_bytes: int


@dataclasses.dataclass
class GgufHeader:
    metadata: dict[str, Any]  # as gguf.metadata() gives it: scalars, strings, lists
    tensors: list[GgufTensorInfo]
    data_start: int = 0  # file offset of the tensor data section

    def type_names(self) -> list[str]:
        from gguf.constants import GGMLQuantizationType

        return sorted({GGMLQuantizationType(t.type).name for t in self.tensors})


def scan_gguf(path: Path) -> GgufHeader:
    """Read a GGUF file's metadata and tensor table without trusting any count or size in it: every string,
    array and tensor must fit in the file, every string must be UTF-8. gguf-py's reader trusts them (a corrupt
    array length makes it loop for ages, a corrupt shape can make it read past the end): run this first.
    It is also much quicker than gguf-py's reader, so `inspect` needs nothing else."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise ValueError(f"{size} bytes, too short for a GGUF header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _GgufScan(data, size).run()
    except (ValueError, OSError, struct.error, RecursionError, OverflowError) as e:
        raise LmforgeError(f"bad GGUF file {path}: truncated or corrupt ({str(e).splitlines()[0][:200]})") from None


class _GgufScan:
    def __init__(self, data: mmap.mmap, size: int) -> None:
        self.data, self.size, self.pos, self.order = data, size, 0, "<"

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise ValueError(f"{what} at offset {start} runs past the end of the file ({self.size} bytes)")
        self.pos += n
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack_from(self.order + fmt, self.data, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("Q", what)
        start = self.take(n, what)
        return self.data[start : start + n].decode("utf-8")  # as gguf-py decodes it, strictly

    def strings(self, count: int, what: str) -> list[str]:
        """string() `count` times, inlined: a vocabulary is ~100k strings and this is most of a GGUF's header."""
        length = struct.Struct(self.order + "Q").unpack_from
        data, size, pos, out = self.data, self.size, self.pos, []
        for _ in range(count):
            if pos + 8 > size:
                raise ValueError(f"{what} at offset {pos} runs past the end of the file ({size} bytes)")
            (n,) = length(data, pos)
            pos += 8
            if pos + n > size:
                raise ValueError(f"{what} at offset {pos} runs past the end of the file ({size} bytes)")
            out.append(data[pos : pos + n].decode("utf-8"))
            pos += n
        self.pos = pos
        return out

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _GGUF_SCALARS:
            return self.scalar(_GGUF_SCALARS[vtype], what)
        if vtype == _GGUF_STRING:
            return self.string(what)
        if vtype == _GGUF_ARRAY and depth < 4:
            item, count = self.scalar("I", what), self.scalar("Q", what)
            if count > _MAX_ITEMS:
                raise ValueError(f"{what!r}: an array of {count} items")
            if item in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[item]
                n = count * struct.calcsize(fmt)
                start = self.take(n, what)
                return list(struct.unpack_from(f"{self.order}{count}{fmt}", self.data, start)) if count else []
            if item not in (_GGUF_STRING, _GGUF_ARRAY):
                raise ValueError(f"{what!r}: unknown array item type {item}")
            if count * (8 if item == _GGUF_STRING else 12) > self.size - self.pos:
                raise ValueError(f"{what!r}: {count} items cannot fit in the file")
            if item == _GGUF_STRING:
                return self.strings(count, what)
            return [self.value(item, what, depth + 1) for _ in range(count)]
        raise ValueError(f"{what!r}: unknown value type {vtype}")

    def run(self) -> GgufHeader:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        if bytes(self.data[:4]) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        self.pos = 4
        version = self.scalar("I", "version")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            self.order, self.pos = ">", 4
            version = self.scalar("I", "version")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = self.scalar("Q", "tensor count"), self.scalar("Q", "key/value count")
        if n_kv * 13 > self.size or n_tensors * 24 > self.size:
            raise ValueError(f"{n_kv} keys and {n_tensors} tensors cannot fit in the file")
        meta: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}
        for _ in range(n_kv):
            key = self.string("metadata key")
            if key in meta:
                raise ValueError(f"duplicate metadata key {key!r}")
            meta[key] = self.value(self.scalar("I", key), key)
        alignment = meta.get("general.alignment", 32)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment {alignment!r} is not a power of two")
        infos: dict[str, GgufTensorInfo] = {}
        for _ in range(n_tensors):
            name = self.string("tensor name")
            n_dims = self.scalar("I", name)
            if not 1 <= n_dims <= 4:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
            dims = tuple(self.scalar("Q", name) for _ in range(n_dims))
            kind, offset = self.scalar("I", name), self.scalar("Q", name)
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise ValueError(f"tensor {name!r} has unknown type {kind}") from None
            if dims[0] % block:
                raise ValueError(f"tensor {name!r}: {dims[0]} values per row do not fill blocks of {block}")
            if name in infos:
                raise ValueError(f"duplicate tensor {name!r}")
            infos[name] = GgufTensorInfo(name, dims, kind, offset, math.prod(dims) * type_size // block)
        data_start = -(-self.pos // alignment) * alignment
        for t in infos.values():
            if data_start + t.offset + t.n_bytes > self.size:
                raise ValueError(f"tensor {t.name!r} ({t.n_bytes} bytes at {data_start + t.offset}) runs past the "
                                 f"end of the file ({self.size} bytes)")
        return GgufHeader(meta, list(infos.values()), data_start)


def check_gguf(header: GgufHeader, cfg: ModelConfig, where: str) -> Shapes:
    """The GGUF's tensors are exactly what cfg builds, the way load_gguf maps them (q/k rows un-permuted).
    Returns the expected shapes (ours)."""
    from gguf.constants import GGMLQuantizationType

    from lmforge.weights.gguf import SUPPORTED_TYPES, qk_row_fix
    from lmforge.weights.names import GGUF_LLAMA

    for t in header.tensors:
        if t.type not in SUPPORTED_TYPES:
            raise LmforgeError(f"GGUF tensor {t.name!r} has unsupported type {GGMLQuantizationType(t.type).name}")
    raw = _meta({t.name: tuple(reversed(t.dims)) for t in header.tensors})
    cfg = dataclasses.replace(cfg, tie_embeddings=cfg.tie_embeddings and "output.weight" not in raw)
    expected = expected_shapes(cfg)

    check_fits(expected, _to_ours(GGUF_LLAMA, raw, "", qk_row_fix(cfg), where))
    return expected
