# SPDX-License-Identifier: Apache-2.0
# Selective scan (Mamba-1 recurrence, Gu & Dao 2023, arXiv 2312.00752) in the M1 GQA layout (arXiv 2504.10449).
# Written for m1-suite; the maths (recurrence, gradients, checkpointing, varlen slots) is in README.md next to this
# file. This module is the mamba-ssm-style variant of triton_scan.py: 2D (time, channel) tiles, a loop over the
# state index inside each time chunk, and a chunked backward built from one forward and one reverse scan.
"""Tiled Triton selective scan (forward and backward), padded or packed (``cu_seqlens``).

Parallelisation: one program per (sequence, C group); a sequence is a batch row (padded) or a document
(packed), and the program's ``BLOCK_D = d_inner / G_C`` channels share one C group and one B group. Time is
processed in chunks of ``T_CHUNK`` tokens as 2D ``(T_CHUNK, BLOCK_D)`` tiles (rows of ``BLOCK_D`` contiguous
channels of x, dt, z, dout) and ``(T_CHUNK, N)`` tiles of B and C. Inside a chunk a ``tl.static_range`` loop runs
over the ``N`` states; state ``n`` is a 2D problem::

    a_t = exp2(delta_t * A[:, n] * log2(e))          (T_CHUNK, BLOCK_D)
    b_t = delta_t * x_t * B_t[n]
    h_t = a_t * h_{t-1} + b_t                          tl.associative_scan along time, seeded with the carry
    y_t += C_t[n] * h_t

The carried state ``(N, BLOCK_D)`` stays in registers between chunks (column ``n`` read / written with
``tl.where`` masks). The forward stores the state entering every chunk (fp32, ``CHUNK = T_CHUNK``, same slot
scheme as triton_scan.py). The backward walks the chunks last to first: it recomputes ``h`` within the chunk from
the stored chunk-start state, then gets the adjoint by a reverse scan::

    dh_t = g_t * C_t[n] + a_{t+1} * dh_{t+1}         reverse scan of (a_{t+1}, g_t C_t[n]); the last row is
                                                     seeded with the carry a_{ce} dh_{ce} from the next chunk

and accumulates (README, "Gradients"), using ``a_t h_{t-1} = h_t - b_t``::

    dx_t     = delta_t * sum_n dh_t B_t[n]  + g_t D
    ddelta_t = x_t * sum_n dh_t B_t[n]  + sum_n A[:, n] dh_t (h_t - b_t)
    dA[:, n] = sum_t delta_t dh_t (h_t - b_t)
    dC_t[n]  = sum_channels g_t h_t,   dB_t[n] (per C group) = sum_channels dh_t delta_t x_t

``a_{t+1}`` is recomputed from dt loaded one token ahead (an extra exp2 per element, cheaper than a row shift).
No 3D tiles, no reshapes: every tensor is 2D (or 1D) in the hot loop.
"""

import torch
import triton
import triton.language as tl

from m1_kernels.selective_scan.naive import check_cu_seqlens
from m1_kernels.selective_scan.naive import group_index
from m1_kernels.selective_scan.naive import selective_scan_ref
from m1_kernels.selective_scan.triton_scan import _linrec_combine
from m1_kernels.selective_scan.triton_scan import _seq_bounds
from m1_kernels.selective_scan.triton_scan import _softplus
from m1_kernels.selective_scan.triton_scan import _strides3
from m1_kernels.selective_scan.triton_scan import _supported

# Tunables (the benchmark's --tiled-configs sweeps them). T_CHUNK tokens per step (a power of two; also the
# checkpoint interval); the (T_CHUNK, BLOCK_D) tile is capped at MAX_TILE elements (T_CHUNK shrinks for wide
# C groups). NUM_WARPS_FWD / NUM_WARPS_BWD: None picks tile_elements / 256 (8 fp32 elements per thread and
# tile: the backward keeps ~20 such tiles live).
T_CHUNK = 256
MAX_TILE = 8192
NUM_WARPS_FWD = None
NUM_WARPS_BWD = None
# Reverse scan of the backward: "native" = tl.associative_scan(reverse=True); "flip" = flip, forward scan, flip
# (tl.flip), a fallback in case a Triton build gets the reverse scan wrong (triton-lang/triton#4362).
REVERSE_SCAN = "native"


@triton.jit
def _rev_scan(alpha, v, FLIP: tl.constexpr):
    """R_t = v_t + alpha_t * R_{t+1} along axis 0 (inclusive, from the last row)."""
    if FLIP:
        _, r = tl.associative_scan((tl.flip(alpha, 0), tl.flip(v, 0)), 0, _linrec_combine)
        r = tl.flip(r, 0)
    else:
        # Reverse scan: combine(acc of later rows, current row) = (a_acc a_cur, a_cur * v_acc + v_cur), the
        # composition x -> v_cur + a_cur * (v_acc + a_acc x): the same combine as the forward recurrence.
        _, r = tl.associative_scan((alpha, v), 0, _linrec_combine, reverse=True)
    return r


@triton.jit
def _column(tile, offs_n, n):
    """Column ``n`` of a (T, BLOCK_N) tile as a (T,) vector (a masked row sum: no gather in Triton)."""
    return tl.sum(tl.where(offs_n[None, :] == n, tile, 0.0), axis=1)


@triton.jit
def _state_row(state, offs_n, n):
    """Row ``n`` of an (BLOCK_N, BLOCK_D) carried state as a (BLOCK_D,) vector."""
    return tl.sum(tl.where(offs_n[:, None] == n, state, 0.0), axis=0)


@triton.jit
def _load_delta(dt_ptr, t, offs_d, s_dt_l, s_dt_d, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(raw dt + bias, delta) tiles; delta is 0 outside ``mask`` (so a = 1 and b = 0 there)."""
    dt_raw = tl.load(dt_ptr + t[:, None] * s_dt_l + offs_d[None, :] * s_dt_d, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt_raw += bias[None, :]
    if SOFTPLUS:
        delta = _softplus(dt_raw)
    else:
        delta = dt_raw
    return dt_raw, tl.where(mask, delta, 0.0)


@triton.jit
def _tiled_fwd_kernel(
    x_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    h0_ptr,
    cu_ptr,
    out_ptr,
    final_ptr,
    ckpt_ptr,
    L,
    d_inner,
    n_ckpt_per_row,
    s_x_b,
    s_x_l,
    s_x_d,
    s_dt_b,
    s_dt_l,
    s_dt_d,
    s_z_b,
    s_z_l,
    s_z_d,
    s_o_b,
    s_o_l,
    s_o_d,
    s_B_b,
    s_B_l,
    s_B_g,
    s_B_n,
    s_C_b,
    s_C_l,
    s_C_g,
    s_C_n,
    s_A_d,
    s_A_n,
    s_h0_s,
    s_h0_d,
    s_h0_n,
    N: tl.constexpr,
    CPB: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    T_CHUNK: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_H0: tl.constexpr,
    SAVE_CKPT: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)  # = the C group
    start, end, row, slot0 = _seq_bounds(cu_ptr, pid_s, L, n_ckpt_per_row, IS_VARLEN, T_CHUNK)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, T_CHUNK)
    mask_n = offs_n < N
    mask_nd = mask_n[:, None] & (offs_d[None, :] < d_inner)
    b_grp = pid_d // CPB
    # Carried state, transposed: (BLOCK_N, BLOCK_D), so a row n broadcasts over the (T, BLOCK_D) tiles.
    state_offs = offs_d[None, :] * N + offs_n[:, None]
    if HAS_H0:
        H = tl.load(h0_ptr + pid_s * s_h0_s + offs_d[None, :] * s_h0_d + offs_n[:, None] * s_h0_n, mask=mask_nd)
        H = tl.where(mask_nd, H.to(tl.float32), 0.0)
    else:
        H = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d).to(tl.float32)

    x_ptr += row * s_x_b
    dt_ptr += row * s_dt_b
    if HAS_Z:
        z_ptr += row * s_z_b
    out_ptr += row * s_o_b
    B_ptr += row * s_B_b + b_grp * s_B_g
    C_ptr += row * s_C_b + pid_d * s_C_g

    n_chunks = tl.cdiv(end - start, T_CHUNK)
    for c in range(0, n_chunks):
        if SAVE_CKPT:
            tl.store(ckpt_ptr + (slot0 + c) * d_inner * N + state_offs, H, mask=mask_nd)
        t = start + c * T_CHUNK + offs_t
        mask_t = t < end
        mask_td = mask_t[:, None]
        xt = tl.load(x_ptr + t[:, None] * s_x_l + offs_d[None, :] * s_x_d, mask=mask_td, other=0.0).to(tl.float32)
        _, delta = _load_delta(dt_ptr, t, offs_d, s_dt_l, s_dt_d, mask_td, bias, HAS_BIAS, SOFTPLUS)
        dx = delta * xt
        mask_tn = mask_t[:, None] & mask_n[None, :]
        Bt = tl.load(B_ptr + t[:, None] * s_B_l + offs_n[None, :] * s_B_n, mask=mask_tn, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + t[:, None] * s_C_l + offs_n[None, :] * s_C_n, mask=mask_tn, other=0.0).to(tl.float32)
        y = tl.zeros((T_CHUNK, BLOCK_D), dtype=tl.float32)
        for n in tl.static_range(N):
            A_n = tl.load(A_ptr + offs_d * s_A_d + n * s_A_n).to(tl.float32) * 1.4426950408889634
            a = tl.exp2(delta * A_n[None, :])
            b = dx * _column(Bt, offs_n, n)[:, None]
            # Seed the scan with the carried state: b_0 += a_0 h_in.
            b = tl.where(offs_t[:, None] == 0, b + a * _state_row(H, offs_n, n)[None, :], b)
            _, h = tl.associative_scan((a, b), 0, _linrec_combine)
            y += h * _column(Ct, offs_n, n)[:, None]
            # Carry: the last row (rows past the document end have a = 1, b = 0 and repeat the last state).
            h_last = tl.sum(tl.where(offs_t[:, None] == T_CHUNK - 1, h, 0.0), axis=0)
            H = tl.where(offs_n[:, None] == n, h_last[None, :], H)
        if HAS_D:
            y += Dv[None, :] * xt
        if HAS_Z:
            zt = tl.load(z_ptr + t[:, None] * s_z_l + offs_d[None, :] * s_z_d, mask=mask_td, other=0.0)
            zt = zt.to(tl.float32)
            y = y * zt * tl.sigmoid(zt)
        tl.store(out_ptr + t[:, None] * s_o_l + offs_d[None, :] * s_o_d, y.to(out_ptr.dtype.element_ty), mask=mask_td)

    tl.store(final_ptr + pid_s * d_inner * N + state_offs, H, mask=mask_nd)


@triton.jit
def _tiled_bwd_kernel(
    x_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    cu_ptr,
    dout_ptr,
    dfinal_ptr,
    ckpt_ptr,
    dx_ptr,
    ddt_ptr,
    dz_ptr,
    dBp_ptr,
    dC_ptr,
    dA_ptr,
    dD_ptr,
    dbias_ptr,
    dh0_ptr,
    L,
    d_inner,
    G_C,
    n_ckpt_per_row,
    s_x_b,
    s_x_l,
    s_x_d,
    s_dt_b,
    s_dt_l,
    s_dt_d,
    s_z_b,
    s_z_l,
    s_z_d,
    s_do_b,
    s_do_l,
    s_do_d,
    s_B_b,
    s_B_l,
    s_B_g,
    s_B_n,
    s_C_b,
    s_C_l,
    s_C_g,
    s_C_n,
    s_A_d,
    s_A_n,
    N: tl.constexpr,
    CPB: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    T_CHUNK: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
    FLIP: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)  # = the C group
    start, end, row, slot0 = _seq_bounds(cu_ptr, pid_s, L, n_ckpt_per_row, IS_VARLEN, T_CHUNK)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, T_CHUNK)
    mask_n = offs_n < N
    mask_nd = mask_n[:, None] & (offs_d[None, :] < d_inner)
    b_grp = pid_d // CPB
    state_offs = offs_d[None, :] * N + offs_n[:, None]  # (BLOCK_N, BLOCK_D) view of a (d_inner, N) state
    # dH: adjoint carried into the last row of the chunk being processed (a_{ce} dh_{ce}; d final at the end).
    if HAS_DFINAL:
        dH = tl.load(dfinal_ptr + pid_s * d_inner * N + state_offs, mask=mask_nd, other=0.0)
    else:
        dH = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dA_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d).to(tl.float32)

    x_ptr += row * s_x_b
    dt_ptr += row * s_dt_b
    if HAS_Z:
        z_ptr += row * s_z_b
    dout_ptr += row * s_do_b
    B_ptr += row * s_B_b + b_grp * s_B_g
    C_ptr += row * s_C_b + pid_d * s_C_g
    # Gradients of (b, L, d) tensors are contiguous; dC (C's dtype) and the dB partials (fp32) are (b, L, G_C, N).
    grad_ptr_off = row * L * d_inner + offs_d[None, :]
    g_off = row * L * G_C * N + pid_d * N + offs_n[None, :]

    n_chunks = tl.cdiv(end - start, T_CHUNK)
    for ci in range(0, n_chunks):
        c = n_chunks - 1 - ci
        t = start + c * T_CHUNK + offs_t
        mask_t = t < end
        mask_td = mask_t[:, None]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        xt = tl.load(x_ptr + t[:, None] * s_x_l + offs_d[None, :] * s_x_d, mask=mask_td, other=0.0).to(tl.float32)
        dt_raw, delta = _load_delta(dt_ptr, t, offs_d, s_dt_l, s_dt_d, mask_td, bias, HAS_BIAS, SOFTPLUS)
        # delta_{t+1} (0 past the document end: a_{t+1} = 1 there, so the carry passes through padding rows).
        _, delta_nx = _load_delta(dt_ptr, t + 1, offs_d, s_dt_l, s_dt_d, (t + 1 < end)[:, None], bias, HAS_BIAS,
                                  SOFTPLUS)  # fmt: skip
        dx_ = delta * xt
        Bt = tl.load(B_ptr + t[:, None] * s_B_l + offs_n[None, :] * s_B_n, mask=mask_tn, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + t[:, None] * s_C_l + offs_n[None, :] * s_C_n, mask=mask_tn, other=0.0).to(tl.float32)
        do = tl.load(dout_ptr + t[:, None] * s_do_l + offs_d[None, :] * s_do_d, mask=mask_td, other=0.0)
        do = do.to(tl.float32)
        if HAS_Z:
            zt = tl.load(z_ptr + t[:, None] * s_z_l + offs_d[None, :] * s_z_d, mask=mask_td, other=0.0)
            zt = zt.to(tl.float32)
            sig = tl.sigmoid(zt)
            g = do * zt * sig  # gradient of y_t (before the gate)
        else:
            g = do
        ckpt_n_ptr = ckpt_ptr + (slot0 + c) * d_inner * N + offs_d * N
        y_acc = tl.zeros((T_CHUNK, BLOCK_D), dtype=tl.float32)  # sum_n C h (for dz)
        dhB = tl.zeros((T_CHUNK, BLOCK_D), dtype=tl.float32)  # sum_n dh B
        dda = tl.zeros((T_CHUNK, BLOCK_D), dtype=tl.float32)  # sum_n A dh (h - b)
        dB_tile = tl.zeros((T_CHUNK, BLOCK_N), dtype=tl.float32)
        dC_tile = tl.zeros((T_CHUNK, BLOCK_N), dtype=tl.float32)
        for n in tl.static_range(N):
            A_n = tl.load(A_ptr + offs_d * s_A_d + n * s_A_n).to(tl.float32)
            A2 = A_n * 1.4426950408889634
            B_n = _column(Bt, offs_n, n)
            C_n = _column(Ct, offs_n, n)
            # 1) h_t within the chunk from the stored chunk-start state.
            a = tl.exp2(delta * A2[None, :])
            b = dx_ * B_n[:, None]
            h_in = tl.load(ckpt_n_ptr + n)
            b0 = tl.where(offs_t[:, None] == 0, b + a * h_in[None, :], b)
            _, h = tl.associative_scan((a, b0), 0, _linrec_combine)
            # 2) dh_t = g_t C_t + a_{t+1} dh_{t+1}, the last row seeded with the carry.
            gc = g * C_n[:, None]
            v = tl.where(offs_t[:, None] == T_CHUNK - 1, gc + _state_row(dH, offs_n, n)[None, :], gc)
            a_nx = tl.exp2(delta_nx * A2[None, :])
            dh = _rev_scan(a_nx, v, FLIP)
            # 3) Accumulate. a_t h_{t-1} = h_t - b_t.
            y_acc += h * C_n[:, None]
            dC_tile = tl.where(offs_n[None, :] == n, tl.sum(g * h, axis=1)[:, None], dC_tile)
            dB_tile = tl.where(offs_n[None, :] == n, tl.sum(dh * dx_, axis=1)[:, None], dB_tile)
            dhB += dh * B_n[:, None]
            da = dh * (h - b)  # d loss / d(delta A) of this state
            dda += da * A_n[None, :]
            dA_acc = tl.where(offs_n[:, None] == n, dA_acc + tl.sum(da * delta, axis=0)[None, :], dA_acc)
            # Carry to the previous chunk: a_{cs} dh_{cs} (row 0).
            e0 = tl.sum(tl.where(offs_t[:, None] == 0, a * dh, 0.0), axis=0)
            dH = tl.where(offs_n[:, None] == n, e0[None, :], dH)
        dx = dhB * delta
        if HAS_D:
            dx += g * Dv[None, :]
            dD_acc += tl.sum(g * xt, axis=0)
        ddelta = dhB * xt + dda
        if SOFTPLUS:
            ddt = tl.where(dt_raw <= 20.0, ddelta * tl.sigmoid(dt_raw), ddelta)
        else:
            ddt = ddelta
        ddt = tl.where(mask_td, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=0)
        goff = grad_ptr_off + t[:, None] * d_inner
        tl.store(dx_ptr + goff, dx.to(dx_ptr.dtype.element_ty), mask=mask_td)
        tl.store(ddt_ptr + goff, ddt.to(ddt_ptr.dtype.element_ty), mask=mask_td)
        if HAS_Z:
            y_pre = y_acc
            if HAS_D:
                y_pre += Dv[None, :] * xt
            dz = do * y_pre * sig * (1.0 + zt * (1.0 - sig))
            tl.store(dz_ptr + goff, dz.to(dz_ptr.dtype.element_ty), mask=mask_td)
        toff = g_off + t[:, None] * (G_C * N)
        tl.store(dC_ptr + toff, dC_tile.to(dC_ptr.dtype.element_ty), mask=mask_tn)
        tl.store(dBp_ptr + toff, dB_tile, mask=mask_tn)

    # dH is now a_start dh_start: the adjoint of the initial state.
    tl.store(dh0_ptr + pid_s * d_inner * N + state_offs, dH, mask=mask_nd)
    tl.store(dA_ptr + pid_s * d_inner * N + state_offs, dA_acc, mask=mask_nd)
    tl.store(dD_ptr + pid_s * d_inner + offs_d, dD_acc)
    tl.store(dbias_ptr + pid_s * d_inner + offs_d, dbias_acc)


def _tile_config(cpc: int, N: int):
    """``(BLOCK_D, BLOCK_N, T_CHUNK, warps_fwd, warps_bwd)`` from the module tunables."""
    block_n = triton.next_power_of_2(N)
    t_chunk = max(1, min(T_CHUNK, MAX_TILE // cpc))
    elems = t_chunk * cpc
    auto = max(1, min(16, elems // 256))
    return cpc, block_n, t_chunk, NUM_WARPS_FWD or auto, NUM_WARPS_BWD or auto


class TiledSelectiveScanFunction(torch.autograd.Function):
    """Autograd wrapper: tiled Triton forward (saving chunk-start states) and tiled Triton backward."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, dt_softplus, return_final_state):
        b, L, d = x.shape
        N = A.shape[1]
        G_C, G_B = C.shape[2], B.shape[2]
        cpc, cpb = d // G_C, G_C // G_B
        block_d, block_n, t_chunk, warps_fwd, warps_bwd = _tile_config(cpc, N)
        if cu_seqlens is not None:
            cu = cu_seqlens.to(device=x.device, dtype=torch.int32).contiguous()
            n_seqs = cu.numel() - 1
            n_slots = L // t_chunk + n_seqs + 1  # see README, "State checkpointing and varlen"
            n_ckpt_per_row = 0
        else:
            cu = None
            n_seqs = b
            n_ckpt_per_row = triton.cdiv(L, t_chunk)
            n_slots = b * n_ckpt_per_row
        save_ckpt = any(ctx.needs_input_grad)
        out = torch.empty((b, L, d), device=x.device, dtype=x.dtype)
        final = torch.empty((n_seqs, d, N), device=x.device, dtype=torch.float32)
        ckpt = torch.empty((max(n_slots, 1) if save_ckpt else 1, d, N), device=x.device, dtype=torch.float32)
        h0 = initial_state
        if n_seqs > 0:
            _tiled_fwd_kernel[(n_seqs, G_C)](
                x, dt, A, B, C, D, z, dt_bias, h0, cu, out, final, ckpt, L, d, n_ckpt_per_row,
                *x.stride(), *dt.stride(), *_strides3(z, x), *out.stride(), *B.stride(), *C.stride(), *A.stride(),
                *(h0.stride() if h0 is not None else (0, 0, 0)),
                N=N, CPB=cpb, BLOCK_D=block_d, BLOCK_N=block_n, T_CHUNK=t_chunk, HAS_D=D is not None,
                HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), IS_VARLEN=cu is not None,
                HAS_H0=h0 is not None, SAVE_CKPT=save_ckpt, num_warps=warps_fwd,
            )  # fmt: skip
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_state, cu, ckpt)
        ctx.cfg = (dt_softplus, n_seqs, n_ckpt_per_row, block_d, block_n, t_chunk, warps_bwd, cpb)
        ctx.return_final_state = return_final_state
        if return_final_state:
            return out, final
        return out

    @staticmethod
    def backward(ctx, dout, *rest):
        x, dt, A, B, C, D, z, dt_bias, initial_state, cu, ckpt = ctx.saved_tensors
        dt_softplus, n_seqs, n_ckpt_per_row, block_d, block_n, t_chunk, warps_bwd, cpb = ctx.cfg
        dfinal = rest[0] if ctx.return_final_state and rest else None
        b, L, d = x.shape
        N = A.shape[1]
        G_C, G_B = C.shape[2], B.shape[2]
        dev = x.device
        dx = torch.empty((b, L, d), device=dev, dtype=x.dtype)
        ddt = torch.empty((b, L, d), device=dev, dtype=dt.dtype)
        dz = torch.empty((b, L, d), device=dev, dtype=z.dtype) if z is not None else None
        dBp = torch.empty((b, L, G_C, N), device=dev, dtype=torch.float32)
        dC = torch.empty((b, L, G_C, N), device=dev, dtype=C.dtype)
        dA = torch.empty((n_seqs, d, N), device=dev, dtype=torch.float32)
        dD = torch.empty((n_seqs, d), device=dev, dtype=torch.float32)
        dbias = torch.empty((n_seqs, d), device=dev, dtype=torch.float32)
        dh0 = torch.empty((n_seqs, d, N), device=dev, dtype=torch.float32)
        if dfinal is not None:
            dfinal = dfinal.to(torch.float32).contiguous()
        if n_seqs > 0:
            _tiled_bwd_kernel[(n_seqs, G_C)](
                x, dt, A, B, C, D, z, dt_bias, cu, dout, dfinal, ckpt, dx, ddt, dz, dBp, dC, dA, dD, dbias, dh0,
                L, d, G_C, n_ckpt_per_row,
                *x.stride(), *dt.stride(), *_strides3(z, x), *dout.stride(), *B.stride(), *C.stride(), *A.stride(),
                N=N, CPB=cpb, BLOCK_D=block_d, BLOCK_N=block_n, T_CHUNK=t_chunk, HAS_D=D is not None,
                HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), IS_VARLEN=cu is not None,
                HAS_DFINAL=dfinal is not None, FLIP=REVERSE_SCAN == "flip", num_warps=warps_bwd,
            )  # fmt: skip
        else:  # no sequences: nothing flows anywhere
            for t in (dA, dD, dbias):
                t.zero_()
        dB = dBp.view(b, L, G_B, cpb, N).sum(3).to(B.dtype)
        return (
            dx,
            ddt,
            dA.sum(0).to(A.dtype),
            dB,
            dC,
            dD.sum(0).to(D.dtype) if D is not None else None,
            dz,
            dbias.sum(0).to(dt_bias.dtype) if dt_bias is not None else None,
            dh0.to(initial_state.dtype) if initial_state is not None else None,
            None,
            None,
            None,
        )


def selective_scan_triton_tiled(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus: bool = True,
    cu_seqlens=None,
    initial_state=None,
    return_final_state: bool = False,
):
    """Tiled Triton selective scan; same signature, semantics and fallbacks as
    :func:`m1_kernels.selective_scan.triton_scan.selective_scan_triton` (and :func:`m1_kernels.selective_scan`).

    One program per (sequence, C group): the channels per C group (``d_inner / G_C``) must be a power of two
    (else, like fp64 inputs, the reference runs). Strided ``(b, L, d_inner)`` / ``(b, L, G, N)`` views are read in
    place; gradients of x, dt, z are written contiguous.

    Example::

        >>> y, h = selective_scan_triton_tiled(  # doctest: +SKIP
        ...     x, dt, A, B, C, D, z, dt_bias, cu_seqlens=cu, return_final_state=True)
    """
    b, L, d = x.shape
    N = A.shape[1]
    group_index(d, C.shape[2], B.shape[2])  # validates the group layout
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, b, L)
    if not _supported(x, N, d // C.shape[2]):
        return selective_scan_ref(
            x, dt, A, B, C, D, z, dt_bias, dt_softplus, cu_seqlens, initial_state, return_final_state
        )
    n_seqs = b if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (n_seqs, d, N):
        raise ValueError(f"initial_state must be {(n_seqs, d, N)}, got {tuple(initial_state.shape)}")
    return TiledSelectiveScanFunction.apply(
        x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, dt_softplus, return_final_state
    )


# Same public name as triton_scan.py, so ops.py can switch modules.
selective_scan_triton = selective_scan_triton_tiled
