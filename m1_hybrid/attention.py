"""Grouped-query attention layer of M1 (fused ``in_proj`` [q, k, v], ``out_proj``, RoPE).

Two paths, one maths: padded/cached batches through SDPA with a causal + padding mask, packed
documents through :func:`m1_hybrid.varlen_attention.varlen_attention` (varlen flash-attention on
CUDA, else SDPA with a block-diagonal causal mask: no token attends across a document boundary).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_m1 import M1HybridConfig
from .rotary import apply_rotary
from .varlen_attention import varlen_attention


class M1Attention(nn.Module):
    """Attention mixer; keys ``in_proj.weight (q_dim + 2 kv_dim, d)`` and ``out_proj.weight``."""

    def __init__(self, config: M1HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_dim, self.kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = config.attention_bias
        self.in_proj = nn.Linear(config.hidden_size, self.q_dim + 2 * self.kv_dim, bias=bias)
        self.out_proj = nn.Linear(self.q_dim, config.hidden_size, bias=False)

    def forward(self, hidden, cos, sin, layout=None, key_mask=None, kv_cache=None):
        """``hidden (b, L, d)``; ``cos/sin (b, L, head_dim)``; ``layout``: packed documents;
        ``key_mask (b, S)``: False at padded keys (S = past + L); ``kv_cache``: ``AttentionLayerState``."""
        b, L, _ = hidden.shape
        q, k, v = self.in_proj(hidden).split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        q = apply_rotary(q.view(b, L, self.num_heads, self.head_dim).transpose(1, 2), cos, sin)
        k = apply_rotary(k.view(b, L, self.num_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if layout is not None:
            out = self._packed(q, k, v, layout)
        else:
            if kv_cache is not None:
                k, v = kv_cache.append(k, v)
            out = self._padded(q, k, v, key_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, L, self.q_dim))

    def _padded(self, q, k, v, key_mask):
        L, S = q.shape[2], k.shape[2]
        # Query i sits at absolute index S - L + i and may see keys up to there.
        causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L)
        mask = causal[None, None]
        if key_mask is not None:
            mask = mask & key_mask[:, None, None, :].bool()
            # A query at a padded position sees nothing: let it see itself so softmax stays finite.
            diag = torch.zeros(L, S, dtype=torch.bool, device=q.device)
            diag[torch.arange(L), torch.arange(S - L, S)] = True
            mask = mask | (~mask.any(-1, keepdim=True) & diag)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.num_heads != self.num_kv_heads)

    def _packed(self, q, k, v, layout):
        b, h, L, d = q.shape
        tok = lambda t: t.transpose(1, 2).reshape(b * L, t.shape[1], d)  # noqa: E731
        out = varlen_attention(tok(q), tok(k), tok(v), layout.cu_seqlens, layout.max_seqlen, rows=b)
        return out.view(b, L, h, d).transpose(1, 2)


class AttentionLayerState:
    """Growing key/value cache ``(b, kv_heads, S, head_dim)`` of one attention layer."""

    def __init__(self):
        self.keys = self.values = None

    def append(self, k, v):
        if self.keys is None:
            self.keys, self.values = k, v
        else:
            self.keys = torch.cat([self.keys, k], dim=2)
            self.values = torch.cat([self.values, v], dim=2)
        return self.keys, self.values

    def select(self, index: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
