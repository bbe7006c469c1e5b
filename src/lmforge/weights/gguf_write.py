"""GGUF export (llama architecture): our model + tokenizer -> one .gguf file that llama.cpp, transformers and
`load` read, with metadata, tokenizer and tensors laid out the way llama.cpp's convert_hf_to_gguf.py writes a
Llama (permuted q/k rows, F32 norms, byte-level BPE or SentencePiece-style vocabulary) and quantized per tensor
by gguf-py.

Tensors are converted and written one at a time (the header lists every tensor's type and size first), so at
most one tensor's float copy exists beside the model; the file is written beside its destination and renamed
into place only when complete."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFValueType,
    GGUFWriter,
    Keys,
    LlamaFileType,
    TokenType,
)
from gguf.quants import quantize
from torch import Tensor

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model.transformer import Transformer
from lmforge.model_info import read_config
from lmforge.tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT, Tokenizer
from lmforge.weights.load import _make_parents, _umask, checkpoint_state, load
from lmforge.weights.names import GGUF_LLAMA, to_theirs
from lmforge.weights.registry import resolve

T = GGMLQuantizationType

# --quant -> (the 2-D weights' type, general.file_type)
QUANTS: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f16": (T.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (T.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (T.Q4_1, LlamaFileType.MOSTLY_Q4_1),
}
# HF model types llama.cpp's converter writes as architecture "llama" (LlamaModel registers both classes)
LLAMA_TYPES = ("llama", "mistral")
F16_MAX = float(np.finfo(np.float16).max)


def parse_quant(quant: str) -> str:
    """`quant` lower-cased, or an LmforgeError naming the choices."""
    name = str(quant).strip().lower()
    if name not in QUANTS:
        raise LmforgeError(f"unknown GGUF quantization {quant!r} (choose one of: {', '.join(QUANTS)})")
    return name


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse what llama.cpp's `llama` architecture cannot express, before anything is written: its blocks are
    RoPE + RMSNorm + SwiGLU without biases, q/k norms or extra heads."""
    kind = cfg.hf_model_type
    if cfg.family != "decoder" or kind not in LLAMA_TYPES:
        what = kind if cfg.family == "decoder" else f"{kind} ({cfg.family})"
    else:
        extras = [label for differs, label in [
            (cfg.qkv_bias or cfg.attn_out_bias or cfg.mlp_bias, "biases"),
            (cfg.qk_norm, "q/k norms"),
            (cfg.pos != "rope", f"{cfg.pos} positions"),
            (cfg.norm != "rms" or cfg.post_norm, "a different norm"),
            (not cfg.gated_mlp or cfg.act != "silu", f"a {cfg.act} MLP"),
            (cfg.attn_scale is not None or cfg.logit_scale != 1.0, "scaled attention or logits"),
            (cfg.n_labels > 0 or cfg.mlm_head, "a classification head"),
        ] if differs]
        if not extras:
            return
        what = f"{kind} with {' and '.join(extras)}"
    raise LmforgeError(f"GGUF export supports the Llama family; {cfg.name} is {what}")


def permute_rope_rows(w: Tensor, n_head: int) -> Tensor:
    """HF's half-split q/k rows -> llama.cpp's interleaved order (convert_hf_to_gguf's LlamaModel.permute), the
    inverse of weights.gguf.unpermute_rope_rows: llama.cpp's rope rotates adjacent pairs, HF's a head's halves."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---- tensors -----------------------------------------------------------------------------------------------


@dataclass
class _Planned:
    name: str  # the GGUF name
    tensor: Tensor  # a view into the model's weights (the fused ones split, not copied)
    qtype: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        rows = int(np.prod(self.tensor.shape[:-1], dtype=np.int64))
        return rows * (self.tensor.shape[-1] // block) * size


def _tensor_type(w: Tensor, wanted: GGMLQuantizationType, head: bool) -> GGMLQuantizationType:
    """Per tensor, as llama.cpp does: 1-D tensors (norms) F32; the output head (output.weight, or token_embd when
    it is tied to it) Q8_0 under a 4-bit quant, since llama-quantize gives it Q6_K (Q8_0 when its rows do not
    split into 256-blocks) and gguf-py cannot write Q6_K; a row length the quant's block does not divide F16; a
    weight beyond fp16's range F32 rather than infinities."""
    if w.ndim == 1:
        return T.F32
    qtype = T.Q8_0 if head and wanted in (T.Q4_0, T.Q4_1) else wanted
    if w.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        qtype = T.F16
    if qtype == T.F16:
        lo, hi = torch.aminmax(w.detach())  # one pass, no copy
        if max(-float(lo), float(hi)) > F16_MAX:
            return T.F32
    return qtype


def _plan(model: Transformer, wanted: GGMLQuantizationType) -> list[_Planned]:
    cfg = model.cfg
    theirs = to_theirs(cfg, checkpoint_state(model), GGUF_LLAMA)  # splits are views: nothing is copied yet
    if cfg.tie_embeddings:
        theirs.pop("output.weight", None)  # llama.cpp uses token_embd as the head when output.weight is absent
    plan = []
    for name, w in theirs.items():
        head = name == "output.weight" or (name == "token_embd.weight" and cfg.tie_embeddings)
        plan.append(_Planned(name, w, _tensor_type(w, wanted, head)))
    return plan


def _encode(item: _Planned, cfg: ModelConfig) -> np.ndarray:
    """One tensor as the file stores it. Its float32 copy (none for an fp32 model's unpermuted weights) lives
    only until the next tensor."""
    w = item.tensor.detach()
    if item.name.endswith("attn_q.weight"):
        w = permute_rope_rows(w, cfg.n_head)
    elif item.name.endswith("attn_k.weight"):
        w = permute_rope_rows(w, cfg.n_kv_head)
    array = w.to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return quantize(array, item.qtype)


# ---- metadata ----------------------------------------------------------------------------------------------


class _Writer(GGUFWriter):
    """GGUFWriter that can also write an empty array: the format allows one, and llama.cpp refuses a BPE
    vocabulary whose `tokenizer.ggml.merges` key is missing, even when it has no merges (a bytes-only BPE)."""

    def _pack_val(
        self, val: Any, vtype: GGUFValueType, add_vtype: bool, sub_type: GGUFValueType | None = None
    ) -> bytes:
        if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            prefix = self._pack("I", vtype) if add_vtype else b""
            return prefix + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _add_model_metadata(writer: GGUFWriter, cfg: ModelConfig, file_type: LlamaFileType) -> None:
    """The keys convert_hf_to_gguf.py writes for a Llama (TextModel + LlamaModel.set_gguf_parameters)."""
    writer.add_type("model")
    writer.add_name(cfg.name)
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.head_dim != cfg.d_model // cfg.n_head:  # readers assume d_model / n_head otherwise
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_file_type(file_type)
    writer.add_vocab_size(cfg.vocab_size)
    # llama.cpp rotates this many dimensions; transformers reads the head size from it
    writer.add_rope_dimension_count(cfg.head_dim)


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf's does_token_look_special: added tokens some checkpoints forget to mark special."""
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's `tokenizer.ggml.pre` name for a byte-level BPE pre-tokenizer (the ones Tokenizer.from_gguf
    rebuilds exactly), or None for one it would split differently."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel":
        return "gpt-2" if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    steps = pre.get("pretokenizers") or []
    if pre.get("type") != "Sequence" or len(steps) != 2:
        return None
    first, byte_level = steps
    if byte_level.get("type") != "ByteLevel" or byte_level.get("add_prefix_space"):
        return None
    if first.get("type") == "Digits" and first.get("individual_digits") and byte_level.get("use_regex", True):
        return "smollm"  # SmolLM's (and StarCoder's): digits one by one, then GPT-2's split
    if (first.get("type") == "Split" and first.get("behavior") == "Isolated" and not first.get("invert")
            and not byte_level.get("use_regex", True)):
        pattern = (first.get("pattern") or {}).get("Regex")
        return {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}.get(pattern)
    return None


@dataclass
class _Vocab:
    model: str  # tokenizer.ggml.model
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None = None
    add_space_prefix: bool = False


def _vocab(tokenizer: Tokenizer, cfg: ModelConfig) -> _Vocab:
    data = json.loads(tokenizer.backend.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise LmforgeError(f"GGUF export needs a BPE tokenizer; {cfg.name}'s is {model.get('type')}")
    if model.get("byte_fallback"):
        return _sentencepiece_vocab(data, cfg)
    pre = _pre_tokenizer_name(data.get("pre_tokenizer"))
    normalizer = (data.get("normalizer") or {}).get("type")
    if pre is None or normalizer not in (None, "NFC") or model.get("continuing_subword_prefix"):
        # NFC: Qwen2's tokenizers normalize, llama.cpp does not; the same ids for text already in NFC
        raise LmforgeError(f"GGUF export: {cfg.name}'s tokenizer splits text in a way llama.cpp has no name for "
                           "(byte-level BPE with the gpt-2, smollm, llama-bpe or qwen2 pre-tokenizer is supported)")
    tokens, types = _tokens(data, cfg)
    return _Vocab("gpt2", pre, tokens, types, _merges(model))


def _tokens(data: dict[str, Any], cfg: ModelConfig) -> tuple[list[str], list[int]]:
    """id -> token text and llama.cpp token type, as convert_hf_to_gguf's get_vocab_base: added tokens keep
    their plain text, special ones are CONTROL and the others USER_DEFINED, ids without a token [PAD<i>]."""
    vocab: dict[str, int] = data["model"].get("vocab") or {}
    added: list[dict[str, Any]] = data.get("added_tokens") or []
    n = cfg.vocab_size
    largest = max([*vocab.values(), *(t["id"] for t in added), -1])
    if largest >= n:
        raise LmforgeError(f"GGUF export: the tokenizer has token id {largest} but the model only {n} embeddings")
    tokens: list[str | None] = [None] * n
    types = [int(TokenType.UNUSED)] * n
    for text, i in vocab.items():
        tokens[i], types[i] = text, int(TokenType.NORMAL)
    for t in added:
        special = t.get("special") or _looks_special(t["content"])
        tokens[t["id"]] = t["content"]
        types[t["id"]] = int(TokenType.CONTROL if special else TokenType.USER_DEFINED)
    return [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)], types


def _merges(model: dict[str, Any]) -> list[str]:
    """GGUF spells a merge "left right"; tokenizer.json as that string or (newer) as a pair."""
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]


def _sentencepiece_vocab(data: dict[str, Any], cfg: ModelConfig) -> _Vocab:
    """A SentencePiece-style BPE (Llama 2, Mistral, TinyLlama: ▁ for spaces, <0xNN> byte fallback) -> llama.cpp's
    `llama` tokenizer. Its merges run by token score, highest first: each token scores minus the rank of the
    merge that makes it, which replays the BPE merge order. The merges are written as well, for transformers."""
    tokens, types = _tokens(data, cfg)
    merges = _merges(data["model"])
    rank = {m.replace(" ", ""): -float(r) for r, m in reversed(list(enumerate(merges)))}
    unk = data["model"].get("unk_token")
    for i, text in enumerate(tokens):
        if types[i] == TokenType.NORMAL and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types[i] = int(TokenType.BYTE)
        elif types[i] in (TokenType.NORMAL, TokenType.CONTROL) and text == unk:
            types[i] = int(TokenType.UNKNOWN)
    scores = [rank.get(t, 0.0) if k == TokenType.NORMAL else 0.0 for t, k in zip(tokens, types, strict=True)]
    return _Vocab("llama", "default", tokens, types, merges, scores, _prepends_space(data))


def _prepends_space(data: dict[str, Any]) -> bool:
    """Whether the tokenizer puts ▁ before the text: a Prepend normalizer (legacy Llama) or Metaspace's
    prepend_scheme (newer tokenizer.json files)."""
    text = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")])
    return '"Prepend"' in text or bool(re.search(r'"prepend_scheme": "(first|always)"', text))


def _special_ids(tokenizer: Tokenizer, cfg: ModelConfig) -> dict[str, int | None]:
    """bos/eos/pad/unk ids: the tokenizer's tokens first (as llama.cpp's SpecialVocab reads tokenizer_config),
    the config's ids otherwise. eos is the id generation stops at (cfg.eos_token_ids, which our reader rebuilds
    from it alone); another stop id of the config becomes eot, which llama.cpp also stops at."""
    eos = tokenizer.eos_id
    if cfg.eos_token_ids and eos not in cfg.eos_token_ids:
        eos = cfg.eos_token_ids[0]
    others = [i for i in cfg.eos_token_ids if i != eos]
    return {
        "bos": tokenizer.bos_id if tokenizer.bos_id is not None else cfg.bos_token_id,
        "eos": eos,
        "eot": others[0] if others else None,
        "pad": tokenizer.pad_id if tokenizer.pad_id is not None else cfg.pad_token_id,
        "unk": tokenizer.token_id(tokenizer.unk_token),
    }


def _adds(tokenizer: Tokenizer, bos: int | None, eos: int | None) -> tuple[bool, bool]:
    """(adds bos, adds eos) when encoding with special tokens, found by encoding: post-processors say so in
    several ways (TemplateProcessing, RobertaProcessing, ...)."""
    plain, full = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a")
    return (bos is not None and full[:1] == [bos] and plain[:1] != [bos],
            eos is not None and full[-1:] == [eos] and plain[-1:] != [eos])


def _add_tokenizer(writer: GGUFWriter, tokenizer: Tokenizer, cfg: ModelConfig, vocab: _Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    # always present, even empty: llama.cpp's BPE loader requires the key
    writer.add_key_value(Keys.Tokenizer.MERGES, vocab.merges, GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    ids = _special_ids(tokenizer, cfg)
    for key, add in [("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("eot", writer.add_eot_token_id), ("unk", writer.add_unk_token_id),
                     ("pad", writer.add_pad_token_id)]:
        value = ids[key]
        if value is not None:
            add(int(value))
    adds_bos, adds_eos = _adds(tokenizer, ids["bos"], ids["eos"])
    writer.add_add_bos_token(adds_bos)
    if adds_eos:
        writer.add_add_eos_token(True)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# ---- export ------------------------------------------------------------------------------------------------


def export_gguf(
    model: Transformer, tokenizer: Tokenizer, path: str | Path, quant: str = "f16", force: bool = False
) -> Path:
    """Write `model` + `tokenizer` as a llama-architecture GGUF at `path`, 2-D weights at `quant` (f16, q8_0,
    q4_0, q4_1; see _tensor_type for the exceptions), all or nothing: an existing file is refused unless
    `force`, and replaced only once the new one is complete. Returns the absolute path written."""
    quant = parse_quant(quant)
    check_exportable(model.cfg)
    _check_float_weights(model)
    target = _target(path, force)
    wanted, file_type = QUANTS[quant]
    vocab = _vocab(tokenizer, model.cfg)  # tokenizer problems surface before the slow part
    _write_atomic(target, force, lambda tmp: _write(model, tokenizer, vocab, tmp, wanted, file_type))
    return target


def _check_float_weights(model: Transformer) -> None:
    """A model loaded with a quantized --dtype holds packed int rows (qweight, scales) that no GGUF type matches
    block for block: export from the float weights instead."""
    packed = [k for k, v in checkpoint_state(model).items() if not v.is_floating_point() or
              k.rsplit(".", 1)[-1] not in ("weight", "bias")]
    if packed:
        raise LmforgeError(f"GGUF export needs float weights, and {model.cfg.name} holds quantized ones ({packed[0]}): "
                           "load it as float32 or bfloat16")


def _write(model: Transformer, tokenizer: Tokenizer, vocab: _Vocab, tmp: Path, wanted: GGMLQuantizationType,
           file_type: LlamaFileType) -> None:
    cfg = model.cfg
    plan = _plan(model, wanted)
    writer = _Writer(str(tmp), "llama")
    try:
        _add_model_metadata(writer, cfg, file_type)
        _add_tokenizer(writer, tokenizer, cfg, vocab)
        writer.add_quantization_version(GGML_QUANT_VERSION)
        for item in plan:  # the header lists every tensor: types and sizes are known before any data
            writer.add_tensor_info(item.name, tuple(item.tensor.shape), np.dtype(np.float32), item.nbytes,
                                   raw_dtype=item.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with torch.no_grad():
            for item in plan:
                writer.write_tensor_data(_encode(item, cfg))
        writer.flush()
        assert writer.fout is not None
        os.fsync(writer.fout[0].fileno())  # the rename must not publish a file whose data is still in flight
    finally:
        writer.close()


def convert_gguf(src: str | Path, out: str | Path, quant: str = "f16", force: bool = False) -> ModelConfig:
    """Any Llama-family checkpoint `load` reads (HF folder, fine-tuned and merged or not, or a GGUF file) -> a
    GGUF file at `out`. The quant, the destination and the model's config are checked before the (slow) load.
    Returns the model's config."""
    parse_quant(quant)
    source = resolve(str(src)).resolve()
    target = _target(out, force)
    real = target.resolve()
    if real == source:
        raise LmforgeError(f"{out} is the source itself: write the GGUF file somewhere else")
    if source.is_dir() and real.is_relative_to(source) and real.exists():
        raise LmforgeError(f"{out} is a file of the source folder {source}: write the GGUF file somewhere else")
    check_exportable(read_config(source)[0])  # from config.json or the GGUF header: no weights read yet
    model, tokenizer = load(source, torch.float32, device="cpu")
    export_gguf(model, tokenizer, target, quant, force)
    return model.cfg


def _target(path: str | Path, force: bool) -> Path:
    if not str(path).strip():
        raise LmforgeError("empty output path: name the .gguf file to write")
    target = Path(os.path.abspath(Path(path).expanduser()))
    if target.is_dir():
        raise LmforgeError(f"{path} is a folder: name the .gguf file to write")
    if (target.exists() or target.is_symlink()) and not force:
        raise LmforgeError(f"{path} exists (use --force to replace it)")
    return target


def _write_atomic(target: Path, force: bool, write: Callable[[Path], None]) -> None:
    """write(tmp) into a temporary file beside `target` (same file system), then rename it into place. On any
    failure (or Ctrl-C) the temporary file and the folders made for it are removed, and `target` is untouched."""
    created = _make_parents(target.parent)
    tmp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes it 0600; the file gets the mode any new file would
        _target(target, force)  # again: something may have appeared there meanwhile
        os.replace(tmp, target)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        for parent in reversed(created):
            try:
                parent.rmdir()
            except OSError:
                pass
        if isinstance(e, OSError):
            raise LmforgeError(f"cannot write {target}: {e.strerror or e}") from None
        raise


def tensor_types(path: str | Path) -> dict[str, str]:
    """name -> type name of each tensor of a GGUF file (what `export_gguf` chose), for reports and tests."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}

