"""Weight-name maps between checkpoint formats and our state dict, one table per family.

A rule is (their name, our name, part): `{i}` is a layer index and `{p}` weight|bias. `part` is the
slot of a tensor we store fused (q|k|v, gate|up, k|v) and None for a one-to-one tensor. The same table
drives loading (their -> ours, concatenating parts) and export (ours -> theirs, splitting them).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError

Rule = tuple[str, str, int | None]

LLAMA: list[Rule] = [
    ("model.embed_tokens.weight", "tok_emb.weight", None),
    ("model.layers.{i}.input_layernorm.weight", "decoder.{i}.attn_norm.weight", None),
    ("model.layers.{i}.self_attn.q_proj.{p}", "decoder.{i}.attn.qkv.{p}", 0),
    ("model.layers.{i}.self_attn.k_proj.{p}", "decoder.{i}.attn.qkv.{p}", 1),
    ("model.layers.{i}.self_attn.v_proj.{p}", "decoder.{i}.attn.qkv.{p}", 2),
    ("model.layers.{i}.self_attn.o_proj.{p}", "decoder.{i}.attn.out.{p}", None),
    ("model.layers.{i}.post_attention_layernorm.weight", "decoder.{i}.mlp_norm.weight", None),
    ("model.layers.{i}.mlp.gate_proj.{p}", "decoder.{i}.mlp.fc_in.{p}", 0),  # {p}: Llama's mlp_bias
    ("model.layers.{i}.mlp.up_proj.{p}", "decoder.{i}.mlp.fc_in.{p}", 1),
    ("model.layers.{i}.mlp.down_proj.{p}", "decoder.{i}.mlp.fc_out.{p}", None),
    ("model.norm.weight", "dec_norm.weight", None),
    ("lm_head.weight", "lm_head.weight", None),
]

# Qwen3: Llama's names plus an RMSNorm over each q and k head
QWEN3: list[Rule] = [
    *LLAMA,
    ("model.layers.{i}.self_attn.q_norm.weight", "decoder.{i}.attn.q_norm.weight", None),
    ("model.layers.{i}.self_attn.k_norm.weight", "decoder.{i}.attn.k_norm.weight", None),
]

# Phi-3 stores q|k|v and gate|up fused in the same order we do: one-to-one, no biases
PHI3: list[Rule] = [
    ("model.embed_tokens.weight", "tok_emb.weight", None),
    ("model.layers.{i}.input_layernorm.weight", "decoder.{i}.attn_norm.weight", None),
    ("model.layers.{i}.self_attn.qkv_proj.weight", "decoder.{i}.attn.qkv.weight", None),
    ("model.layers.{i}.self_attn.o_proj.weight", "decoder.{i}.attn.out.weight", None),
    ("model.layers.{i}.post_attention_layernorm.weight", "decoder.{i}.mlp_norm.weight", None),
    ("model.layers.{i}.mlp.gate_up_proj.weight", "decoder.{i}.mlp.fc_in.weight", None),
    ("model.layers.{i}.mlp.down_proj.weight", "decoder.{i}.mlp.fc_out.weight", None),
    ("model.norm.weight", "dec_norm.weight", None),
    ("lm_head.weight", "lm_head.weight", None),
]

GPT2: list[Rule] = [
    ("wte.weight", "tok_emb.weight", None),
    ("wpe.weight", "pos_emb.weight", None),
    ("h.{i}.ln_1.{p}", "decoder.{i}.attn_norm.{p}", None),
    ("h.{i}.attn.c_attn.{p}", "decoder.{i}.attn.qkv.{p}", None),
    ("h.{i}.attn.c_proj.{p}", "decoder.{i}.attn.out.{p}", None),
    ("h.{i}.ln_2.{p}", "decoder.{i}.mlp_norm.{p}", None),
    ("h.{i}.mlp.c_fc.{p}", "decoder.{i}.mlp.fc_in.{p}", None),
    ("h.{i}.mlp.c_proj.{p}", "decoder.{i}.mlp.fc_out.{p}", None),
    ("ln_f.{p}", "dec_norm.{p}", None),
]

BERT: list[Rule] = [
    ("embeddings.word_embeddings.weight", "tok_emb.weight", None),
    ("embeddings.position_embeddings.weight", "pos_emb.weight", None),
    ("embeddings.token_type_embeddings.weight", "type_emb.weight", None),
    ("embeddings.LayerNorm.{p}", "emb_norm.{p}", None),
    ("encoder.layer.{i}.attention.self.query.{p}", "encoder.{i}.attn.qkv.{p}", 0),
    ("encoder.layer.{i}.attention.self.key.{p}", "encoder.{i}.attn.qkv.{p}", 1),
    ("encoder.layer.{i}.attention.self.value.{p}", "encoder.{i}.attn.qkv.{p}", 2),
    ("encoder.layer.{i}.attention.output.dense.{p}", "encoder.{i}.attn.out.{p}", None),
    ("encoder.layer.{i}.attention.output.LayerNorm.{p}", "encoder.{i}.attn_norm.{p}", None),
    ("encoder.layer.{i}.intermediate.dense.{p}", "encoder.{i}.mlp.fc_in.{p}", None),
    ("encoder.layer.{i}.output.dense.{p}", "encoder.{i}.mlp.fc_out.{p}", None),
    ("encoder.layer.{i}.output.LayerNorm.{p}", "encoder.{i}.mlp_norm.{p}", None),
    ("pooler.dense.{p}", "pooler.{p}", None),
    ("classifier.{p}", "classifier.{p}", None),
    ("cls.predictions.transform.dense.{p}", "mlm_dense.{p}", None),
    ("cls.predictions.transform.LayerNorm.{p}", "mlm_norm.{p}", None),
    ("cls.predictions.bias", "mlm_head.bias", None),
]

T5: list[Rule] = [
    ("shared.weight", "tok_emb.weight", None),
    ("encoder.block.{i}.layer.0.SelfAttention.q.weight", "encoder.{i}.attn.qkv.weight", 0),
    ("encoder.block.{i}.layer.0.SelfAttention.k.weight", "encoder.{i}.attn.qkv.weight", 1),
    ("encoder.block.{i}.layer.0.SelfAttention.v.weight", "encoder.{i}.attn.qkv.weight", 2),
    ("encoder.block.{i}.layer.0.SelfAttention.o.weight", "encoder.{i}.attn.out.weight", None),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "enc_rel.weight", None),
    ("encoder.block.{i}.layer.0.layer_norm.weight", "encoder.{i}.attn_norm.weight", None),
    ("encoder.block.{i}.layer.1.DenseReluDense.wi.weight", "encoder.{i}.mlp.fc_in.weight", None),
    ("encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight", "encoder.{i}.mlp.fc_in.weight", 0),
    ("encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight", "encoder.{i}.mlp.fc_in.weight", 1),
    ("encoder.block.{i}.layer.1.DenseReluDense.wo.weight", "encoder.{i}.mlp.fc_out.weight", None),
    ("encoder.block.{i}.layer.1.layer_norm.weight", "encoder.{i}.mlp_norm.weight", None),
    ("encoder.final_layer_norm.weight", "enc_norm.weight", None),
    ("decoder.block.{i}.layer.0.SelfAttention.q.weight", "decoder.{i}.attn.qkv.weight", 0),
    ("decoder.block.{i}.layer.0.SelfAttention.k.weight", "decoder.{i}.attn.qkv.weight", 1),
    ("decoder.block.{i}.layer.0.SelfAttention.v.weight", "decoder.{i}.attn.qkv.weight", 2),
    ("decoder.block.{i}.layer.0.SelfAttention.o.weight", "decoder.{i}.attn.out.weight", None),
    ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "dec_rel.weight", None),
    ("decoder.block.{i}.layer.0.layer_norm.weight", "decoder.{i}.attn_norm.weight", None),
    ("decoder.block.{i}.layer.1.EncDecAttention.q.weight", "decoder.{i}.cross_attn.q.weight", None),
    ("decoder.block.{i}.layer.1.EncDecAttention.k.weight", "decoder.{i}.cross_attn.kv.weight", 0),
    ("decoder.block.{i}.layer.1.EncDecAttention.v.weight", "decoder.{i}.cross_attn.kv.weight", 1),
    ("decoder.block.{i}.layer.1.EncDecAttention.o.weight", "decoder.{i}.cross_attn.out.weight", None),
    ("decoder.block.{i}.layer.1.layer_norm.weight", "decoder.{i}.cross_norm.weight", None),
    ("decoder.block.{i}.layer.2.DenseReluDense.wi.weight", "decoder.{i}.mlp.fc_in.weight", None),
    ("decoder.block.{i}.layer.2.DenseReluDense.wi_0.weight", "decoder.{i}.mlp.fc_in.weight", 0),
    ("decoder.block.{i}.layer.2.DenseReluDense.wi_1.weight", "decoder.{i}.mlp.fc_in.weight", 1),
    ("decoder.block.{i}.layer.2.DenseReluDense.wo.weight", "decoder.{i}.mlp.fc_out.weight", None),
    ("decoder.block.{i}.layer.2.layer_norm.weight", "decoder.{i}.mlp_norm.weight", None),
    ("decoder.final_layer_norm.weight", "dec_norm.weight", None),
    ("lm_head.weight", "lm_head.weight", None),
]

GGUF_LLAMA: list[Rule] = [
    ("token_embd.weight", "tok_emb.weight", None),
    ("blk.{i}.attn_norm.weight", "decoder.{i}.attn_norm.weight", None),
    ("blk.{i}.attn_q.{p}", "decoder.{i}.attn.qkv.{p}", 0),
    ("blk.{i}.attn_k.{p}", "decoder.{i}.attn.qkv.{p}", 1),
    ("blk.{i}.attn_v.{p}", "decoder.{i}.attn.qkv.{p}", 2),
    ("blk.{i}.attn_output.weight", "decoder.{i}.attn.out.weight", None),
    ("blk.{i}.ffn_norm.weight", "decoder.{i}.mlp_norm.weight", None),
    ("blk.{i}.ffn_gate.weight", "decoder.{i}.mlp.fc_in.weight", 0),
    ("blk.{i}.ffn_up.weight", "decoder.{i}.mlp.fc_in.weight", 1),
    ("blk.{i}.ffn_down.weight", "decoder.{i}.mlp.fc_out.weight", None),
    ("output_norm.weight", "dec_norm.weight", None),
    ("output.weight", "lm_head.weight", None),
]

HF_RULES: dict[str, list[Rule]] = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": QWEN3, "phi3": PHI3,
                                   "gpt2": GPT2, "bert": BERT, "t5": T5}
# HF's task wrappers prefix the base model's names; our tables are written without the prefix
HF_PREFIXES = {"gpt2": "transformer.", "bert": "bert."}
# checkpoint tensors that are buffers or tied copies, not weights of their own
IGNORED = re.compile(
    r"(.*\.attn\.(masked_)?bias$|.*rotary_emb\.inv_freq$|.*position_ids$|cls\.predictions\.decoder\.(weight|bias)$"
    r"|(encoder|decoder)\.embed_tokens\.weight$"
    # BERT's next-sentence head (BertForPreTraining) and a cross-attention bias old T5 checkpoints carry unused
    r"|cls\.seq_relationship\.(weight|bias)$|decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$)"
)


def _pattern(template: str) -> re.Pattern[str]:
    regex = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(regex + "$")


def part_sizes(cfg: ModelConfig, ours: str) -> list[int]:
    """Rows of each part of a fused tensor, in rule order."""
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    if ".attn.qkv." in ours:
        return [q, kv, kv]
    if ".cross_attn.kv." in ours:
        return [kv, kv]
    if ".mlp.fc_in." in ours:
        return [cfg.d_ff, cfg.d_ff]
    raise AssertionError(f"{ours} is not a fused tensor")


def to_ours(
    theirs: dict[str, Tensor], rules: list[Rule], prefix: str = "", fix: Callable[[str, Tensor], Tensor] | None = None,
    consume: bool = False,
) -> dict[str, Tensor]:
    """Their state dict -> ours. `fix` adjusts one of their tensors first (GPT-2 Conv1D, GGUF q/k rows).
    `consume` empties `theirs` as it goes, so a tensor that is fused or fixed is not held twice."""
    compiled = [(_pattern(t), o, part) for t, o, part in rules]
    n_parts = Counter(o for _, o, part in rules if part is not None)
    whole: dict[str, Tensor] = {}
    parts: dict[str, dict[int, Tensor]] = {}
    for name in list(theirs):
        tensor = theirs.pop(name) if consume else theirs[name]
        if prefix and name.startswith(prefix):
            name = name[len(prefix) :]
        if IGNORED.match(name):
            continue
        for pattern, ours, part in compiled:
            m = pattern.match(name)
            if m is None:
                continue
            target = ours.format(**m.groupdict())
            tensor = fix(name, tensor) if fix else tensor
            if part is None:
                whole[target] = tensor
            else:
                pieces = parts.setdefault(target, {})
                pieces[part] = tensor
                if len(pieces) == n_parts[ours]:  # fused as soon as complete: the pieces are freed early
                    whole[target] = torch.cat([pieces[k] for k in sorted(pieces)], dim=0)
                    del parts[target]
            break
        else:
            raise LmforgeError(f"unexpected tensor {name!r} in checkpoint")
    for target, pieces in parts.items():
        whole[target] = torch.cat([pieces[k] for k in sorted(pieces)], dim=0)
    return whole


def to_theirs(
    cfg: ModelConfig, ours: dict[str, Tensor], rules: list[Rule], fix: Callable[[str, Tensor], Tensor] | None = None
) -> dict[str, Tensor]:
    """Our state dict -> theirs (splitting fused tensors). Rules that do not apply to cfg are skipped."""
    out: dict[str, Tensor] = {}
    for name, tensor in ours.items():
        matches = []
        for t, o, part in rules:
            m = _pattern(o).match(name)
            if m is not None:
                matches.append((t.format(**m.groupdict()), part))
        if not matches:
            raise LmforgeError(f"no export name for {name!r}")
        fused = [(t, part) for t, part in matches if part is not None]
        # T5 names fc_in `wi` when plain and `wi_0`/`wi_1` when gated: the config decides which applies
        if fused and (cfg.gated_mlp or ".mlp.fc_in." not in name):
            pieces = tensor.split(part_sizes(cfg, name), dim=0)
            for t, part in fused:
                out[t] = fix(t, pieces[part]) if fix else pieces[part]
        else:
            t = next(t for t, part in matches if part is None)
            out[t] = fix(t, tensor) if fix else tensor
    return out
