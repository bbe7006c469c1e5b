"""Load any supported checkpoint into the one Transformer, and export it as an HF folder."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model.fast import use_onednn
from lmforge.model.quantize import in_features_of, layer_kind, quant_linear, quantize_int4, quantize_int8
from lmforge.model.transformer import Transformer
from lmforge.precision import QUANT_DTYPES, QuantKind
from lmforge.tokenizer import Tokenizer
from lmforge.weights.check import check_fits, check_hf_folder, meta_model, scan_gguf
from lmforge.weights.gguf import is_gguf, load_gguf
from lmforge.weights.hf import load_hf_folder, save_hf_folder
from lmforge.weights.registry import resolve

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The activation dtype: a quantized model computes in fp32 (build_quantized)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in QUANT_DTYPES:
        return torch.float32
    if dtype not in DTYPES:
        raise LmforgeError(f"unknown dtype {dtype!r} (use one of: {', '.join([*DTYPES, *QUANT_DTYPES])})")
    return DTYPES[dtype]


def quant_of(dtype: str | torch.dtype) -> tuple[QuantKind, int] | None:
    return QUANT_DTYPES.get(dtype) if isinstance(dtype, str) else None


def build(
    cfg: ModelConfig, state: dict[str, Tensor], dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu", inference: bool = True,
) -> Transformer:
    """Config + our state dict -> a model, without a wasted random initialisation. `inference`: eval mode,
    no gradients, and the fastest Linears for the device swapped in (model/fast.py)."""
    model = meta_model(cfg)
    tied = set(model.tied_names())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    check_fits(shapes, state)
    # one tensor at a time, each checkpoint tensor dropped once converted: never two copies of the model
    state = {k: state.pop(k).to(device=device, dtype=dtype) for k in list(state) if k in shapes}  # BERT's pooler
    model.load_state_dict(state, assign=True, strict=False)
    model.tie_weights()
    model.init_buffers()
    if not inference:
        return model.train()
    model.eval().requires_grad_(False)
    use_onednn(model)
    return model


def build_quantized(
    cfg: ModelConfig, state: dict[str, Tensor], kind: QuantKind, group: int, device: torch.device | str = "cpu"
) -> Transformer:
    """Config + our state dict -> an inference model whose Linears are int8/int4 (model/quantize.py), embedding
    tables bfloat16 and everything else fp32. A Linear's weight may come as float (quantized here, one at a time)
    or as block rows already (GGUF's, read by load_gguf with the same `layer_kind` rule)."""
    model = meta_model(cfg)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    tied = set(model.tied_names())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    for name, linear in linears:
        key = f"{name}.weight"
        weight = state.get(key)
        if weight is None and key in tied:
            weight = state["tok_emb.weight"]
        kind_here = layer_kind(kind, group, name, linear.in_features)
        if weight is None or kind_here is None:
            continue
        if weight.dtype == torch.uint8:
            rows = weight
        else:
            check_fits({key: shapes.get(key, tuple(linear.weight.shape))}, {key: weight})
            rows = quantize_int4(weight, group) if kind_here == "int4" else quantize_int8(weight)
        state.pop(key, None)
        shapes.pop(key, None)
        bias = state.pop(f"{name}.bias", None)
        shapes.pop(f"{name}.bias", None)
        if rows.shape[0] != linear.out_features or in_features_of(rows, kind_here) != linear.in_features:
            raise LmforgeError(f"wrong shape for {key}: {rows.shape[0]} x {in_features_of(rows, kind_here)}, the "
                               f"config wants {linear.out_features} x {linear.in_features}")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quant_linear(rows.to(device), kind_here, bias))
    check_fits(shapes, state)
    # embedding tables in bf16 (half the memory; a lookup reads one row), the small rest in fp32, and fp32
    # activations: no casts around every op of a step, and this CPU has no native bf16 arithmetic anyway
    rest = {k: state.pop(k).to(device=device, dtype=torch.bfloat16 if k.endswith("emb.weight") else torch.float32)
            for k in list(state) if k in shapes}
    model.load_state_dict(rest, assign=True, strict=False)
    model.tie_weights()
    model.init_buffers()
    model.act_dtype = torch.float32
    return model.eval().requires_grad_(False)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def _mallopt(param: int, value: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(param, value)


@contextlib.contextmanager
def _malloc_for_loading() -> Iterator[None]:
    """While a model loads, every large block is mapped on its own and unmapped when freed: glibc's adaptive
    threshold would otherwise keep a load's transient tensors (file blocks, unpacked codes) in the process for
    good, ~170 MB for SmolLM2 at int4. After the load, the opposite: large blocks come from the heap and freed
    ones stay there, so a step's activations reuse pages the last step touched. Mapped per tensor, each prefill
    op's output was fresh memory that the kernel zeroed page by page: ~15% of an int4 prefill went to page faults.
    Pages kept this way are bounded by the largest step's working set."""
    _mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        _mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest accepted value on 64-bit
        _mallopt(_M_TRIM_THRESHOLD, 256 << 20)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(
    name: str | Path, dtype: str | torch.dtype = torch.float32, device: str | torch.device | None = None,
    inference: bool = True,
) -> tuple[Transformer, Tokenizer]:
    """A short name, GGUF file or HF folder -> (model, tokenizer), on `device` (default: cuda when present).
    `inference=False` gives a trainable model (train mode, gradients on, plain Linears).

    The checkpoint is checked from its headers first (check.py): a truncated, corrupt or mismatched one is
    refused with an LmforgeError before its tensors are read."""
    with _malloc_for_loading():
        return _load(name, dtype, device, inference)


def _load(name: str | Path, dtype: str | torch.dtype, device: str | torch.device | None,
          inference: bool) -> tuple[Transformer, Tokenizer]:
    path = resolve(str(name))
    dt = parse_dtype(dtype)
    quant = quant_of(dtype)
    if quant is not None and not inference:
        raise LmforgeError(f"--dtype {dtype} is for inference: train from float32 or bfloat16 weights")
    if path.is_file():
        if path.suffix != ".gguf" and not is_gguf(path):
            raise LmforgeError(f"{path} is neither a GGUF file nor a model folder")
        header = scan_gguf(path)  # checks every count and size before a tensor is touched
        try:
            cfg, state, meta = load_gguf(path, *(quant or (None, 32)), header=header, dtype=dt)
        except RuntimeError as e:  # tensors the config cannot reshape (q/k rows) or stack (gate|up)
            raise LmforgeError(f"bad GGUF file {path}: tensor shapes do not fit the config "
                               f"({str(e).splitlines()[0][:200]})") from None
        tokenizer = _gguf_tokenizer(meta, path)
        del header, meta  # ~100k vocabulary strings: not held while the model is built
    else:
        from lmforge.model_info import read_config

        check_hf_folder(path, read_config(path)[0])  # headers only: before any tensor is read
        cfg, state = load_hf_folder(path)
        tokenizer = Tokenizer.from_dir(path)
        _apply_sentence_config(cfg, path)
    device = device or default_device()
    if quant is not None:
        return build_quantized(cfg, state, *quant, device), tokenizer
    return build(cfg, state, dt, device, inference), tokenizer


def _gguf_tokenizer(meta: dict[str, Any], path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_gguf(meta)
    except LmforgeError:
        raise
    except Exception as e:  # a corrupt vocabulary: tokenizers raises plain Exceptions, Python KeyError/TypeError
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise LmforgeError(f"bad tokenizer in GGUF file {path}: {msg}") from None


# sentence-transformers' pooling switches, old style (one bool each) -> the mode names of its newer configs
_ST_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken",
}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(f"bad {path.name} in {path.parent}: {e}") from None


def _apply_sentence_config(cfg: ModelConfig, folder: Path) -> None:
    """sentence-transformers folders say how to pool, whether to normalise and where to truncate; follow them,
    and refuse a module we do not implement (Dense, max pooling, ...) rather than return different vectors."""
    pooling_dir = folder / "1_Pooling"
    if (folder / "modules.json").exists():
        for module in _read_json(folder / "modules.json"):
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            if kind == "Pooling":
                pooling_dir = folder / module.get("path", "1_Pooling")
            elif kind == "Normalize":
                cfg.normalize_embeddings = True
            elif kind != "Transformer":
                raise LmforgeError(f"sentence-transformers module {module.get('type')!r} in {folder} is not "
                                   "supported (Transformer, Pooling, Normalize)")
    if (pooling_dir / "config.json").exists():
        spec = _read_json(pooling_dir / "config.json")
        mode = spec.get("pooling_mode") or [m for flag, m in _ST_POOLING_FLAGS.items() if spec.get(flag)]
        modes = [mode] if isinstance(mode, str) else list(mode)
        if modes not in (["mean"], ["cls"]):
            raise LmforgeError(f"pooling {'+'.join(modes) or 'none'} in {pooling_dir} is not supported (mean, cls)")
        cfg.pooling = modes[0]
    elif cfg.family == "encoder":
        cfg.pooling = "mean"  # what sentence-transformers does with a plain transformers encoder
    limit = None
    if (folder / "sentence_bert_config.json").exists():
        limit = _read_json(folder / "sentence_bert_config.json").get("max_seq_length")
    if limit is None and cfg.family == "encoder" and (folder / "tokenizer_config.json").exists():
        # sentence-transformers 5+ keeps the limit only here, as the tokenizer's model_max_length
        limit = _read_json(folder / "tokenizer_config.json").get("model_max_length")
    if isinstance(limit, int) and 0 < limit < cfg.max_seq_len:
        cfg.truncate_len = limit


def export_hf(model: Transformer, tokenizer: Tokenizer, folder: Path) -> None:
    """Write config.json + model.safetensors + tokenizer files that transformers (and we) load; an
    embedding model also gets the sentence-transformers files that say how it pools and truncates."""
    folder = Path(folder)
    save_hf_folder(model.cfg, checkpoint_state(model), folder)
    for weights in folder.glob("model*.safetensors"):
        _default_permissions(weights)  # safetensors writes 0600
    tokenizer.save(folder, model_max_length=model.cfg.max_seq_len)
    if model.cfg.family == "encoder" and model.cfg.pooling != "none":
        _write_sentence_config(model.cfg, folder)


def _write_sentence_config(cfg: ModelConfig, folder: Path) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if cfg.normalize_embeddings:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (folder / "1_Pooling").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": cfg.d_model, "pooling_mode_cls_token": cfg.pooling == "cls",
               "pooling_mode_mean_tokens": cfg.pooling == "mean"}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")
    limit = cfg.truncate_len or cfg.max_seq_len
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": limit}) + "\n")


def default_dtype(name: str | Path | None = None) -> str:
    """`--dtype auto`: int4 for a GGUF file whose Linears are Q4_0/Q4_1 blocks, when the native kernels are
    built: the same weights the fp32 path dequantizes, ~2x faster to decode and a quarter of the memory, with
    perplexity within 0.2% of fp32's and the same answers on benchmarks/quality.py's prompts where fp32 and bf16
    agree. float32 otherwise: quantizing a float checkpoint changes its weights, and fp32 decodes faster than bf16
    on CPUs (benchmarks/decode.py)."""
    from lmforge.model import kernels

    if name is None:
        return "float32"
    try:
        path = resolve(str(name))
        if not (path.is_file() and is_gguf(path)) or not kernels.available():
            return "float32"
        types = {t.type for t in scan_gguf(path).tensors if len(t.dims) == 2 and t.name.startswith("blk.")}
    except (LmforgeError, OSError):
        return "float32"  # the load that follows reports the problem
    from gguf import GGMLQuantizationType as T

    return "int4" if types and types <= {T.Q4_0, T.Q4_1} else "float32"


def checkpoint_state(model: Transformer) -> dict[str, Tensor]:
    """The model's state dict as checkpoints store it: tied copies left out."""
    tied = set(model.tied_names())
    return {k: v for k, v in model.state_dict().items() if k not in tied}


# ---- convert: all or nothing ---------------------------------------------------------------------------


def convert(src: str | Path, dst: str | Path, dtype: str | torch.dtype = "float32", force: bool = False) -> ModelConfig:
    """Any checkpoint `load` reads -> an HF folder at dst, all or nothing: the destination is checked before
    the (slow) load, the export is written into a temporary folder beside dst and renamed into place only once
    complete; with `force` an existing dst is replaced at that moment (moved aside, then removed). A failed
    conversion leaves dst exactly as it was. Returns the model's config."""
    target = _convert_target(src, dst, force)
    model, tokenizer = load(src, dtype)
    export_hf_atomic(model, tokenizer, target, force=force)
    return model.cfg


def _convert_target(src: str | Path, dst: str | Path, force: bool) -> Path:
    """dst as an absolute path, refused when converting there would destroy the source or the current folder."""
    if not str(dst).strip():
        raise LmforgeError("empty destination: name the folder to write (e.g. out/)")
    target = Path(os.path.abspath(Path(dst).expanduser()))  # normalised, links not followed
    source, real = resolve(str(src)).resolve(), target.resolve()
    if real == source:
        raise LmforgeError(f"{dst} is the source itself: convert into another folder")
    if source.is_dir() and real.is_relative_to(source):
        raise LmforgeError(f"{dst} is inside the source folder {source}: convert into another folder")
    if source.is_relative_to(real):
        raise LmforgeError(f"the source {source} is inside {dst}, which the export would replace")
    if Path.cwd().resolve().is_relative_to(real):
        raise LmforgeError(f"{dst} is (or contains) the current folder: convert into a new folder")
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise LmforgeError(f"{dst} is a file, not a folder")
        if not force and any(target.iterdir()):
            raise LmforgeError(f"{dst} exists and is not empty (use --force to replace it)")
    return target


def export_hf_atomic(model: Transformer, tokenizer: Tokenizer, folder: str | Path, force: bool = False) -> None:
    """export_hf, all or nothing: written into a temporary folder beside `folder` (same file system) and renamed
    into place when complete. An existing non-empty `folder` is refused unless `force`, which replaces it only
    then. On any failure (or Ctrl-C) the temporary folder is removed and `folder` is left as it was."""
    folder = Path(os.path.abspath(Path(folder).expanduser()))
    created = _make_parents(folder.parent)
    tmp: Path | None = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
        export_hf(model, tokenizer, tmp)
        _default_permissions(tmp, recursive=True)
        _replace_folder(tmp, folder, force)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):
            with contextlib.suppress(OSError):
                parent.rmdir()
        if isinstance(e, OSError):
            raise LmforgeError(f"cannot write {folder}: {e.strerror or e}") from None
        raise


def _make_parents(parent: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first), so that a failure can take them back."""
    missing = []
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    try:
        for path in reversed(missing):
            path.mkdir()
    except OSError as e:
        for path in missing:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise LmforgeError(f"cannot create {path}: {e.strerror or e}") from None
    return list(reversed(missing))


def _replace_folder(tmp: Path, folder: Path, force: bool) -> None:
    if not (folder.exists() or folder.is_symlink()):
        os.rename(tmp, folder)
        return
    if not folder.is_dir():
        raise LmforgeError(f"{folder} is a file, not a folder")
    if not force and any(folder.iterdir()):
        raise LmforgeError(f"{folder} exists and is not empty (use --force to replace it)")
    aside = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:12]}.old")
    os.rename(folder, aside)
    try:
        os.rename(tmp, folder)
    except BaseException:
        os.rename(aside, folder)
        raise
    if aside.is_symlink():  # --force on a link to a folder replaces the link, never what it points to
        aside.unlink()
    else:
        shutil.rmtree(aside, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _default_permissions(path: Path, recursive: bool = False) -> None:
    """The mode any new file or folder gets (0644 / 0755 under the usual umask): safetensors writes its files
    0600, and mkdtemp makes its folder 0700."""
    mask = _umask()
    paths = [path, *path.rglob("*")] if recursive else [path]
    for p in paths:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
