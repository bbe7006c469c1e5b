"""ModelConfig: one dataclass that describes every family the one Transformer implements.

Family differences are fields here (positions, norm, MLP, biases, post-norm, ...), never copied classes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from lmforge.errors import LmforgeError

Family = Literal["decoder", "encoder", "encoder-decoder"]


@dataclass
class ModelConfig:
    name: str = "custom"
    family: Family = "decoder"
    hf_model_type: str = "llama"  # the HF `model_type` we read from and export to

    vocab_size: int = 32000
    d_model: int = 512
    n_layer: int = 8
    n_decoder_layer: int = 0  # encoder-decoder only: decoder depth (0 = same as n_layer)
    n_head: int = 8
    n_kv_head: int = 0  # 0 = same as n_head (no GQA)
    head_dim: int = 0  # 0 = d_model // n_head
    d_ff: int = 2048
    max_seq_len: int = 2048

    # positions: rope (Llama), learned absolute (GPT-2, BERT), relative buckets (T5)
    pos: Literal["rope", "learned", "relative"] = "rope"
    rope_base: float = 10000.0
    rel_buckets: int = 32
    rel_max_distance: int = 128
    n_token_types: int = 0  # BERT segment embeddings

    norm: Literal["rms", "layer"] = "rms"
    norm_eps: float = 1e-5
    post_norm: bool = False  # BERT: normalise after the residual add, and the embeddings too

    # feed-forward: gated (SwiGLU / gated-GELU) or plain two-layer; act names map in layers.ACTIVATIONS
    gated_mlp: bool = True
    act: str = "silu"

    qkv_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each q and k head before RoPE
    attn_out_bias: bool = False
    mlp_bias: bool = False
    attn_scale: float | None = None  # None = 1/sqrt(head_dim); T5 folds it into the weights (1.0)
    tie_embeddings: bool = True
    logit_scale: float = 1.0  # T5 scales the decoder output by d_model**-0.5 before a tied head

    # training only (inference never drops): after embeddings and each residual branch, and on attention weights
    dropout: float = 0.0
    attn_dropout: float = 0.0

    # heads besides the LM head
    # classification head when > 0: BERT's pooler + classifier; decoders a `score` Linear (1 = a reward/value head)
    n_labels: int = 0
    label_names: list[str] = field(default_factory=list)  # id -> label text (HF id2label), when known
    mlm_head: bool = False
    pooling: Literal["mean", "cls", "none"] = "none"
    normalize_embeddings: bool = False
    truncate_len: int = 0  # encoders: inputs are cut to this many tokens (sentence-transformers); 0 = max_seq_len

    # tokens
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.head_dim == 0:
            self.head_dim = self.d_model // self.n_head
        if self.family == "encoder-decoder" and self.n_decoder_layer == 0:
            self.n_decoder_layer = self.n_layer
        if self.n_head % self.n_kv_head:
            raise LmforgeError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise LmforgeError(f"unknown config preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name])


PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        name="smollm2-135m", vocab_size=49152, d_model=576, n_layer=30, n_head=9, n_kv_head=3,
        d_ff=1536, max_seq_len=8192, rope_base=100000.0, bos_token_id=1, eos_token_ids=[2],
        pad_token_id=2,
    ),
    "gpt2": ModelConfig(
        name="gpt2", hf_model_type="gpt2", vocab_size=50257, d_model=768, n_layer=12, n_head=12,
        d_ff=3072, max_seq_len=1024, pos="learned", norm="layer", gated_mlp=False, act="gelu_tanh",
        qkv_bias=True, attn_out_bias=True, mlp_bias=True, bos_token_id=50256, eos_token_ids=[50256],
    ),
    # shape only (for `lmforge inspect --memory --config llama2-7b`): Llama-2-7B
    "llama2-7b": ModelConfig(
        name="llama2-7b", vocab_size=32000, d_model=4096, n_layer=32, n_head=32, n_kv_head=32, d_ff=11008,
        max_seq_len=4096, norm_eps=1e-5, tie_embeddings=False, bos_token_id=1, eos_token_ids=[2],
    ),
    "tiny-llama": ModelConfig(
        name="tiny-llama", vocab_size=256, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=128,
        max_seq_len=128, tie_embeddings=False, bos_token_id=1, eos_token_ids=[2],
    ),
    "tiny-gpt2": ModelConfig(
        name="tiny-gpt2", hf_model_type="gpt2", vocab_size=256, d_model=64, n_layer=2, n_head=4,
        d_ff=256, max_seq_len=128, pos="learned", norm="layer", gated_mlp=False, act="gelu_tanh",
        qkv_bias=True, attn_out_bias=True, mlp_bias=True, bos_token_id=0, eos_token_ids=[0],
    ),
}

# Pre-training presets (`lmforge pretrain --preset`): vocab_size 0 = the prepared data's tokenizer decides, and
# its special tokens fill the bos/eos/pad ids. Shapes are laptop-sized; `small-gpt` is benchmarks/train.py's.
_GPT2 = dict(hf_model_type="gpt2", pos="learned", norm="layer", gated_mlp=False, act="gelu_tanh", qkv_bias=True,
             attn_out_bias=True, mlp_bias=True)
_BERT = dict(family="encoder", hf_model_type="bert", pos="learned", n_token_types=2, norm="layer", norm_eps=1e-12,
             post_norm=True, gated_mlp=False, act="gelu", qkv_bias=True, attn_out_bias=True, mlp_bias=True,
             mlm_head=True)
_T5 = dict(family="encoder-decoder", hf_model_type="t5", pos="relative", norm="rms", norm_eps=1e-6, gated_mlp=True,
           act="gelu_tanh", attn_scale=1.0, tie_embeddings=False)
PRESETS.update({
    "tiny-gpt": ModelConfig(name="tiny-gpt", vocab_size=0, d_model=128, n_layer=4, n_head=4, d_ff=512,
                            max_seq_len=256, **_GPT2),  # type: ignore[arg-type]
    "small-gpt": ModelConfig(name="small-gpt", vocab_size=0, d_model=384, n_layer=6, n_head=6, d_ff=1536,
                             max_seq_len=256, **_GPT2),  # type: ignore[arg-type]
    "small-llama": ModelConfig(name="small-llama", vocab_size=0, d_model=384, n_layer=6, n_head=6, n_kv_head=2,
                               d_ff=1024, max_seq_len=256),
    "tiny-bert": ModelConfig(name="tiny-bert", vocab_size=0, d_model=128, n_layer=4, n_head=4, d_ff=512,
                             max_seq_len=256, **_BERT),  # type: ignore[arg-type]
    "tiny-t5": ModelConfig(name="tiny-t5", vocab_size=0, d_model=128, n_layer=4, n_head=4, d_ff=512,
                           max_seq_len=256, **_T5),  # type: ignore[arg-type]
})
