"""Causal attention within the documents of packed rows, for the student and for an HF teacher.

Packed rows hold several documents; a token may only see earlier tokens of its own document. The
fast way is a varlen flash-attention kernel over the flattened tokens with ``cu_seqlens``: it skips
every cross-document tile, where a masked SDPA call computes (and, in backward, differentiates) the
full square and throws most of it away. Backends, first available wins:

1. ``flash_attn.flash_attn_varlen_func`` (the flash-attn package), CUDA, fp16/bf16;
2. PyTorch's own varlen flash kernel (``aten._flash_attention_forward``, differentiable, present in
   every CUDA build since 2.2; GQA without repeating k/v), CUDA, fp16/bf16, sm80+;
3. SDPA with a per-row block-diagonal causal mask (documents never cross a row): CPU, fp32, and the
   reference the tests compare the kernels with.

:func:`register_hf_attention` offers the same to transformers models as
``attn_implementation="m1_varlen"``: packed rows (``cu_seq_lens_q`` passed, as
:func:`axolotl_m1.teacher.teacher_logits_at` does) go through :func:`varlen_attention`, everything
else is transformers' SDPA path with its usual masks.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

HF_NAME = "m1_varlen"


@functools.cache
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # not installed, or a CPU-only build without its CUDA module
        return None
    return flash_attn_varlen_func


def _torch_flash_ok(q: torch.Tensor) -> bool:
    """PyTorch's flash kernel runs on Ampere and newer, in fp16/bf16, head_dim a multiple of 8 up to 256."""
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
        and torch.cuda.get_device_capability(q.device)[0] >= 8
    )


def varlen_backend(q: torch.Tensor) -> str:
    """Which backend :func:`varlen_attention` uses for queries like ``q``: ``flash_attn``, ``torch_flash``
    or ``sdpa_mask``.

    Example::

        >>> import torch
        >>> varlen_backend(torch.zeros(4, 2, 8))
        'sdpa_mask'
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _flash_attn_varlen() is not None:
        return "flash_attn"
    return "torch_flash" if _torch_flash_ok(q) else "sdpa_mask"


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, rows: int, scale: float | None = None, backend=None):
    """Causal attention inside each document of packed rows.

    ``q (T, H, D)``, ``k``/``v (T, Hkv, D)`` token-major over the ``T = rows * L`` flattened tokens,
    ``H`` a multiple of ``Hkv`` (GQA: never repeated in memory); ``cu_seqlens (docs + 1,)`` int32 over
    the flattened tokens, with a document start at every row start; ``max_seqlen`` the longest
    document. Returns ``(T, H, D)``. ``backend`` forces one of :func:`varlen_backend`'s names.

    Example (two documents of 2 and 3 tokens in one row)::

        >>> import torch
        >>> q, k, v = torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
        >>> out = varlen_attention(q, k, v, torch.tensor([0, 2, 5], dtype=torch.int32), 3, rows=1)
        >>> first = varlen_attention(q[:2], k[:2], v[:2], torch.tensor([0, 2], dtype=torch.int32), 2, rows=1)
        >>> out.shape, torch.allclose(out[:2], first, atol=1e-6)
        (torch.Size([5, 4, 8]), True)
    """
    if q.is_cuda and q.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        # Under autocast SDPA would run in the autocast dtype; so do the flash kernels (fp32 q/k/v come
        # from RoPE's fp32 tables even when the projections ran in bf16).
        dtype = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    backend = backend or varlen_backend(q)
    if backend == "flash_attn":
        cu = cu_seqlens.to(torch.int32)
        return _flash_attn_varlen()(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True, softmax_scale=scale)
    if backend == "torch_flash":
        cu = cu_seqlens.to(torch.int32)
        # Positional arguments: their order is the same from torch 2.2 to 2.13 (keywords were added later).
        return torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_seqlen, max_seqlen, 0.0, True, False, scale=scale
        )[0]
    if backend != "sdpa_mask":
        raise ValueError(f"unknown varlen attention backend {backend!r}: flash_attn, torch_flash or sdpa_mask")
    return _masked_sdpa(q, k, v, cu_seqlens, rows, scale)


def _masked_sdpa(q, k, v, cu_seqlens, rows: int, scale):
    """The reference: SDPA per row with a mask that keeps a key iff it is in the query's document and
    not later (documents never cross a row, so a ``(rows, L, L)`` mask is enough)."""
    T, H, D = q.shape
    L = T // rows
    starts = torch.zeros(T, dtype=torch.long, device=q.device)
    starts[cu_seqlens[:-1].long()] = 1
    doc = starts.cumsum(0).view(rows, L)
    idx = torch.arange(L, device=q.device)
    mask = (doc[:, :, None] == doc[:, None, :]) & (idx[None, :] <= idx[:, None])
    per_row = lambda t: t.view(rows, L, t.shape[1], D).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(
        per_row(q), per_row(k), per_row(v), attn_mask=mask[:, None], scale=scale, enable_gqa=H != k.shape[1]
    )
    return out.transpose(1, 2).reshape(T, H, D)


def hf_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function ``m1_varlen`` (``query (b, H, L, D)``, returns ``(b, L, H, D)``).

    Packed rows arrive with ``cu_seq_lens_q`` and ``max_length_q`` (transformers' flash-attention
    kwargs) and no padding mask; anything else (padded batches, generation with a cache) is the SDPA path.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None or max_len is None or dropout:
        kwargs.update(dropout=dropout, scaling=scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    b, H, L, D = query.shape
    tok = lambda t: t.transpose(1, 2).reshape(b * L, t.shape[1], D)  # noqa: E731
    out = varlen_attention(tok(query), tok(key), tok(value), cu, int(max_len), rows=b, scale=scaling)
    return out.view(b, L, H, D), None


def hf_packed_kwargs(position_ids, attention_mask=None) -> dict:
    """The document boundaries of packed rows as transformers' flash-attention kwargs (``cu_seq_lens_q/k``,
    ``max_length_q/k``), for a model forward; ``{}`` when the batch is not packed.

    Computed once per forward rather than once per layer. Attention implementations that do not read
    them (SDPA, eager) ignore them and find the documents from ``position_ids`` themselves.

    Example::

        >>> import torch
        >>> kw = hf_packed_kwargs(torch.tensor([[0, 1, 0, 1, 2]]))
        >>> kw["cu_seq_lens_q"].tolist(), kw["max_length_q"]
        ([0, 2, 5], 3)
    """
    from .packing import is_packed
    from .packing import packed_layout

    if position_ids is None or not is_packed(position_ids, attention_mask):
        return {}
    layout = packed_layout(position_ids, attention_mask, position_ids.shape)
    cu, n = layout.cu_seqlens, layout.max_seqlen
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": n, "max_length_k": n}


@functools.cache
def register_hf_attention() -> str:
    """Register ``attn_implementation="m1_varlen"`` with transformers (masks as for SDPA); returns the name.

    Example::

        >>> register_hf_attention()
        'm1_varlen'
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(HF_NAME, hf_varlen_attention)
    AttentionMaskInterface.register(HF_NAME, sdpa_mask)
    return HF_NAME
