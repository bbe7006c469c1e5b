"""HF checkpoint folders (config.json + safetensors) <-> ModelConfig and our state dict."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.weights.names import HF_PREFIXES, HF_RULES, to_ours, to_theirs

ACT_FROM_HF = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
ACT_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


def _eos_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [int(value)]


def _rope_base(hf: dict[str, Any]) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):  # Phi-3's longrope (also spelt su / yarn), llama3, linear, dynamic, ...
        raise LmforgeError(f"rope scaling {kind!r} is not supported yet")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise LmforgeError(f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported yet")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


# decoder-only families that are Llama plus config switches; the HF class for each, for export
LLAMA_LIKE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM"}


def _sliding_window(hf: dict[str, Any], kind: str) -> int | None:
    """The attention window transformers applies to some layer, or None: its config classes' defaults included."""
    if kind == "mistral":
        return hf.get("sliding_window", 4096)
    if kind == "phi3":
        return hf.get("sliding_window")
    if kind in ("qwen2", "qwen3"):  # only with use_sliding_window, and only from layer max_window_layers on
        window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
        layer_types = hf.get("layer_types")
        if layer_types is not None:
            slides = "sliding_attention" in layer_types
        else:
            slides = hf["num_hidden_layers"] > hf.get("max_window_layers", 28)
        return window if slides else None
    return None


def config_from_hf(hf: dict[str, Any], name: str = "custom") -> ModelConfig:
    if not isinstance(hf, dict):
        raise LmforgeError(f"config.json of {name} is not a JSON object")
    try:
        return _config_from_hf(hf, name)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise LmforgeError(f"config.json of {name} is incomplete or malformed ({type(e).__name__}: {e})") from None


def _config_from_hf(hf: dict[str, Any], name: str) -> ModelConfig:
    kind = hf.get("model_type")
    common: dict[str, Any] = dict(name=name, hf_model_type=kind, vocab_size=int(hf["vocab_size"]))
    if kind in LLAMA_LIKE:
        sliding = _sliding_window(hf, kind)
        if sliding and sliding < hf["max_position_embeddings"]:
            raise LmforgeError(f"sliding-window attention ({sliding}) is not supported yet")
        n_head = hf["num_attention_heads"]
        # what each transformers class does with attention_bias: Llama and Qwen3 put it on q, k, v and o; Qwen2
        # always has q/k/v biases and never o; Mistral and Phi-3 have no biases whatever the config says
        attention_bias = bool(hf.get("attention_bias")) and kind in ("llama", "qwen3")
        # Qwen3Config's head_dim defaults to 128, not hidden_size // num_attention_heads
        head_dim = hf.get("head_dim") or (128 if kind == "qwen3" else hf["hidden_size"] // n_head)
        return ModelConfig(
            **common, d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head, head_dim=head_dim, d_ff=hf["intermediate_size"],
            max_seq_len=hf["max_position_embeddings"], rope_base=_rope_base(hf), norm_eps=hf["rms_norm_eps"],
            act=ACT_FROM_HF[hf.get("hidden_act", "silu")], qkv_bias=kind == "qwen2" or attention_bias,
            qk_norm=kind == "qwen3", attn_out_bias=attention_bias,
            mlp_bias=kind == "llama" and bool(hf.get("mlp_bias")),
            # a config without the key: transformers' default (untied); load_hf_folder decides from the checkpoint
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=_eos_list(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
        )
    if kind == "gpt2":
        d = hf["n_embd"]
        return ModelConfig(
            **common, d_model=d, n_layer=hf["n_layer"], n_head=hf["n_head"], d_ff=hf.get("n_inner") or 4 * d,
            max_seq_len=hf["n_positions"], pos="learned", norm="layer", norm_eps=hf["layer_norm_epsilon"],
            gated_mlp=False, act=ACT_FROM_HF[hf.get("activation_function", "gelu_new")], qkv_bias=True,
            attn_out_bias=True, mlp_bias=True, bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_eos_list(hf.get("eos_token_id")), pad_token_id=hf.get("pad_token_id"),
        )
    if kind == "bert":
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise LmforgeError("only absolute position embeddings are supported for BERT")
        classifier = "id2label" in hf and any(
            a.endswith("ForSequenceClassification") for a in hf.get("architectures") or [])
        id2label = hf.get("id2label") or {} if classifier else {}
        return ModelConfig(
            **common, family="encoder", d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
            max_seq_len=hf["max_position_embeddings"], pos="learned", n_token_types=hf.get("type_vocab_size", 2),
            norm="layer", norm_eps=hf.get("layer_norm_eps", 1e-12), post_norm=True, gated_mlp=False,
            act=ACT_FROM_HF[hf.get("hidden_act", "gelu")], qkv_bias=True, attn_out_bias=True, mlp_bias=True,
            pad_token_id=hf.get("pad_token_id", 0), n_labels=len(id2label),
            label_names=[str(id2label[k]) for k in sorted(id2label, key=int)],
            mlm_head=any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in hf.get("architectures") or []),
        )
    if kind == "t5":
        ff = hf.get("feed_forward_proj", "relu")
        gated = ff.startswith("gated-")
        act = ff.removeprefix("gated-")
        tie = bool(hf.get("tie_word_embeddings", True))
        # T5 v1.0 scales the decoder output before its tied head, v1.1 does not. transformers 5 writes
        # tie_word_embeddings=true for both and says which in scale_decoder_outputs; older configs tie iff scaled
        scale = bool(hf.get("scale_decoder_outputs", tie))
        d = hf["d_model"]
        return ModelConfig(
            **common, family="encoder-decoder", d_model=d, n_layer=hf["num_layers"],
            n_decoder_layer=hf.get("num_decoder_layers") or hf["num_layers"], n_head=hf["num_heads"],
            head_dim=hf["d_kv"], d_ff=hf["d_ff"], max_seq_len=hf.get("n_positions", 512), pos="relative",
            rel_buckets=hf.get("relative_attention_num_buckets", 32),
            rel_max_distance=hf.get("relative_attention_max_distance", 128), norm="rms",
            norm_eps=hf.get("layer_norm_epsilon", 1e-6), gated_mlp=gated,
            act=ACT_FROM_HF["gelu_new" if act == "gelu" else act], attn_scale=1.0, tie_embeddings=tie,
            logit_scale=d**-0.5 if scale else 1.0, eos_token_ids=_eos_list(hf.get("eos_token_id", 1)),
            pad_token_id=hf.get("pad_token_id", 0), decoder_start_token_id=hf.get("decoder_start_token_id", 0),
        )
    raise LmforgeError(f"unsupported model_type {kind!r} (supported: {', '.join(sorted(HF_RULES))})")


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    kind = cfg.hf_model_type
    eos = cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else (cfg.eos_token_ids or None)
    if kind in LLAMA_LIKE:
        _check_exportable(cfg)
        hf: dict[str, Any] = dict(
            architectures=[LLAMA_LIKE[kind]], model_type=kind, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
            num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
            head_dim=cfg.head_dim, intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_seq_len,
            rope_theta=cfg.rope_base, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
            rms_norm_eps=cfg.norm_eps, hidden_act=ACT_TO_HF[cfg.act], tie_word_embeddings=cfg.tie_embeddings,
            bos_token_id=cfg.bos_token_id, eos_token_id=eos, pad_token_id=cfg.pad_token_id,
        )
        if kind == "llama":
            hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
        if kind == "qwen3":
            hf.update(attention_bias=cfg.qkv_bias)
        if kind in ("qwen2", "qwen3"):
            hf.update(use_sliding_window=False, sliding_window=None)
        if kind in ("mistral", "phi3"):
            hf.update(sliding_window=None)
        if kind == "phi3":
            hf["rope_parameters"]["partial_rotary_factor"] = 1.0
        return hf
    if kind == "gpt2":
        return dict(
            architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size, n_embd=cfg.d_model,
            n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.d_ff, n_positions=cfg.max_seq_len,
            layer_norm_epsilon=cfg.norm_eps, activation_function=ACT_TO_HF[cfg.act], bos_token_id=cfg.bos_token_id,
            eos_token_id=eos, tie_word_embeddings=True,
        )
    if kind == "bert":
        arch = "BertForMaskedLM" if cfg.mlm_head else "BertForSequenceClassification" if cfg.n_labels else "BertModel"
        hf = dict(
            architectures=[arch], model_type="bert", vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
            num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, intermediate_size=cfg.d_ff,
            max_position_embeddings=cfg.max_seq_len, type_vocab_size=cfg.n_token_types,
            layer_norm_eps=cfg.norm_eps, hidden_act=ACT_TO_HF[cfg.act], pad_token_id=cfg.pad_token_id,
            position_embedding_type="absolute",
        )
        if cfg.n_labels:
            names = cfg.label_names if len(cfg.label_names) == cfg.n_labels else [f"LABEL_{i}" for i in
                                                                                  range(cfg.n_labels)]
            hf["id2label"] = {str(i): name for i, name in enumerate(names)}
            hf["label2id"] = {name: i for i, name in enumerate(names)}
        return hf
    if kind == "t5":
        act = "gelu" if cfg.act == "gelu_tanh" else cfg.act
        scaled = cfg.logit_scale != 1.0
        return dict(
            architectures=["T5ForConditionalGeneration"], model_type="t5", vocab_size=cfg.vocab_size,
            d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.d_ff, num_layers=cfg.n_layer,
            num_decoder_layers=cfg.n_decoder_layer, num_heads=cfg.n_head,
            relative_attention_num_buckets=cfg.rel_buckets, relative_attention_max_distance=cfg.rel_max_distance,
            layer_norm_epsilon=cfg.norm_eps, feed_forward_proj=("gated-" if cfg.gated_mlp else "") + act,
            dense_act_fn=ACT_TO_HF[cfg.act], is_gated_act=cfg.gated_mlp, tie_word_embeddings=scaled,
            scale_decoder_outputs=scaled,
            pad_token_id=cfg.pad_token_id, eos_token_id=eos, decoder_start_token_id=cfg.decoder_start_token_id,
            is_encoder_decoder=True,
        )
    raise LmforgeError(f"cannot export model_type {kind!r}")


def _check_exportable(cfg: ModelConfig) -> None:
    """Refuse a config the HF class of its model_type cannot express, rather than write a folder that loads wrong."""
    kind = cfg.hf_model_type
    biases = {"llama": (cfg.qkv_bias, cfg.qkv_bias, cfg.mlp_bias), "qwen3": (cfg.qkv_bias, cfg.qkv_bias, False),
              "qwen2": (True, False, False)}.get(kind, (False, False, False))
    family = (biases, kind == "qwen3", "rope", "rms", True, None, 1.0)
    ours = ((cfg.qkv_bias, cfg.attn_out_bias, cfg.mlp_bias), cfg.qk_norm, cfg.pos, cfg.norm, cfg.gated_mlp,
            cfg.attn_scale, cfg.logit_scale)
    if ours != family:
        raise LmforgeError(f"this model's config cannot be exported as HF model_type {kind!r} "
                           "(biases, q/k norms, positions, norm or MLP differ from that family)")


def _conv1d_fix(name: str, tensor: Tensor) -> Tensor:
    """GPT-2 stores its block Linear weights transposed (Conv1D: in x out)."""
    return tensor.t().contiguous() if name.startswith("h.") and tensor.ndim == 2 else tensor


def read_safetensors(folder: Path) -> dict[str, Tensor]:
    index = folder / "model.safetensors.index.json"
    try:
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(load_file(folder / shard))
            return state
        if (folder / "model.safetensors").exists():
            return load_file(folder / "model.safetensors")
        if (folder / "pytorch_model.bin").exists():
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as e:
        raise LmforgeError(f"corrupt weights in {folder}: {str(e).splitlines()[0]}") from None
    raise LmforgeError(f"no model.safetensors (or index) in {folder}")


def load_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """An HF checkpoint folder -> (config, our state dict), tensors as stored."""
    if not (folder / "config.json").exists():
        raise LmforgeError(f"{folder} has no config.json: not an HF model folder")
    try:
        hf = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(f"bad config.json in {folder}: {e}") from None
    cfg = config_from_hf(hf, name=folder.name)
    _add_generation_eos(cfg, folder)
    kind = cfg.hf_model_type
    raw = read_safetensors(folder)
    if kind == "t5":
        # tied exactly when there is no head of its own (transformers 5 does the same, whatever the config says)
        head = raw.get("lm_head.weight")
        cfg.tie_embeddings = head is None or ("shared.weight" in raw and torch.equal(head, raw["shared.weight"]))
        if cfg.tie_embeddings:
            raw.pop("lm_head.weight", None)
    if kind == "bert":  # original Google BERT checkpoints name LayerNorm parameters gamma/beta
        raw = {k.removesuffix(".gamma") + ".weight" if k.endswith(".gamma") else
               k.removesuffix(".beta") + ".bias" if k.endswith(".beta") else k: v for k, v in raw.items()}
    if kind in ("gpt2",) and "lm_head.weight" in raw:
        raw.pop("lm_head.weight")  # tied copy saved by GPT2LMHeadModel
    if kind in LLAMA_LIKE:
        _decide_tying(cfg, hf, raw, folder)
        if cfg.tie_embeddings:
            raw.pop("lm_head.weight", None)
    fix = _conv1d_fix if kind == "gpt2" else None
    state = to_ours(raw, HF_RULES[kind], HF_PREFIXES.get(kind, ""), fix, consume=True)
    return cfg, state


def _decide_tying(cfg: ModelConfig, hf: dict[str, Any], raw: dict[str, Tensor], folder: Path) -> None:
    """Tied or not, for a Llama-like checkpoint. A config without tie_word_embeddings is tied exactly when there is
    no lm_head.weight (transformers would leave such a head random). A config that says tied but comes with an
    lm_head.weight different from the embedding is untied, as transformers does: the checkpoint wins."""
    head, emb = raw.get("lm_head.weight"), raw.get("model.embed_tokens.weight")
    if hf.get("tie_word_embeddings") is None:
        cfg.tie_embeddings = head is None
    elif cfg.tie_embeddings and head is not None and emb is not None and not torch.equal(head, emb):
        cfg.tie_embeddings = False
    elif not cfg.tie_embeddings and head is None:
        raise LmforgeError(f"config.json of {folder.name} says tie_word_embeddings=false but the checkpoint has no "
                           "lm_head.weight")


def _add_generation_eos(cfg: ModelConfig, folder: Path) -> None:
    """generation_config.json's eos_token_id (int or list) joins config.json's: theirs first, then the extra ones."""
    path = folder / "generation_config.json"
    if not path.exists():
        return
    try:
        gen = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(f"bad generation_config.json in {folder}: {e}") from None
    try:
        extra = _eos_list(gen.get("eos_token_id")) if isinstance(gen, dict) else []
        extra = [int(i) for i in extra]
    except (TypeError, ValueError):
        raise LmforgeError(f"bad eos_token_id in generation_config.json of {folder}") from None
    cfg.eos_token_ids = list(dict.fromkeys([*cfg.eos_token_ids, *extra]))


def save_hf_folder(cfg: ModelConfig, state: dict[str, Tensor], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.tie_embeddings:  # a tied head is the embedding itself, whether or not a module's state dict lists it
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    fix = _conv1d_fix if cfg.hf_model_type == "gpt2" else None
    if cfg.hf_model_type == "t5" and cfg.logit_scale == 1.0 and "lm_head.weight" not in state:
        # an unscaled T5 head is written out as its own tensor: every transformers version reads
        # tie_word_embeddings=false + lm_head.weight as "no scaling", but older ones read a tied config as scaled
        state = {**state, "lm_head.weight": state["tok_emb.weight"].clone()}  # safetensors refuses shared storage
    theirs = to_theirs(cfg, state, HF_RULES[cfg.hf_model_type], fix)
    save_file({k: v.contiguous() for k, v in theirs.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
