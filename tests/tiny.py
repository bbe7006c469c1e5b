"""Tiny checkpoints on disk for the CLI, inspect and fuzz tests: an HF Llama folder and a BERT folder written by
transformers (save_pretrained + the byte tokenizer of conftest.py), and a GGUF llama written with gguf-py's
GGUFWriter the way tests/test_gguf.py writes them, only much smaller."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from conftest import BYTE_VOCAB, write_byte_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|endoftext|>assistant: {% endif %}"
)


def llama_folder(folder: Path, layers: int = 1, chat_template: bool = False, seed: int = 0, context: int = 64) -> Path:
    """A random Llama (d_model 32, GQA) saved by transformers, with the byte tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=BYTE_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=context, tie_word_embeddings=False, bos_token_id=256,
        eos_token_id=256,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    write_byte_tokenizer(folder)
    if chat_template:
        path = folder / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": CHAT_TEMPLATE}))
    return folder


def bert_folder(folder: Path) -> Path:
    """A random BERT encoder saved by transformers, with a tiny WordPiece vocab.txt."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "a", "b"]
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    BertModel(config).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return folder


# ---- GGUF ---------------------------------------------------------------------------------------------------

GGUF_LAYERS, GGUF_D, GGUF_FF, GGUF_HEADS, GGUF_KV_HEADS = 1, 32, 64, 4, 2


def gguf_file(
    path: Path, seed: int = 0, block_count: int | None = None, drop: str | None = None, attn: str = "Q8_0",
    mlp: str = "Q4_0",
) -> Path:
    """A tiny random llama GGUF: byte-level BPE vocabulary with merges and chat template in the metadata (the
    vocabulary of tests/test_gguf.py), embeddings F16, attention Q8_0, MLP Q4_0 (or the `attn` / `mlp` types
    named), norms F32. `block_count` overrides the metadata's layer count, `drop` leaves one tensor out."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize
    from weights.test_gguf import BOS, CHAT_TEMPLATE, EOS, MERGES, TOKEN_TYPES, TOKENS

    T = GGMLQuantizationType
    rng = np.random.default_rng(seed)
    d, ff, head_dim = GGUF_D, GGUF_FF, GGUF_D // GGUF_HEADS

    def w(*shape: int) -> np.ndarray:
        return rng.normal(0, 0.5, shape).astype(np.float32)

    tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]] = {"token_embd.weight": (w(len(TOKENS), d), T.F16)}
    for i in range(GGUF_LAYERS):
        tensors |= {
            f"blk.{i}.attn_norm.weight": (1 + 0.1 * w(d), T.F32),
            f"blk.{i}.attn_q.weight": (w(d, d), T[attn]),
            f"blk.{i}.attn_k.weight": (w(GGUF_KV_HEADS * head_dim, d), T[attn]),
            f"blk.{i}.attn_v.weight": (w(GGUF_KV_HEADS * head_dim, d), T[attn]),
            f"blk.{i}.attn_output.weight": (w(d, d), T[attn]),
            f"blk.{i}.ffn_norm.weight": (1 + 0.1 * w(d), T.F32),
            f"blk.{i}.ffn_gate.weight": (w(ff, d), T[mlp]),
            f"blk.{i}.ffn_up.weight": (w(ff, d), T[mlp]),
            f"blk.{i}.ffn_down.weight": (w(d, ff), T[mlp]),
        }
    tensors["output_norm.weight"] = (1 + 0.1 * w(d), T.F32)
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(GGUF_LAYERS if block_count is None else block_count)
    writer.add_context_length(64)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(GGUF_HEADS)
    writer.add_head_count_kv(GGUF_KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(TOKENS)
    writer.add_token_types(TOKEN_TYPES)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_chat_template(CHAT_TEMPLATE)
    tensors.pop(drop or "", None)
    for name, (array, qtype) in tensors.items():
        if qtype == T.F32:
            writer.add_tensor(name, array)
        elif qtype == T.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
