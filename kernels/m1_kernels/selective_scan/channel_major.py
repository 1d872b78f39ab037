# SPDX-License-Identifier: Apache-2.0
# Selective scan (Mamba-1 recurrence, Gu & Dao 2023, arXiv 2312.00752) in the M1 GQA layout (arXiv 2504.10449).
# Written for m1-suite; the maths (recurrence, gradients) is in README.md next to this file.
"""Time-parallel selective scan on channel-major copies of the inputs (forward and backward).

The kernels in :mod:`triton_scan` walk time token by token with the ``(channels, states)`` state in registers;
every token then needs cross-thread sums over states (for ``y``, ``dx``, ``ddelta``) or over channels (for
``dB``, ``dC``). Here time is what the threads share, as in mamba-ssm's CUDA kernels: the wrapper copies
``x, dt, z`` (and ``dout``) to ``(d_inner, tokens)`` and ``B, C`` to ``(groups, N, tokens)``, so a program
holds a ``(CPC, T)`` tile of one C group's channels over ``T`` consecutive tokens, each thread a run of
consecutive tokens of one channel. For each state ``n`` (an unrolled loop) the chunk's recurrence is one
``tl.associative_scan`` along time with ``(a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2)``, seeded with the state
entering the chunk; the sum over states is a register add per state, and the channel sums of ``dB, dC`` are
one ``(CPC, T) -> (T,)`` reduction per state and chunk.

Chunk carries go through global memory: the state (forward) or adjoint (backward) entering the next chunk is
written by the thread holding the chunk's last (first) token, and read by all threads of the channel after a
barrier. Two buffers alternate so that one barrier per chunk orders the reads of a chunk before the writes of
the next. The forward also stores the state entering every chunk (the checkpoint of the backward, same slot
scheme as :mod:`triton_scan`: document ``i`` owns slots ``start_i // T + i + c``), and the backward recomputes
the chunk's states from it: one forward scan and one reverse scan per state and chunk::

    h_t  = a_t h_{t-1} + delta_t x_t B_t                 (forward scan, h_{start-1} = checkpoint)
    dh_t = g_t C_t + a_{t+1} dh_{t+1}                    (reverse scan of (a_{t+1}, g_t C_t), the last token
                                                          seeded with the adjoint carried from the next chunk)

``a_{t+1}`` is recomputed from ``dt`` loaded one token ahead (a second exp2 per element instead of a shift of
a register tile, which Triton does not have), and ``a_t h_{t-1} = h_t - delta_t x_t B_t``.

Every sequence, padded row or packed document, is a range ``[cu[i], cu[i+1])`` of the flattened tokens, so
the kernels see one layout.
"""

import torch
import triton
import triton.language as tl

from m1_kernels.selective_scan.triton_scan import _linrec_combine
from m1_kernels.selective_scan.triton_scan import _softplus

# Tokens per chunk (the tile's time extent and the checkpoint interval) and warps per program.
CM_T_CHUNK = 64
CM_NUM_WARPS = 4


@triton.jit
def _load(ptrs, mask):
    """fp32 tile, 0 outside ``mask``. The load itself is unmasked (the copies are padded so every chunk is in
    bounds): a mask that is not constant over a thread's 8-token run would split its 16-byte load into 8."""
    return tl.where(mask, tl.load(ptrs).to(tl.float32), 0.0)


@triton.jit
def _delta(dtT_ptr, offs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(dt + bias, delta) tiles; delta is 0 outside ``mask`` (so a = 1 and b = 0 there)."""
    dt_raw = _load(dtT_ptr + offs, mask)
    if HAS_BIAS:
        dt_raw += bias[:, None]
    delta = _softplus(dt_raw) if SOFTPLUS else dt_raw
    return dt_raw, tl.where(mask, delta, 0.0)


@triton.jit
def _cm_fwd_kernel(
    xT_ptr,
    dtT_ptr,
    zT_ptr,
    A_ptr,
    BT_ptr,
    CT_ptr,
    D_ptr,
    bias_ptr,
    cu_ptr,
    yT_ptr,
    carry_ptr,
    final_ptr,
    ckpt_ptr,
    n_row,
    d_inner,
    n_seqs,
    s_A_d,
    s_A_n,
    N: tl.constexpr,
    CPC: tl.constexpr,
    CPB: tl.constexpr,
    T: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    SAVE_CKPT: tl.constexpr,
):
    pid_s = tl.program_id(0)
    grp = tl.program_id(1)  # the program's C group
    start = tl.load(cu_ptr + pid_s).to(tl.int64)
    end = tl.load(cu_ptr + pid_s + 1).to(tl.int64)
    slot0 = start // T + pid_s
    offs_c = grp * CPC + tl.arange(0, CPC)
    offs_t = tl.arange(0, T)
    rows = offs_c.to(tl.int64)[:, None] * n_row  # (CPC, 1) row offsets of the (d_inner, tokens) copies
    first = offs_t[None, :] == 0
    last = offs_t[None, :] == T - 1
    bias = tl.zeros((CPC,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_c).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_c).to(tl.float32)
    # Carry buffers (2, n_seqs, d_inner, N): buffer 0 holds the initial states (or zeros) on entry.
    state = pid_s.to(tl.int64) * d_inner * N + offs_c * N
    buf_stride = n_seqs.to(tl.int64) * d_inner * N
    B_rows = BT_ptr + ((grp // CPB) * N).to(tl.int64) * n_row
    C_rows = CT_ptr + (grp * N).to(tl.int64) * n_row

    base = tl.multiple_of((start // T) * T, T)
    n_chunks = tl.cdiv(end - base, T)
    for c in range(0, n_chunks):
        cur = carry_ptr + (c % 2) * buf_stride + state
        nxt = carry_ptr + ((c + 1) % 2) * buf_stride + state
        t = base + c * T + offs_t
        mask_t = (t >= start) & (t < end)
        mask = mask_t[None, :] & (offs_c[:, None] < d_inner)
        offs = rows + t[None, :]
        bc_offs = offs_c[:, None] * 0 + t[None, :]  # B/C rows as (CPC, T) tiles: the layout of x's
        xv = _load(xT_ptr + offs, mask)
        _, delta = _delta(dtT_ptr, offs, mask, bias, HAS_BIAS, SOFTPLUS)
        dx = delta * xv
        y = tl.zeros((CPC, T), dtype=tl.float32)
        for n in tl.static_range(N):
            A2 = tl.load(A_ptr + offs_c * s_A_d + n * s_A_n).to(tl.float32) * 1.4426950408889634
            a = tl.exp2(delta * A2[:, None])
            Bn = _load(B_rows + n * n_row + bc_offs, mask)
            Cn = _load(C_rows + n * n_row + bc_offs, mask)
            h_in = tl.load(cur + n)
            if SAVE_CKPT:
                tl.store(ckpt_ptr + (slot0 + c) * d_inner * N + offs_c * N + n, h_in)
            b = dx * Bn
            b = tl.where(first, b + a * h_in[:, None], b)
            _, h = tl.associative_scan((a, b), 1, _linrec_combine)
            y += h * Cn
            # Tokens past the end have a = 1, b = 0: the last column is the state leaving the chunk. (A sum over
            # the masked row keeps h's layout; a masked store of the tile would convert it through shared memory.)
            tl.store(nxt + n, tl.sum(tl.where(last, h, 0.0), axis=1))
        if HAS_D:
            y += Dv[:, None] * xv
        if HAS_Z:
            zv = _load(zT_ptr + offs, mask)
            y = y * zv * tl.sigmoid(zv)
        tl.store(yT_ptr + offs, y.to(yT_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()
    fin = carry_ptr + (n_chunks % 2) * buf_stride + state
    for n in tl.static_range(N):
        tl.store(final_ptr + state + n, tl.load(fin + n))


@triton.jit
def _cm_bwd_kernel(
    xT_ptr,
    dtT_ptr,
    zT_ptr,
    A_ptr,
    BT_ptr,
    CT_ptr,
    D_ptr,
    bias_ptr,
    cu_ptr,
    doutT_ptr,
    ckpt_ptr,
    carry_ptr,
    dxT_ptr,
    ddtT_ptr,
    dzT_ptr,
    dBpT_ptr,
    dCT_ptr,
    dA_ptr,
    dD_ptr,
    dbias_ptr,
    dh0_ptr,
    n_row,
    d_inner,
    n_seqs,
    s_A_d,
    s_A_n,
    N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CPC: tl.constexpr,
    CPB: tl.constexpr,
    T: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
):
    pid_s = tl.program_id(0)
    grp = tl.program_id(1)
    start = tl.load(cu_ptr + pid_s).to(tl.int64)
    end = tl.load(cu_ptr + pid_s + 1).to(tl.int64)
    slot0 = start // T + pid_s
    offs_c = grp * CPC + tl.arange(0, CPC)
    offs_t = tl.arange(0, T)
    offs_n = tl.arange(0, BLOCK_N)
    rows = offs_c.to(tl.int64)[:, None] * n_row
    first = offs_t[None, :] == 0
    last = offs_t[None, :] == T - 1
    bias = tl.zeros((CPC,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_c).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_c).to(tl.float32)
    state = pid_s.to(tl.int64) * d_inner * N + offs_c * N
    buf_stride = n_seqs.to(tl.int64) * d_inner * N
    B_rows = BT_ptr + ((grp // CPB) * N).to(tl.int64) * n_row
    C_rows = CT_ptr + (grp * N).to(tl.int64) * n_row
    # dC and the per-C-group partial dB, (G_C, N, tokens) fp32: this program owns its group's rows.
    dC_rows = dCT_ptr + (grp * N).to(tl.int64) * n_row
    dB_rows = dBpT_ptr + (grp * N).to(tl.int64) * n_row
    dA_acc = tl.zeros((CPC, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((CPC,), dtype=tl.float32)
    dbias_acc = tl.zeros((CPC,), dtype=tl.float32)

    base = tl.multiple_of((start // T) * T, T)
    n_chunks = tl.cdiv(end - base, T)
    for ci in range(0, n_chunks):
        c = n_chunks - 1 - ci
        cur = carry_ptr + (ci % 2) * buf_stride + state  # adjoint entering from the chunk's end
        nxt = carry_ptr + ((ci + 1) % 2) * buf_stride + state
        t = base + c * T + offs_t
        mask_t = (t >= start) & (t < end)
        mask = mask_t[None, :] & (offs_c[:, None] < d_inner)
        offs = rows + t[None, :]
        bc_offs = offs_c[:, None] * 0 + t[None, :]  # B/C rows as (CPC, T) tiles: the layout of x's
        xv = _load(xT_ptr + offs, mask)
        dt_raw, delta = _delta(dtT_ptr, offs, mask, bias, HAS_BIAS, SOFTPLUS)
        # delta_{t+1}, 0 outside the document (a_{t+1} = 1: the carry passes through the other tokens).
        mask_next = ((t + 1 >= start) & (t + 1 < end))[None, :] & (offs_c[:, None] < d_inner)
        _, delta_next = _delta(dtT_ptr, offs + 1, mask_next, bias, HAS_BIAS, SOFTPLUS)
        dout = _load(doutT_ptr + offs, mask)
        if HAS_Z:
            zv = _load(zT_ptr + offs, mask)
            sig_z = tl.sigmoid(zv)
            g = dout * zv * sig_z  # gradient of y before the gate
        else:
            g = dout
        dx = delta * xv
        y = tl.zeros((CPC, T), dtype=tl.float32)
        dsum = tl.zeros((CPC, T), dtype=tl.float32)  # sum_n dh B
        ddelta = tl.zeros((CPC, T), dtype=tl.float32)
        for n in tl.static_range(N):
            A = tl.load(A_ptr + offs_c * s_A_d + n * s_A_n).to(tl.float32)
            A2 = A * 1.4426950408889634
            a = tl.exp2(delta * A2[:, None])
            a_next = tl.exp2(delta_next * A2[:, None])
            Bn = _load(B_rows + n * n_row + bc_offs, mask)
            Cn = _load(C_rows + n * n_row + bc_offs, mask)
            h_in = tl.load(ckpt_ptr + (slot0 + c) * d_inner * N + offs_c * N + n)
            b = dx * Bn
            _, h = tl.associative_scan((a, tl.where(first, b + a * h_in[:, None], b)), 1, _linrec_combine)
            y += h * Cn
            v = g * Cn
            v = tl.where(last, v + tl.load(cur + n)[:, None], v)
            _, dh = tl.associative_scan((a_next, v), 1, _linrec_combine, reverse=True)
            tl.store(nxt + n, tl.sum(tl.where(first, a * dh, 0.0), axis=1))
            hb = h - b  # a_t h_{t-1}
            dsum += dh * Bn
            ddelta += dh * hb * A[:, None]
            dA_n = tl.sum(dh * hb * delta, axis=1)
            dA_acc = tl.where(offs_n[None, :] == n, dA_acc + dA_n[:, None], dA_acc)
            tl.store(dC_rows + n * n_row + t, tl.sum(g * h, axis=0), mask=mask_t)
            tl.store(dB_rows + n * n_row + t, tl.sum(dh * dx, axis=0), mask=mask_t)
        ddelta += xv * dsum
        dxv = delta * dsum
        if HAS_D:
            y += Dv[:, None] * xv
            dxv += Dv[:, None] * g
            dD_acc += tl.sum(g * xv, axis=1)
        if HAS_Z:
            dz = dout * y * sig_z * (1.0 + zv * (1.0 - sig_z))
            tl.store(dzT_ptr + offs, dz.to(dzT_ptr.dtype.element_ty), mask=mask)
        if SOFTPLUS:
            # d softplus(u)/du = sigmoid(u), 1 above the threshold 20 where softplus is the identity.
            ddelta = ddelta * tl.where(dt_raw <= 20.0, tl.sigmoid(dt_raw), 1.0)
        ddelta = tl.where(mask, ddelta, 0.0)
        dbias_acc += tl.sum(ddelta, axis=1)
        tl.store(dxT_ptr + offs, dxv.to(dxT_ptr.dtype.element_ty), mask=mask)
        tl.store(ddtT_ptr + offs, ddelta.to(ddtT_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()
    fin = carry_ptr + (n_chunks % 2) * buf_stride + state
    for n in tl.static_range(N):
        tl.store(dh0_ptr + state + n, tl.load(fin + n))
    prog = pid_s.to(tl.int64) * d_inner
    mask_cn = offs_n[None, :] < N
    tl.store(dA_ptr + (prog + offs_c)[:, None] * N + offs_n[None, :], dA_acc, mask=mask_cn)
    tl.store(dD_ptr + prog + offs_c, dD_acc)
    tl.store(dbias_ptr + prog + offs_c, dbias_acc)


def _channel_major(t, n_row):
    """``(b, L, d)`` -> ``(d, n_row)``, ``(b, L, G, N)`` -> ``(G*N, n_row)``: the tokens of each channel contiguous,
    rows padded with zeros to ``n_row`` (a multiple of 16 past the last chunk, so every chunk load is in bounds
    and 16-byte aligned)."""
    b, L = t.shape[:2]
    inner = t.shape[2:]
    out = torch.empty((inner.numel(), n_row), device=t.device, dtype=t.dtype)
    out[:, b * L :].zero_()
    out[:, : b * L].view(*inner, b, L).copy_(t.permute(*range(2, t.dim()), 0, 1))
    return out


def _token_major(tT, b, L):
    """Inverse of :func:`_channel_major` for ``(d, n_row)`` -> ``(b, L, d)`` contiguous."""
    return tT[:, : b * L].view(-1, b, L).permute(1, 2, 0).contiguous()


def _row_length(n_tok, chunk):
    return triton.cdiv(n_tok, chunk) * chunk + 16


class ChannelMajorScanFunction(torch.autograd.Function):
    """Autograd wrapper of the channel-major kernels; arguments as :func:`selective_scan_channel_major`."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_state, cu, dt_softplus, return_final_state):
        b, L, d = x.shape
        N = A.shape[1]
        G_C, G_B = C.shape[2], B.shape[2]
        n_tok = b * L
        n_seqs = cu.numel() - 1
        meta = dict(N=N, CPC=d // G_C, CPB=G_C // G_B, T=CM_T_CHUNK, HAS_D=D is not None, HAS_Z=z is not None,
                    HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus))  # fmt: skip
        n_row = _row_length(n_tok, CM_T_CHUNK)
        save_ckpt = any(ctx.needs_input_grad)
        xT, dtT, BT, CT = (_channel_major(t, n_row) for t in (x, dt, B, C))
        zT = _channel_major(z, n_row) if z is not None else None
        yT = torch.empty((d, n_row), device=x.device, dtype=x.dtype)
        carry = torch.empty((2, n_seqs, d, N), device=x.device, dtype=torch.float32)
        carry[0] = initial_state if initial_state is not None else 0.0
        final = torch.empty((n_seqs, d, N), device=x.device, dtype=torch.float32)
        n_slots = n_tok // CM_T_CHUNK + n_seqs + 1
        ckpt = torch.empty((n_slots if save_ckpt else 1, d, N), device=x.device, dtype=torch.float32)
        if n_seqs > 0:
            _cm_fwd_kernel[(n_seqs, G_C)](
                xT, dtT, zT, A, BT, CT, D, dt_bias, cu, yT, carry, final, ckpt, n_row, d, n_seqs, *A.stride(),
                **meta, SAVE_CKPT=save_ckpt, num_warps=CM_NUM_WARPS,
            )  # fmt: skip
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_state, cu, ckpt)
        ctx.meta = meta
        ctx.return_final_state = return_final_state
        y = _token_major(yT, b, L)
        return (y, final) if return_final_state else y

    @staticmethod
    def backward(ctx, dout, *rest):
        x, dt, A, B, C, D, z, dt_bias, initial_state, cu, ckpt = ctx.saved_tensors
        meta = ctx.meta
        dfinal = rest[0] if ctx.return_final_state and rest else None
        b, L, d = x.shape
        N = A.shape[1]
        G_C, G_B = C.shape[2], B.shape[2]
        n_tok = b * L
        n_seqs = cu.numel() - 1
        dev = x.device
        n_row = _row_length(n_tok, meta["T"])
        xT, dtT, BT, CT, doutT = (_channel_major(t, n_row) for t in (x, dt, B, C, dout))
        zT = _channel_major(z, n_row) if z is not None else None
        dxT = torch.empty((d, n_row), device=dev, dtype=x.dtype)
        ddtT = torch.empty((d, n_row), device=dev, dtype=dt.dtype)
        dzT = torch.empty((d, n_row), device=dev, dtype=z.dtype) if z is not None else None
        dBpT = torch.empty((G_C * N, n_row), device=dev, dtype=torch.float32)
        dCT = torch.empty((G_C * N, n_row), device=dev, dtype=torch.float32)
        carry = torch.empty((2, n_seqs, d, N), device=dev, dtype=torch.float32)
        carry[0] = dfinal if dfinal is not None else 0.0
        dA = torch.empty((n_seqs, d, N), device=dev, dtype=torch.float32)
        dD = torch.empty((n_seqs, d), device=dev, dtype=torch.float32)
        dbias = torch.empty((n_seqs, d), device=dev, dtype=torch.float32)
        dh0 = torch.empty((n_seqs, d, N), device=dev, dtype=torch.float32)
        if n_seqs > 0:
            _cm_bwd_kernel[(n_seqs, G_C)](
                xT, dtT, zT, A, BT, CT, D, dt_bias, cu, doutT, ckpt, carry, dxT, ddtT, dzT, dBpT, dCT, dA, dD,
                dbias, dh0, n_row, d, n_seqs, *A.stride(), **meta, BLOCK_N=triton.next_power_of_2(N),
                num_warps=CM_NUM_WARPS,
            )  # fmt: skip
        else:
            for t in (dA, dD, dbias):
                t.zero_()
        dB = dBpT[:, :n_tok].view(G_B, meta["CPB"], N, b, L).sum(1).permute(2, 3, 0, 1).to(B.dtype)
        dC = dCT[:, :n_tok].view(G_C, N, b, L).permute(2, 3, 0, 1).to(C.dtype)
        return (
            _token_major(dxT, b, L),
            _token_major(ddtT, b, L),
            dA.sum(0).to(A.dtype),
            dB,
            dC,
            dD.sum(0).to(D.dtype) if D is not None else None,
            _token_major(dzT, b, L) if z is not None else None,
            dbias.sum(0).to(dt_bias.dtype) if dt_bias is not None else None,
            dh0.to(initial_state.dtype) if initial_state is not None else None,
            None,
            None,
            None,
        )


def selective_scan_channel_major(
    x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, cu_seqlens=None, initial_state=None,
    return_final_state=False,
):  # fmt: skip
    """The time-parallel Triton scan; arguments and returns as :func:`m1_kernels.selective_scan`.

    Example::

        >>> y = selective_scan_channel_major(x, dt, A, B, C, D, z, dt_bias)  # doctest: +SKIP
    """
    b, L, _ = x.shape
    if cu_seqlens is None:  # padded rows are the documents [r L, (r + 1) L) of the flattened tokens
        cu = torch.arange(b + 1, device=x.device, dtype=torch.int32) * L
    else:
        cu = cu_seqlens.to(device=x.device, dtype=torch.int32).contiguous()
    return ChannelMajorScanFunction.apply(
        x, dt, A, B, C, D, z, dt_bias, initial_state, cu, dt_softplus, return_final_state
    )
