"""Rotary position embedding (non-interleaved, full head dim), optionally with llama3 scaling."""

import math

import torch
from torch import nn


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, dtype=torch.float32) -> torch.Tensor:
    """Inverse frequencies ``theta^(-2i/d)``; with ``rope_type == "llama3"`` the Llama-3.1 rule:
    wavelengths above ``original_max / low_freq_factor`` are divided by ``factor``, those below
    ``original_max / high_freq_factor`` are kept, and the band between is interpolated smoothly.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"rope scaling type {kind!r} is not supported (use none or 'llama3')")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(is_mid, interpolated, out)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, computed in float32 like the Llama teacher (float64 for
    float64 models).

    The frequencies are computed on first use, not stored as a buffer: transformers builds models
    on the meta device and never loads non-persistent buffers, which would leave them garbage.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self._inv_freq = {}

    def inv_freq(self, device, dtype) -> torch.Tensor:
        key = (torch.device(device), dtype)
        if key not in self._inv_freq:
            self._inv_freq[key] = rope_inv_freq(self.head_dim, self.theta, self.scaling, dtype).to(device)
        return self._inv_freq[key]

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """``position_ids (b, L)`` -> ``cos, sin (b, L, head_dim)`` in ``dtype``."""
        ct = torch.promote_types(torch.float32, dtype)
        freqs = position_ids[..., None].to(ct) * self.inv_freq(position_ids.device, ct)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (b, heads, L, d)`` by position: ``x cos + rotate_half(x) sin`` (halves, not pairs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]
