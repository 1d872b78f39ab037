# SPDX-License-Identifier: Apache-2.0
# Causal depthwise conv1d (the short conv of Mamba, Gu & Dao 2023, arXiv 2312.00752) with packed documents and
# per-document states, as the M1 layer uses it (arXiv 2504.10449). Written for m1-suite; maths in README.md.
"""Triton causal conv1d: differentiable varlen forward/backward and the in-place decode update.

Layout: ``x (b, L, d)`` token-major (any strides: a slice of the ``in_proj`` output works), ``weight (d, K)``
with ``K <= 4``, states ``(rows or docs, d, K-1)`` holding the last ``K - 1`` inputs oldest first.

Kernels (tiles of ``BLOCK_T`` tokens x ``BLOCK_D`` channels, channels innermost for coalescing):

- ``_conv_fwd_kernel``: ``out_t = act(bias + sum_k w_k * x_{t-K+1+k})``; taps before a document's start
  read its initial state (or zero). Packed documents are found through ``doc_idx`` (the document of each
  token, computed on the device with ``searchsorted``: no host sync) and ``cu_seqlens``.
- ``_conv_state_kernel``: final states (forward) and, in the backward, the initial-state gradients.
- ``_conv_bwd_dpre_kernel``: recomputes the pre-activation, writes ``dpre = dout * act'`` (fp32) and
  per-tile partial sums of ``dweight``/``dbias`` (summed by torch afterwards: deterministic).
- ``_conv_bwd_dx_kernel``: ``dx_p = sum_k w_k * dpre_{p+K-1-k}`` within the document (+ final-state grads).

No autotuning (a fixed, shape-keyed table in :func:`_tiles`); the whole path is CUDA-graph capturable.
"""

import torch
import triton
import triton.language as tl

from m1_kernels.conv1d.naive import activation_fn
from m1_kernels.selective_scan.naive import cu_seqlens_int32
from m1_kernels.selective_scan.naive import cu_seqlens_memo


@triton.jit
def _load_x_tap(
    x_ptr,
    init_ptr,
    row,
    t,
    p,
    doc,
    start,
    offs_d,
    mask_td,
    s_x_b,
    s_x_t,
    s_x_d,
    s_i_n,
    s_i_d,
    s_i_k,
    KM1: tl.constexpr,
    HAS_INIT: tl.constexpr,
):
    """Input at position ``p`` (per token) of document ``doc`` starting at ``start``: x or the initial state."""
    in_doc = p >= start
    v = tl.load(
        x_ptr + row * s_x_b + p[:, None] * s_x_t + offs_d[None, :] * s_x_d, mask=mask_td & in_doc[:, None], other=0.0
    ).to(tl.float32)
    if HAS_INIT:
        j = p - start + KM1  # index into the state (oldest first); in [0, K-1) when p < start
        vi = tl.load(
            init_ptr + doc[:, None] * s_i_n + offs_d[None, :] * s_i_d + j[:, None] * s_i_k,
            mask=mask_td & (~in_doc)[:, None],
            other=0.0,
        ).to(tl.float32)
        v = tl.where(in_doc[:, None], v, vi)
    return v


@triton.jit
def _doc_bounds(doc_idx_ptr, cu_ptr, row, offs_t, mask_t, L, IS_VARLEN: tl.constexpr):
    """Document id, start and end of each token (rows are documents when not packed)."""
    if IS_VARLEN:
        doc = tl.load(doc_idx_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
        start = tl.load(cu_ptr + doc, mask=mask_t, other=0).to(tl.int64)
        end = tl.load(cu_ptr + doc + 1, mask=mask_t, other=0).to(tl.int64)
    else:
        doc = tl.zeros_like(offs_t) + row
        start = tl.zeros_like(offs_t)
        end = tl.zeros_like(offs_t) + L
    return doc, start, end


@triton.jit
def _tile_setup(doc_idx_ptr, cu_ptr, L, d, IS_VARLEN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program ids, offsets, masks and per-token document bounds of a (BLOCK_T, BLOCK_D) tile kernel:
    (pid_t, row, offs_d, offs_t, mask_d, mask_td, doc, start, end)."""
    pid_d, pid_t, row = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    mask_d, mask_t = offs_d < d, offs_t < L
    mask_td = mask_t[:, None] & mask_d[None, :]
    doc, start, end = _doc_bounds(doc_idx_ptr, cu_ptr, row, offs_t, mask_t, L, IS_VARLEN)
    return pid_t, row, offs_d, offs_t, mask_d, mask_td, doc, start, end


@triton.jit
def _conv_pre(
    x_ptr,
    w_ptr,
    bias_ptr,
    init_ptr,
    row,
    offs_t,
    doc,
    start,
    offs_d,
    mask_d,
    mask_td,
    s_x_b,
    s_x_t,
    s_x_d,
    s_w_d,
    s_w_k,
    s_i_n,
    s_i_d,
    s_i_k,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """fp32 pre-activation ``bias + sum_k w_k * x_{t-K+1+k}`` of a (BLOCK_T, BLOCK_D) tile."""
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        w = tl.load(w_ptr + offs_d * s_w_d + k * s_w_k, mask=mask_d, other=0.0).to(tl.float32)
        p = offs_t - (K - 1) + k
        v = _load_x_tap(
            x_ptr, init_ptr, row, offs_t, p, doc, start, offs_d, mask_td,
            s_x_b, s_x_t, s_x_d, s_i_n, s_i_d, s_i_k, K - 1, HAS_INIT,
        )  # fmt: skip
        acc += v * w[None, :]
    return acc


@triton.jit
def _doc_range(cu_ptr, n, L, IS_VARLEN: tl.constexpr):
    """(start, end, row) of document (or row) ``n`` for the per-document state kernels."""
    if IS_VARLEN:
        start = tl.load(cu_ptr + n).to(tl.int64)
        end = tl.load(cu_ptr + n + 1).to(tl.int64)
        row = n * 0
    else:
        start = n * 0
        end = n * 0 + L
        row = n
    return start, end, row


@triton.jit
def _state_offsets(d, KM1: tl.constexpr, BLOCK_KM1: tl.constexpr, BLOCK_D: tl.constexpr):
    """(n, offs_d, offs_j, mask_d, mask (BLOCK_KM1, BLOCK_D)) of a per-document state kernel program."""
    n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, BLOCK_KM1).to(tl.int64)
    mask_d, mask_j = offs_d < d, offs_j < KM1
    m = mask_j[:, None] & mask_d[None, :]
    return n, offs_d, offs_j, mask_d, m


@triton.jit
def _conv_fwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    init_ptr,
    cu_ptr,
    doc_idx_ptr,
    out_ptr,
    L,
    d,
    s_x_b,
    s_x_t,
    s_x_d,
    s_w_d,
    s_w_k,
    s_i_n,
    s_i_d,
    s_i_k,
    s_o_b,
    s_o_t,
    s_o_d,
    K: tl.constexpr,
    SILU: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t, row, offs_d, offs_t, mask_d, mask_td, doc, start, end = _tile_setup(
        doc_idx_ptr, cu_ptr, L, d, IS_VARLEN, BLOCK_T, BLOCK_D
    )
    acc = _conv_pre(
        x_ptr, w_ptr, bias_ptr, init_ptr, row, offs_t, doc, start, offs_d, mask_d, mask_td,
        s_x_b, s_x_t, s_x_d, s_w_d, s_w_k, s_i_n, s_i_d, s_i_k, K, HAS_BIAS, HAS_INIT, BLOCK_T, BLOCK_D,
    )  # fmt: skip
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(
        out_ptr + row * s_o_b + offs_t[:, None] * s_o_t + offs_d[None, :] * s_o_d,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_td,
    )


@triton.jit
def _conv_state_kernel(
    src_ptr,
    init_ptr,
    cu_ptr,
    dst_ptr,
    L,
    d,
    s_s_b,
    s_s_t,
    s_s_d,
    s_i_n,
    s_i_d,
    s_i_k,
    s_o_n,
    s_o_d,
    s_o_k,
    KM1: tl.constexpr,
    BLOCK_KM1: tl.constexpr,
    HAS_INIT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Final states: ``dst[n, :, j]`` = input at position ``end - (K-1) + j`` of document (or row) ``n``.

    That is x, or the initial state (zero without one) for documents shorter than ``K - 1``.
    """
    n, offs_d, offs_j, mask_d, m = _state_offsets(d, KM1, BLOCK_KM1, BLOCK_D)
    start, end, row = _doc_range(cu_ptr, n, L, IS_VARLEN)
    p = end - KM1 + offs_j  # (BLOCK_KM1,) positions of the final state's entries
    in_doc = p >= start
    v = tl.load(
        src_ptr + row * s_s_b + p[:, None] * s_s_t + offs_d[None, :] * s_s_d, mask=m & in_doc[:, None], other=0.0
    )
    if HAS_INIT:
        ji = p - start + KM1
        vi = tl.load(
            init_ptr + n * s_i_n + offs_d[None, :] * s_i_d + ji[:, None] * s_i_k, mask=m & (~in_doc)[:, None], other=0.0
        )
        v = tl.where(in_doc[:, None], v, vi.to(v.dtype))
    tl.store(
        dst_ptr + n * s_o_n + offs_d[None, :] * s_o_d + offs_j[:, None] * s_o_k, v.to(dst_ptr.dtype.element_ty), mask=m
    )


@triton.jit
def _conv_dinit_kernel(
    dpre_ptr,
    w_ptr,
    dfinal_ptr,
    cu_ptr,
    dinit_ptr,
    L,
    d,
    s_w_d,
    s_w_k,
    s_f_n,
    s_f_d,
    s_f_k,
    s_o_n,
    s_o_d,
    s_o_k,
    K: tl.constexpr,
    BLOCK_KM1: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``dinit[n, :, j] = sum_{k<=j} w_k * dpre[start+j-k]`` (inside the doc) + ``dfinal[n, :, j-len]``.

    ``dpre`` is a contiguous fp32 ``(b, L, d)`` buffer.
    """
    n, offs_d, offs_j, mask_d, m = _state_offsets(d, K - 1, BLOCK_KM1, BLOCK_D)
    start, end, row = _doc_range(cu_ptr, n, L, IS_VARLEN)
    base = dpre_ptr + row * L * d
    acc = tl.zeros([BLOCK_KM1, BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(K - 1):
        # init entry j sits at position start - (K-1) + j; output t = start + j - k uses it through tap k.
        w = tl.load(w_ptr + offs_d * s_w_d + k * s_w_k, mask=mask_d, other=0.0).to(tl.float32)
        t = start + offs_j - k
        ok = (offs_j >= k) & (t < end)
        g = tl.load(base + t[:, None] * d + offs_d[None, :], mask=m & ok[:, None], other=0.0)
        acc += g * w[None, :]
    if HAS_DFINAL:
        # Documents shorter than K-1 pass part of their initial state straight into the final state.
        jf = start - end + offs_j
        ok = jf >= 0
        g = tl.load(
            dfinal_ptr + n * s_f_n + offs_d[None, :] * s_f_d + jf[:, None] * s_f_k, mask=m & ok[:, None], other=0.0
        )
        acc += g.to(tl.float32)
    tl.store(
        dinit_ptr + n * s_o_n + offs_d[None, :] * s_o_d + offs_j[:, None] * s_o_k,
        acc.to(dinit_ptr.dtype.element_ty),
        mask=m,
    )


@triton.jit
def _conv_bwd_dpre_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    init_ptr,
    cu_ptr,
    doc_idx_ptr,
    dout_ptr,
    dpre_ptr,
    dw_ptr,
    L,
    d,
    s_x_b,
    s_x_t,
    s_x_d,
    s_w_d,
    s_w_k,
    s_i_n,
    s_i_d,
    s_i_k,
    s_g_b,
    s_g_t,
    s_g_d,
    K: tl.constexpr,
    SILU: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dpre (fp32, contiguous (b, L, d)) and per-tile partials ``dw[tile, k, d]`` (k == K is dbias)."""
    pid_t, row, offs_d, offs_t, mask_d, mask_td, doc, start, end = _tile_setup(
        doc_idx_ptr, cu_ptr, L, d, IS_VARLEN, BLOCK_T, BLOCK_D
    )
    g = tl.load(dout_ptr + row * s_g_b + offs_t[:, None] * s_g_t + offs_d[None, :] * s_g_d, mask=mask_td, other=0.0).to(
        tl.float32
    )
    if SILU:
        pre = _conv_pre(
            x_ptr, w_ptr, bias_ptr, init_ptr, row, offs_t, doc, start, offs_d, mask_d, mask_td,
            s_x_b, s_x_t, s_x_d, s_w_d, s_w_k, s_i_n, s_i_d, s_i_k, K, HAS_BIAS, HAS_INIT, BLOCK_T, BLOCK_D,
        )  # fmt: skip
        sig = tl.sigmoid(pre)
        g = g * sig * (1.0 + pre * (1.0 - sig))
    g = tl.where(mask_td, g, 0.0)
    tl.store(dpre_ptr + row * L * d + offs_t[:, None] * d + offs_d[None, :], g, mask=mask_td)
    tile = (row * tl.num_programs(1) + pid_t) * (K + 1)
    for k in tl.static_range(K):
        v = _load_x_tap(
            x_ptr,
            init_ptr,
            row,
            offs_t,
            offs_t - (K - 1) + k,
            doc,
            start,
            offs_d,
            mask_td,
            s_x_b,
            s_x_t,
            s_x_d,
            s_i_n,
            s_i_d,
            s_i_k,
            K - 1,
            HAS_INIT,
        )
        tl.store(dw_ptr + (tile + k) * d + offs_d, tl.sum(g * v, axis=0), mask=mask_d)
    tl.store(dw_ptr + (tile + K) * d + offs_d, tl.sum(g, axis=0), mask=mask_d)


@triton.jit
def _conv_bwd_dx_kernel(
    dpre_ptr,
    w_ptr,
    dfinal_ptr,
    cu_ptr,
    doc_idx_ptr,
    dx_ptr,
    L,
    d,
    s_w_d,
    s_w_k,
    s_f_n,
    s_f_d,
    s_f_k,
    s_dx_b,
    s_dx_t,
    s_dx_d,
    K: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``dx_p = sum_k w_k * dpre_{p + K-1-k}`` (same document) ``+ dfinal[doc, :, p - end + K-1]``."""
    pid_t, row, offs_d, offs_t, mask_d, mask_td, doc, start, end = _tile_setup(
        doc_idx_ptr, cu_ptr, L, d, IS_VARLEN, BLOCK_T, BLOCK_D
    )
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(K):
        w = tl.load(w_ptr + offs_d * s_w_d + k * s_w_k, mask=mask_d, other=0.0).to(tl.float32)
        t = offs_t + (K - 1) - k
        g = tl.load(
            dpre_ptr + row * L * d + t[:, None] * d + offs_d[None, :], mask=mask_td & (t < end)[:, None], other=0.0
        )
        acc += g * w[None, :]
    if HAS_DFINAL:
        jf = offs_t - end + (K - 1)
        ok = jf >= 0
        g = tl.load(
            dfinal_ptr + doc[:, None] * s_f_n + offs_d[None, :] * s_f_d + jf[:, None] * s_f_k,
            mask=mask_td & ok[:, None],
            other=0.0,
        )
        acc += g.to(tl.float32)
    tl.store(
        dx_ptr + row * s_dx_b + offs_t[:, None] * s_dx_t + offs_d[None, :] * s_dx_d,
        acc.to(dx_ptr.dtype.element_ty),
        mask=mask_td,
    )


@triton.jit
def _conv_update_kernel(
    x_ptr,
    state_ptr,
    w_ptr,
    bias_ptr,
    idx_ptr,
    out_ptr,
    d,
    pad_slot_id,
    s_x_b,
    s_x_d,
    s_s_n,
    s_s_d,
    s_s_k,
    s_w_d,
    s_w_k,
    s_o_b,
    s_o_d,
    K: tl.constexpr,
    SILU: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INDICES: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    if HAS_INDICES:
        slot = tl.load(idx_ptr + row).to(tl.int64)
    else:
        slot = row
    # Liveness as a vector: the interpreter rejects scalar-bool masks. Pad rows never touch the cache.
    live = mask_d & ((tl.zeros([BLOCK_D], dtype=tl.int64) + slot) != pad_slot_id)
    x = tl.load(x_ptr + row * s_x_b + offs_d * s_x_d, mask=mask_d, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    s_base = state_ptr + slot * s_s_n + offs_d * s_s_d
    # Window = [state[0], ..., state[K-2], x]; the new state is the window shifted by one.
    for k in tl.static_range(K - 1):
        v = tl.load(s_base + k * s_s_k, mask=live, other=0.0)
        acc += v.to(tl.float32) * tl.load(w_ptr + offs_d * s_w_d + k * s_w_k, mask=mask_d, other=0.0).to(tl.float32)
        if k > 0:
            tl.store(s_base + (k - 1) * s_s_k, v, mask=live)
    acc += x * tl.load(w_ptr + offs_d * s_w_d + (K - 1) * s_w_k, mask=mask_d, other=0.0).to(tl.float32)
    if K > 1:
        tl.store(s_base + (K - 2) * s_s_k, x.to(state_ptr.dtype.element_ty), mask=live)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    acc = tl.where(live, acc, 0.0)
    tl.store(out_ptr + row * s_o_b + offs_d * s_o_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


def _tiles(n_tokens: int, d: int):
    """Fixed ``(BLOCK_T, BLOCK_D, num_warps)``: 64 tokens x 128 channels (8K elements, 4 warps).

    Channels are innermost in memory, so 128 channels = 256-512 contiguous bytes per token row; 64
    tokens amortise the K-1 halo rows (3/64 re-read). Small problems shrink the tile to keep programs busy.
    """
    block_d = min(128, triton.next_power_of_2(max(d, 16)))
    block_t = min(64, triton.next_power_of_2(max(n_tokens, 16)))
    return block_t, block_d, 4


def _check_activation(activation):
    activation_fn(activation)  # raises on unknown names
    return activation in ("silu", "swish")


@torch.compiler.disable  # the memo reads ids and version counters
def _doc_index(cu_seqlens, L):
    """Document of every packed token, on the device (no host sync): ``searchsorted(cu[1:], t, right)``. Computed
    once per ``cu_seqlens`` tensor and length (:class:`~m1_kernels.selective_scan.naive.TensorMemo`): a training step
    hands one ``cu_seqlens`` to every layer, and each search is four launches of host time."""

    def search(cu):
        t = torch.arange(L, device=cu.device, dtype=cu.dtype)
        return torch.searchsorted(cu[1:].contiguous(), t, right=True).to(torch.int32)

    return cu_seqlens_memo.get(cu_seqlens, ("document of each token", L), search)


def _conv_forward(x, weight, bias, silu, cu_seqlens, doc_idx, initial_state, return_final_state):
    b, L, d = x.shape
    K = weight.shape[1]
    out = torch.empty(b, L, d, dtype=x.dtype, device=x.device)
    block_t, block_d, warps = _tiles(L, d)
    init_strides = initial_state.stride() if initial_state is not None else (0, 0, 0)
    if L > 0:
        grid = (triton.cdiv(d, block_d), triton.cdiv(L, block_t), b)
        _conv_fwd_kernel[grid](
            x,
            weight,
            bias,
            initial_state,
            cu_seqlens,
            doc_idx,
            out,
            L,
            d,
            *x.stride(),
            *weight.stride(),
            *init_strides,
            *out.stride(),
            K=K,
            SILU=silu,
            HAS_BIAS=bias is not None,
            HAS_INIT=initial_state is not None,
            IS_VARLEN=cu_seqlens is not None,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            num_warps=warps,
        )
    if not return_final_state:
        return out, None
    n = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    final = torch.empty(n, d, K - 1, dtype=x.dtype, device=x.device)
    if K > 1 and n > 0:
        _conv_state_kernel[(n, triton.cdiv(d, block_d))](
            x,
            initial_state,
            cu_seqlens,
            final,
            L,
            d,
            *x.stride(),
            *init_strides,
            *final.stride(),
            KM1=K - 1,
            BLOCK_KM1=triton.next_power_of_2(K - 1),
            HAS_INIT=initial_state is not None,
            IS_VARLEN=cu_seqlens is not None,
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out, final


class CausalConv1dFunction(torch.autograd.Function):
    """Autograd wrapper: Triton forward, Triton backward (grads of x, weight, bias, initial_state)."""

    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, cu_seqlens, silu, return_final_state):
        doc_idx = _doc_index(cu_seqlens, x.shape[1]) if cu_seqlens is not None else None
        out, final = _conv_forward(x, weight, bias, silu, cu_seqlens, doc_idx, initial_state, return_final_state)
        ctx.save_for_backward(x, weight, bias, initial_state, cu_seqlens, doc_idx)
        ctx.silu = silu
        if final is None:
            return out
        return out, final

    @staticmethod
    def backward(ctx, dout, dfinal=None):
        x, weight, bias, initial_state, cu_seqlens, doc_idx = ctx.saved_tensors
        b, L, d = x.shape
        K = weight.shape[1]
        varlen = cu_seqlens is not None
        block_t, block_d, warps = _tiles(L, d)
        n_tb = triton.cdiv(L, block_t)
        init_strides = initial_state.stride() if initial_state is not None else (0, 0, 0)
        f_strides = dfinal.stride() if dfinal is not None else (0, 0, 0)
        dpre = torch.empty(b, L, d, dtype=torch.float32, device=x.device)
        dw_part = torch.empty(b * n_tb, K + 1, d, dtype=torch.float32, device=x.device)
        dx = torch.empty(b, L, d, dtype=x.dtype, device=x.device)
        if L > 0:
            grid = (triton.cdiv(d, block_d), n_tb, b)
            _conv_bwd_dpre_kernel[grid](
                x,
                weight,
                bias,
                initial_state,
                cu_seqlens,
                doc_idx,
                dout,
                dpre,
                dw_part,
                L,
                d,
                *x.stride(),
                *weight.stride(),
                *init_strides,
                *dout.stride(),
                K=K,
                SILU=ctx.silu,
                HAS_BIAS=bias is not None,
                HAS_INIT=initial_state is not None,
                IS_VARLEN=varlen,
                BLOCK_T=block_t,
                BLOCK_D=block_d,
                num_warps=warps,
            )
            _conv_bwd_dx_kernel[grid](
                dpre,
                weight,
                dfinal,
                cu_seqlens,
                doc_idx,
                dx,
                L,
                d,
                *weight.stride(),
                *f_strides,
                *dx.stride(),
                K=K,
                HAS_DFINAL=dfinal is not None,
                IS_VARLEN=varlen,
                BLOCK_T=block_t,
                BLOCK_D=block_d,
                num_warps=warps,
            )
        dw_sum = dw_part.sum(0) if L > 0 else torch.zeros(K + 1, d, device=x.device)
        dweight = dw_sum[:K].T.contiguous().to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = dw_sum[K].to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        dinit = None
        if initial_state is not None and ctx.needs_input_grad[3]:
            n = initial_state.shape[0]
            dinit = torch.empty(n, d, K - 1, dtype=initial_state.dtype, device=x.device)
            if K > 1 and n > 0:
                _conv_dinit_kernel[(n, triton.cdiv(d, block_d))](
                    dpre,
                    weight,
                    dfinal,
                    cu_seqlens,
                    dinit,
                    L,
                    d,
                    *weight.stride(),
                    *f_strides,
                    *dinit.stride(),
                    K=K,
                    BLOCK_KM1=triton.next_power_of_2(K - 1),
                    HAS_DFINAL=dfinal is not None,
                    IS_VARLEN=varlen,
                    BLOCK_D=block_d,
                    num_warps=4,
                )
        return dx, dweight, dbias, dinit, None, None, None


def causal_conv1d_triton(
    x, weight, bias=None, activation="silu", cu_seqlens=None, initial_state=None, return_final_state=False
):
    """Triton causal conv1d; arguments, shapes and returns as :func:`m1_kernels.causal_conv1d`.

    Differentiable in ``x``, ``weight``, ``bias`` and ``initial_state`` (and through the returned final
    states). ``x (b, L, d)`` may be any strided view; ``weight (d, K)`` with ``K <= 4``; packed input is
    ``b == 1`` with int32 ``cu_seqlens`` (per-document resets and states). Output is contiguous in x's
    dtype; final states ``(rows or docs, d, K-1)`` in x's dtype. Validation of ``cu_seqlens`` values is
    left to the caller (it would need a host sync).
    """
    silu = _check_activation(activation)
    b, L, d = x.shape
    K = weight.shape[1]
    if weight.shape != (d, K) or not 1 <= K <= 4:
        raise ValueError(f"weight must be (d={d}, K<=4), got {tuple(weight.shape)}")
    if cu_seqlens is not None and b != 1:
        raise ValueError(f"packed input (cu_seqlens given) must have batch 1, got {b}")
    n = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is not None and initial_state.shape != (n, d, K - 1):
        raise ValueError(f"initial_state must be ({n}, {d}, {K - 1}), got {tuple(initial_state.shape)}")
    if bias is not None:
        bias = bias.contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens_int32(cu_seqlens, x.device)  # once per tensor: then its document index is memoized
    return CausalConv1dFunction.apply(x, weight, bias, initial_state, cu_seqlens, silu, bool(return_final_state))


def causal_conv1d_update_triton(
    x, conv_state, weight, bias=None, activation="silu", state_indices=None, pad_slot_id=-1
):
    """Triton decode step of the conv; semantics as :func:`m1_kernels.causal_conv1d_update`.

    ``conv_state (n_slots, d, K-1)`` (any strides/dtype) is shifted in place for the slot of each row
    (``state_indices``; row ``i`` when None); rows with slot ``pad_slot_id`` are skipped and output
    zeros. CUDA-graph capturable. Returns ``out (b, d)`` in x's dtype.
    """
    silu = _check_activation(activation)
    bsz, d = x.shape
    K = weight.shape[1]
    if weight.shape != (d, K) or not 1 <= K <= 4 or conv_state.shape[1:] != (d, K - 1):
        raise ValueError(
            f"shapes: x {tuple(x.shape)}, conv_state {tuple(conv_state.shape)}, weight {tuple(weight.shape)}"
        )
    if bias is not None:
        bias = bias.contiguous()
    out = torch.empty_like(x)
    block_d = min(256, triton.next_power_of_2(max(d, 16)))
    _conv_update_kernel[(bsz, triton.cdiv(d, block_d))](
        x,
        conv_state,
        weight,
        bias,
        state_indices,
        out,
        d,
        pad_slot_id,
        *x.stride(),
        *conv_state.stride(),
        *weight.stride(),
        *out.stride(),
        K=K,
        SILU=silu,
        HAS_BIAS=bias is not None,
        HAS_INDICES=state_indices is not None,
        BLOCK_D=block_d,
        num_warps=4 if block_d >= 256 else 2,
    )
    return out
