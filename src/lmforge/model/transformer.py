"""The one Transformer: decoder-only LM (GPT-2, Llama), encoder (BERT) and encoder-decoder (T5).

Which stacks exist, how positions enter and where norms sit all come from ModelConfig.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model.cache import KVCache, left_pad_counts
from lmforge.model.layers import Block, Norm, dense, linear, rope_tables


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


def self_attention_mask(T: int, start: int, valid: Tensor | None, force: bool = False) -> tuple[Tensor | None, bool]:
    """Causal mask for T queries at slots start..start+T-1 over keys 0..start+T-1.

    Returns (bool mask (B|1, 1, T, S) or None, is_causal). Without padding the common cases need no
    mask at all: a one-token decode step sees everything, a fresh prompt is SDPA's own causal case.
    """
    if valid is None and not force:
        if T == 1:
            return None, False
        if start == 0:
            return None, True
    S = start + T
    q_pos = torch.arange(start, S, device=valid.device if valid is not None else None)[:, None]
    k_pos = torch.arange(S, device=q_pos.device)[None]
    keep = k_pos <= q_pos  # (T, S)
    if valid is None:
        return keep[None, None], False
    # a pad query would see no key at all; letting it see itself keeps softmax finite (its output is unused)
    keep = (keep[None] & valid[:, None, :]) | (k_pos == q_pos)[None]
    return keep[:, None], False


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        has_enc = cfg.family in ("encoder", "encoder-decoder")
        has_dec = cfg.family in ("decoder", "encoder-decoder")
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.type_emb = nn.Embedding(cfg.n_token_types, cfg.d_model) if cfg.n_token_types else None
        self.emb_norm = Norm(cfg) if cfg.post_norm else None
        relative = cfg.pos == "relative"

        self.encoder = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)) if has_enc else None
        self.enc_norm = Norm(cfg) if has_enc and not cfg.post_norm else None
        self.enc_rel = nn.Embedding(cfg.rel_buckets, cfg.n_head) if has_enc and relative else None

        n_dec = cfg.n_decoder_layer if cfg.family == "encoder-decoder" else cfg.n_layer
        cross = cfg.family == "encoder-decoder"
        self.decoder = nn.ModuleList(Block(cfg, cross=cross) for _ in range(n_dec)) if has_dec else None
        self.dec_norm = Norm(cfg) if has_dec and not cfg.post_norm else None
        self.dec_rel = nn.Embedding(cfg.rel_buckets, cfg.n_head) if has_dec and relative else None
        self.lm_head = (
            nn.Linear(cfg.d_model, cfg.vocab_size, bias=False) if has_dec and not cfg.tie_embeddings else None
        )

        if cfg.mlm_head:  # BERT: dense -> act -> norm -> tied decoder + bias
            self.mlm_dense, self.mlm_norm = nn.Linear(cfg.d_model, cfg.d_model), Norm(cfg)
            self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        if cfg.n_labels:  # BERT: tanh pooler over [CLS] -> linear classifier
            self.pooler = nn.Linear(cfg.d_model, cfg.d_model)
            self.classifier = nn.Linear(cfg.d_model, cfg.n_labels)

        self.init_buffers()

    def init_buffers(self) -> None:
        """Derived tables (not weights); recomputed after loading weights into a meta-device model."""
        cfg = self.cfg
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    # ---- embeddings and position helpers -------------------------------------------------------

    def embed_tokens(self, tokens: Tensor, positions: Tensor, token_types: Tensor | None = None) -> Tensor:
        x = self.tok_emb(tokens)  # (B, T, d)
        if self.pos_emb is not None:
            if int(positions.max()) >= self.cfg.max_seq_len:
                raise LmforgeError(f"sequence longer than the model's context ({self.cfg.max_seq_len} tokens)")
            x = x + self.pos_emb(positions)
        if self.type_emb is not None:
            x = x + self.type_emb(token_types if token_types is not None else torch.zeros_like(tokens))
        return self.emb_norm(x) if self.emb_norm is not None else x

    def relative_bias(self, table: nn.Embedding, q_pos: Tensor, k_pos: Tensor, bidirectional: bool) -> Tensor:
        """(1, H, T, S) additive attention bias from T5's bucketed relative positions."""
        buckets = relative_buckets(
            k_pos[None, :] - q_pos[:, None], bidirectional, self.cfg.rel_buckets, self.cfg.rel_max_distance
        )
        return table(buckets).permute(2, 0, 1)[None]

    @staticmethod
    def with_bias(keep: Tensor | None, bias: Tensor) -> Tensor:
        return bias if keep is None else bias.masked_fill(~keep, torch.finfo(bias.dtype).min)

    # ---- stacks --------------------------------------------------------------------------------

    def encode(
        self, tokens: Tensor, attention_mask: Tensor | None = None, token_types: Tensor | None = None
    ) -> Tensor:
        """Bidirectional encoder: (B, T) ids -> (B, T, d) hidden states; pads are never attended to."""
        assert self.encoder is not None, "this model has no encoder"
        B, T = tokens.shape
        positions = torch.arange(T, device=tokens.device)[None].expand(B, T)
        x = self.embed_tokens(tokens, positions, token_types)
        keep = None
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        mask: Tensor | None = keep
        if self.enc_rel is not None:
            pos = torch.arange(T, device=tokens.device)
            mask = self.with_bias(keep, self.relative_bias(self.enc_rel, pos, pos, bidirectional=True).to(x.dtype))
        for block in self.encoder:
            x = block(x, mask)
        return self.enc_norm(x) if self.enc_norm is not None else x

    def decode(
        self,
        tokens: Tensor,  # (B, T)
        cache: KVCache | None = None,
        attention_mask: Tensor | None = None,  # (B, T) 1 = real token; rows left-padded
        memory: Tensor | None = None,  # (B, S_enc, d) encoder output (encoder-decoder only)
        memory_mask: Tensor | None = None,  # (B, S_enc)
    ) -> Tensor:
        """Causal decoder over new tokens, appending to the cache when given: -> (B, T, d) hidden states."""
        assert self.decoder is not None, "this model has no decoder"
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if cache is not None:
            if start + T > cache.max_len:
                raise LmforgeError(f"context overflow: {start + T} tokens > cache of {cache.max_len}")
            if attention_mask is not None:
                cache.set_padding(attention_mask)
            valid = cache.valid[:, : start + T] if cache.padded else None
            pad = cache.pad if cache.padded else None
        else:
            valid = attention_mask.bool() if attention_mask is not None and not bool(attention_mask.all()) else None
            pad = left_pad_counts(valid) if valid is not None else None
        positions = torch.arange(start, start + T, device=tokens.device)[None].expand(B, T)
        if pad is not None:
            positions = (positions - pad[:, None]).clamp(min=0)

        x = self.embed_tokens(tokens, positions)
        rope = None
        if self.cfg.pos == "rope":
            if int(positions[:, -1].max()) >= self.cfg.max_seq_len:
                raise LmforgeError(f"sequence longer than the model's context ({self.cfg.max_seq_len} tokens)")
            rope = (self.rope_cos[positions][:, :, None].to(x.dtype), self.rope_sin[positions][:, :, None].to(x.dtype))

        relative = self.dec_rel is not None
        keep, is_causal = self_attention_mask(T, start, valid, force=relative)
        mask: Tensor | None = keep
        if relative:
            q_pos = torch.arange(start, start + T, device=tokens.device)
            k_pos = torch.arange(start + T, device=tokens.device)
            mask = self.with_bias(keep, self.relative_bias(self.dec_rel, q_pos, k_pos, bidirectional=False).to(x.dtype))

        memory_kv: list[tuple[Tensor, Tensor]] | None = None
        mem_keep: Tensor | None = None
        if self.cfg.family == "encoder-decoder":
            if cache is not None and cache.memory is not None:
                memory_kv, mem_keep = cache.memory, cache.memory_mask
            else:
                assert memory is not None, "an encoder-decoder needs the encoder output"
                memory_kv = [blk.cross_attn.split_kv(blk.cross_attn.kv(memory)) for blk in self.decoder]
                if memory_mask is not None and not bool(memory_mask.all()):
                    mem_keep = memory_mask.bool()[:, None, None, :]
                if cache is not None:
                    cache.memory, cache.memory_mask = memory_kv, mem_keep

        for i, block in enumerate(self.decoder):
            x = block(
                x, mask, rope, cache.layer(i) if cache is not None else None, start,
                memory_kv[i] if memory_kv is not None else None, mem_keep, is_causal,
            )
        if cache is not None:
            cache.length += T
        return self.dec_norm(x) if self.dec_norm is not None else x

    # ---- heads ---------------------------------------------------------------------------------

    def lm_logits(self, hidden: Tensor) -> Tensor:
        if self.cfg.logit_scale != 1.0:
            hidden = hidden * self.cfg.logit_scale
        weight = self.lm_head.weight if self.lm_head is not None else self.tok_emb.weight
        return linear(hidden, weight)  # (B, T, vocab)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        h = self.mlm_norm(dense(self.mlm_dense, hidden, self.cfg.act))
        return linear(h, self.tok_emb.weight, self.mlm_bias)

    def classify(self, hidden: Tensor) -> Tensor:
        return self.classifier(torch.tanh(self.pooler(hidden[:, 0])))  # (B, n_labels)

    def pool(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Sentence embedding: mean over real tokens or the [CLS] state, L2-normalised if configured."""
        if self.cfg.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = attention_mask.to(hidden.dtype)[..., None]
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1) if self.cfg.normalize_embeddings else pooled

    def forward(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        decoder_tokens: Tensor | None = None,
    ) -> Tensor:
        """Decoder / encoder-decoder: LM logits. Encoder: MLM logits if it has that head, else hidden."""
        if self.cfg.family == "decoder":
            return self.lm_logits(self.decode(tokens, cache, attention_mask))
        if self.cfg.family == "encoder":
            hidden = self.encode(tokens, attention_mask)
            return self.mlm_logits(hidden) if self.cfg.mlm_head else hidden
        assert decoder_tokens is not None, "an encoder-decoder needs decoder_tokens"
        memory = self.encode(tokens, attention_mask)
        return self.lm_logits(self.decode(decoder_tokens, cache, memory=memory, memory_mask=attention_mask))

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.tok_emb.weight
        n_layer = len(self.decoder) if self.decoder is not None else 0
        return KVCache(self.cfg, batch, max_len, n_layer, p.device, p.dtype)
