"""The one Transformer: decoder-only LM (GPT-2, Llama, Qwen, Phi-3), encoder (BERT) and encoder-decoder (T5).

Which stacks exist, how positions enter, where norms sit and which heads exist all come from ModelConfig.
Every head is a module reached through `forward`, so DDP, hooks and module swaps see all of them.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model.cache import CacheStep, KVCache
from lmforge.model.init import STD, init_weights
from lmforge.model.layers import ACTIVATIONS, Block, Norm, rope_tables

Head = Literal["lm", "mlm", "classify", "pool", "hidden"]


def relative_buckets(rel: Tensor, bidirectional: bool, n_buckets: int, max_distance: int) -> Tensor:
    """T5 relative positions (key - query) -> bucket ids: exact near, log-spaced far, capped."""
    bucket = torch.zeros_like(rel)
    if bidirectional:
        n_buckets //= 2
        bucket = (rel > 0).long() * n_buckets
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)  # the decoder only looks back
    exact = n_buckets // 2
    far = exact + (
        torch.log(dist.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (n_buckets - exact)
    ).long()
    far = far.clamp(max=n_buckets - 1)
    return bucket + torch.where(dist < exact, dist, far)


def default_positions(tokens: Tensor, attention_mask: Tensor | None) -> Tensor:
    """(B, T): 0, 1, 2, ... per row, counting only real tokens, so a left-padded row starts at 0 like alone."""
    if attention_mask is None:
        return torch.arange(tokens.shape[1], device=tokens.device)[None].expand(tokens.shape)
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def padded_keep(attention_mask: Tensor | None, causal: bool) -> Tensor | None:
    """(B, 1, T, T) bool mask over a batch's own tokens (no cache), or None when nothing is padded."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    valid = attention_mask.bool()
    T = valid.shape[1]
    keep = valid[:, None, :].expand(-1, T, -1)  # (B, T, T)
    if causal:
        idx = torch.arange(T, device=valid.device)
        # a pad query would see no key at all; letting it see itself keeps softmax finite (its output is unused)
        keep = (keep & (idx[None, :] <= idx[:, None])) | (idx[None, :] == idx[:, None])
    return keep[:, None]


def _embedding(n: int, dim: int) -> nn.Embedding:
    """An Embedding left uninitialised (init_weights or a checkpoint fills it): nn.Embedding's own normal_ init
    on the meta device imports torch._dynamo, 3 s of a model load."""
    return nn.Embedding(n, dim, _weight=torch.empty(n, dim))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        has_enc = cfg.family in ("encoder", "encoder-decoder")
        has_dec = cfg.family in ("decoder", "encoder-decoder")
        self.tok_emb = _embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = _embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.type_emb = _embedding(cfg.n_token_types, cfg.d_model) if cfg.n_token_types else None
        self.emb_norm = Norm(cfg) if cfg.post_norm else None
        relative = cfg.pos == "relative"

        self.encoder = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)) if has_enc else None
        self.enc_norm = Norm(cfg) if has_enc and not cfg.post_norm else None
        self.enc_rel = _embedding(cfg.rel_buckets, cfg.n_head) if has_enc and relative else None

        n_dec = cfg.n_decoder_layer if cfg.family == "encoder-decoder" else cfg.n_layer
        cross = cfg.family == "encoder-decoder"
        self.decoder = nn.ModuleList(Block(cfg, cross=cross) for _ in range(n_dec)) if has_dec else None
        self.dec_norm = Norm(cfg) if has_dec and not cfg.post_norm else None
        self.dec_rel = _embedding(cfg.rel_buckets, cfg.n_head) if has_dec and relative else None

        # heads: a tied head is still its own module, sharing the embedding's Parameter
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False) if has_dec else None
        if cfg.mlm_head:  # BERT: dense -> act -> norm -> tied decoder + bias
            self.mlm_dense, self.mlm_norm = nn.Linear(cfg.d_model, cfg.d_model), Norm(cfg)
            self.mlm_head = nn.Linear(cfg.d_model, cfg.vocab_size)
        if cfg.n_labels:
            self.add_label_head(cfg.n_labels)
        self.tie_weights()
        self.grad_checkpointing = False  # training: recompute each block's activations in backward (less memory)
        # the dtype activations take when it differs from the embedding table's (which the KV cache follows): a
        # quantized model keeps both in bf16 and computes in fp32 (weights/load.py build_quantized)
        self.act_dtype: torch.dtype | None = None
        if self.tok_emb.weight.device.type != "meta":
            init_weights(self)
        self.init_buffers()

    def add_label_head(self, n_labels: int) -> None:
        """Classification (or, with 1 label, a scalar reward/value) head; also how fine-tuning adds a fresh one
        (GPT-2 init) to a pretrained model."""
        self.cfg.n_labels = n_labels
        d = self.cfg.d_model
        device = self.tok_emb.weight.device
        if self.encoder is not None:  # BERT: tanh pooler over [CLS] -> linear
            self.pooler = nn.Linear(d, d, device=device)
            self.classifier = nn.Linear(d, n_labels, device=device)
            heads = [self.pooler, self.classifier]
        else:  # decoders (HF *ForSequenceClassification): read at a chosen token
            self.score = nn.Linear(d, n_labels, bias=False, device=device)
            heads = [self.score]
        if device.type != "meta":
            with torch.no_grad():
                for head in heads:
                    nn.init.normal_(head.weight, 0.0, STD)
                    if head.bias is not None:
                        nn.init.zeros_(head.bias)

    def tie_weights(self) -> None:
        """A quantized head (model/quantize.py) holds its own copy of the embedding: nothing to tie."""
        if self.lm_head is not None and self.cfg.tie_embeddings and hasattr(self.lm_head, "weight"):
            self.lm_head.weight = self.tok_emb.weight
        if self.cfg.mlm_head:
            self.mlm_head.weight = self.tok_emb.weight

    def tied_names(self) -> list[str]:
        """State-dict keys that are another key's Parameter (left out of checkpoints)."""
        names = ["lm_head.weight"] if self.lm_head is not None and self.cfg.tie_embeddings else []
        return names + (["mlm_head.weight"] if self.cfg.mlm_head else [])

    def init_buffers(self) -> None:
        """Derived tables (not weights); recomputed after loading weights into a meta-device model."""
        cfg = self.cfg
        if cfg.pos == "rope":
            device = self.tok_emb.weight.device
            if device.type == "meta":  # shapes only: computing them on meta goes through torch._refs, which imports
                # torch._dynamo (~1 s and ~60 MB of a CLI run's start)
                cos, sin = (torch.empty(cfg.max_seq_len, cfg.head_dim, device=device) for _ in range(2))
            else:
                cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base, device)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    # ---- embeddings and positions --------------------------------------------------------------

    def embed(self, tokens: Tensor, positions: Tensor, token_types: Tensor | None = None) -> Tensor:
        x = self.tok_emb(tokens)  # (B, T, d)
        if self.act_dtype is not None:
            x = x.to(self.act_dtype)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        if self.type_emb is not None:
            x = x + self.type_emb(token_types if token_types is not None else torch.zeros_like(tokens))
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        return F.dropout(x, self.cfg.dropout, training=True) if self.training and self.cfg.dropout else x

    def check_positions(self, positions: Tensor) -> None:
        """Outside the engine (which checks lengths on the host), refuse positions past the context."""
        if positions.numel() and int(positions.max()) >= self.cfg.max_seq_len:
            raise LmforgeError(f"sequence longer than the model's context ({self.cfg.max_seq_len} tokens)")

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        if self.cfg.pos != "rope":
            return None
        return self.rope_cos[positions][:, :, None].to(dtype), self.rope_sin[positions][:, :, None].to(dtype)

    def relative_bias(self, table: nn.Embedding, q_pos: Tensor, k_pos: Tensor, bidirectional: bool) -> Tensor:
        """(B|1, H, T, S) additive attention bias from T5's bucketed relative positions; q_pos (B|1, T),
        k_pos (B|1, S)."""
        rel = k_pos[:, None, :] - q_pos[:, :, None]  # (B, T, S)
        buckets = relative_buckets(rel, bidirectional, self.cfg.rel_buckets, self.cfg.rel_max_distance)
        return table(buckets).permute(0, 3, 1, 2)

    @staticmethod
    def with_bias(keep: Tensor | None, bias: Tensor) -> Tensor:
        return bias if keep is None else bias.masked_fill(~keep, torch.finfo(bias.dtype).min)

    # ---- stacks --------------------------------------------------------------------------------

    def run_block(self, block: Block, x: Tensor, *args: object) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, x, *args, use_reentrant=False)
        return block(x, *args)

    def encoder_forward(
        self, tokens: Tensor, attention_mask: Tensor | None = None, token_types: Tensor | None = None
    ) -> Tensor:
        """Bidirectional encoder: (B, T) ids -> (B, T, d) hidden states; pads are never attended to."""
        assert self.encoder is not None, "this model has no encoder"
        positions = default_positions(tokens, None)
        if self.pos_emb is not None:
            self.check_positions(positions[:, -1:])
        x = self.embed(tokens, positions, token_types)
        keep = None
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        mask: Tensor | None = keep
        if self.enc_rel is not None:
            pos = positions[:1]
            mask = self.with_bias(keep, self.relative_bias(self.enc_rel, pos, pos, bidirectional=True).to(x.dtype))
        for block in self.encoder:
            x = self.run_block(block, x, mask)
        return self.enc_norm(x) if self.enc_norm is not None else x

    def decoder_mask(
        self, positions: Tensor, cache: CacheStep | None, attention_mask: Tensor | None, dtype: torch.dtype,
        keep: Tensor | None = None,
    ) -> tuple[Tensor | None, bool]:
        """Self-attention mask of the decoder -> (bool keep or float bias, is_causal).

        With a cache, key column j holds position j of the row, so a query at position p sees columns <= p.
        Without one, the keys are this call's own tokens: causal by index, pads hidden, or exactly `keep`
        (B, 1, T, T) when the caller gives it (a prefix tree of sequences packed into one row: each token sees
        its ancestors, eval/harness.py).
        """
        B, T = positions.shape
        if keep is not None:
            if cache is not None or attention_mask is not None or self.dec_rel is not None:
                raise LmforgeError("an explicit attention mask goes without a cache, padding or relative positions")
            return keep, False
        if cache is not None:
            keep, is_causal = None, False
            if T > 1 and cache.kv_len == T and (cache.start == 0 or bool(
                    (positions == torch.arange(T, device=positions.device)).all())):
                is_causal = True  # a prefill from column 0: plain causal attention (SDPA skips the masked half)
            elif B > 1 or T > 1:  # one row, one token: every column up to kv_len is its past
                keep = (torch.arange(cache.kv_len, device=positions.device) <= positions[:, :, None])[:, None]
            k_pos = torch.arange(cache.kv_len, device=positions.device)[None]
        else:
            keep = padded_keep(attention_mask, causal=True)
            k_pos, is_causal = positions, keep is None and T > 1
        if self.dec_rel is None:
            return keep, is_causal
        if keep is None and is_causal:
            idx = torch.arange(T, device=positions.device)
            keep = (idx[None, :] <= idx[:, None])[None, None]
        bias = self.relative_bias(self.dec_rel, positions, k_pos, bidirectional=False).to(dtype)
        return self.with_bias(keep, bias), False

    def cross_memory(
        self, memory: Tensor | None, memory_mask: Tensor | None, cache: CacheStep | None
    ) -> tuple[list[tuple[Tensor, Tensor]], Tensor | None]:
        """Each decoder layer's cross-attention keys/values and the encoder padding mask: computed from `memory`
        (and stored in the cache when there is one), else read from the cache."""
        assert self.decoder is not None
        if memory is None:
            assert cache is not None, "an encoder-decoder needs the encoder output or a cache that holds it"
            return [cache.memory(i) for i in range(len(self.decoder))], cache.memory_mask()
        memory_kv = [block.cross_attn.memory_kv(memory) for block in self.decoder]
        if cache is not None:
            valid = memory_mask.bool() if memory_mask is not None else torch.ones(memory.shape[:2], dtype=torch.bool)
            cache.cache.set_memory(cache.first, memory_kv, valid.to(memory.device))
            cache.memory_len = memory.shape[1]
        keep = None
        if memory_mask is not None and not bool(memory_mask.all()):
            keep = memory_mask.bool()[:, None, None, :]
        return memory_kv, keep

    def decoder_forward(
        self,
        tokens: Tensor,  # (B, T)
        positions: Tensor | None = None,  # (B, T); default 0.. per row (counting real tokens only)
        cache: CacheStep | None = None,
        attention_mask: Tensor | None = None,  # (B, T) 1 = real token; only without a cache
        memory: Tensor | None = None,  # (B, S_enc, d) encoder output (encoder-decoder)
        memory_mask: Tensor | None = None,  # (B, S_enc)
        keep: Tensor | None = None,  # (B, 1, T, T) bool: which of this call's tokens each token sees (no cache)
    ) -> Tensor:
        """Causal decoder over new tokens, writing their keys/values into the cache when given -> (B, T, d)."""
        assert self.decoder is not None, "this model has no decoder"
        if cache is not None and attention_mask is not None:
            raise LmforgeError("with a KV cache, rows carry their own positions: no attention_mask (no padding)")
        if positions is None:
            positions = cache.positions if cache is not None else default_positions(tokens, attention_mask)
        if cache is None:  # a packed tree's deepest node may sit anywhere
            self.check_positions(positions if keep is not None else positions[:, -1:])
        x = self.embed(tokens, positions)
        rope = self.rope(positions, x.dtype)
        mask, is_causal = self.decoder_mask(positions, cache, attention_mask, x.dtype, keep)
        memory_kv, memory_keep = None, None
        if self.cfg.family == "encoder-decoder":
            memory_kv, memory_keep = self.cross_memory(memory, memory_mask, cache)
        for i, block in enumerate(self.decoder):
            x = self.run_block(block, x, mask, rope, cache, i, memory_kv[i] if memory_kv else None, memory_keep,
                               is_causal)
        return self.dec_norm(x) if self.dec_norm is not None else x

    # ---- heads ---------------------------------------------------------------------------------

    def lm_logits(self, hidden: Tensor) -> Tensor:
        assert self.lm_head is not None, "this model has no LM head"
        if self.cfg.logit_scale != 1.0:
            hidden = hidden * self.cfg.logit_scale
        return self.lm_head(hidden)  # (..., vocab)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        if not self.cfg.mlm_head:
            raise LmforgeError(f"{self.cfg.name} has no masked-LM head")
        return self.mlm_head(self.mlm_norm(ACTIVATIONS[self.cfg.act](self.mlm_dense(hidden))))

    def classify(self, hidden: Tensor) -> Tensor:
        """Encoders: tanh pooler over [CLS] -> (B, n_labels). Decoders: the score head on each given state."""
        if not self.cfg.n_labels:
            raise LmforgeError(f"{self.cfg.name} has no classification head (n_labels = 0)")
        if self.encoder is not None:
            return self.classifier(torch.tanh(self.pooler(hidden[:, 0])))
        return self.score(hidden)

    def pool(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Sentence embedding: mean over real tokens or the [CLS] state, L2-normalised if configured."""
        if self.cfg.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            if attention_mask is None:
                attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
            m = attention_mask.to(hidden.dtype)[..., None]
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1) if self.cfg.normalize_embeddings else pooled

    def forward(
        self,
        tokens: Tensor | None,  # (B, T); an encoder-decoder's encoder input (None once its cache holds it)
        positions: Tensor | None = None,  # (B, T) decoder positions
        cache: CacheStep | None = None,
        *,
        attention_mask: Tensor | None = None,  # (B, T) 1 = real token (the encoder's, for an encoder-decoder)
        token_types: Tensor | None = None,
        decoder_tokens: Tensor | None = None,  # encoder-decoder: (B, T_dec)
        head: Head | None = None,  # default: lm for decoders, mlm (if present) or hidden for encoders
        read_at: int | Tensor | None = None,  # decoders: read the head only at this index of T (int or (B,))
        keep: Tensor | None = None,  # decoders without a cache: (B, 1, T, T) bool, the keys each token sees
    ) -> Tensor:
        """tokens -> the chosen head's output: lm/mlm logits (B, T, V), classify (B, n_labels) for encoders
        and (B, T, n_labels) for decoders' score head, pool (B, d), hidden (B, T, d). With `read_at` a
        decoder's head reads one token per row: (B, V), (B, n_labels), (B, d)."""
        cfg = self.cfg
        if cfg.family == "encoder" or (head == "pool" and self.encoder is not None):  # T5 embeds with its encoder
            assert tokens is not None
            hidden = self.encoder_forward(tokens, attention_mask, token_types)
            head = head or ("mlm" if cfg.mlm_head else "hidden")
            if head == "mlm":
                return self.mlm_logits(hidden)
            if head == "classify":
                return self.classify(hidden)
            if head == "pool":
                return self.pool(hidden, attention_mask)
            if head == "hidden":
                return hidden
            raise LmforgeError(f"an encoder has no {head!r} head")
        if cfg.family == "decoder":
            assert tokens is not None
            hidden = self.decoder_forward(tokens, positions, cache, attention_mask, keep=keep)
        else:
            if decoder_tokens is None:
                raise LmforgeError("an encoder-decoder needs decoder_tokens")
            memory = self.encoder_forward(tokens, attention_mask) if tokens is not None else None
            hidden = self.decoder_forward(decoder_tokens, positions, cache, memory=memory, memory_mask=attention_mask)
        if read_at is not None:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            hidden = hidden[:, read_at] if isinstance(read_at, int) else hidden[rows, read_at]
        head = head or "lm"
        if head == "lm":
            return self.lm_logits(hidden)
        if head == "classify":
            return self.classify(hidden)
        if head == "hidden":
            return hidden
        raise LmforgeError(f"a {cfg.family} model has no {head!r} head")

    def new_cache(
        self, slots: int, max_len: int, memory_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """A KV cache on the model's device, in its embedding dtype unless `dtype` says otherwise (a quantized
        model's bf16 halves the memory; its fp32 activation dtype saves converting keys/values every step); an
        encoder-decoder's holds its encoder keys/values too."""
        p = self.tok_emb.weight
        n_layer = len(self.decoder) if self.decoder is not None else 0
        if memory_len is None:
            memory_len = self.cfg.max_seq_len if self.cfg.family == "encoder-decoder" else 0
        return KVCache(n_layer, slots, max_len, self.cfg.n_kv_head, self.cfg.head_dim, p.device, dtype or p.dtype,
                       memory_len)
