"""The decode attention path (one new token per row, many rows) equals SDPA, masks and GQA included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.layers import decode_attention


@pytest.mark.parametrize("n_head, n_kv", [(9, 3), (4, 4), (8, 1)])
def test_decode_attention_equals_sdpa(n_head, n_kv):
    torch.manual_seed(0)
    B, S, hd = 17, 40, 16
    q, k, v = torch.randn(B, n_head, 1, hd), torch.randn(B, n_kv, S, hd), torch.randn(B, n_kv, S, hd)
    lengths = torch.randint(1, S + 1, (B,))
    keep = (torch.arange(S)[None] < lengths[:, None])[:, None, None]  # each row sees its own past only
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.3, enable_gqa=n_head != n_kv)
    torch.testing.assert_close(decode_attention(q, k, v, keep, 0.3), want, atol=1e-6, rtol=1e-5)
    short = decode_attention(q[:1], k[:1, :, : int(lengths[0])], v[:1, :, : int(lengths[0])], None, 0.3)
    torch.testing.assert_close(short, want[:1], atol=1e-6, rtol=1e-5)  # masked keys count for nothing
