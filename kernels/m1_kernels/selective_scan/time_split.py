# SPDX-License-Identifier: Apache-2.0
# Time-parallel split of long documents for the selective scan (Mamba-1 recurrence, arXiv 2312.00752).
# Written for m1-suite; the maths is in README.md next to this file ("Splitting long documents").
"""Cut every document into sub-sequences of ``split`` tokens that the scan kernels run side by side.

The token-by-token kernels of :mod:`triton_scan` run one program per (sequence, channel block) and are
latency-bound: a few long documents leave most of the GPU idle. The recurrence ``h_t = a_t h_{t-1} + b_t``
is linear, so a document can be cut into pieces whose boundary states are cheap to find:

* forward: each piece j runs from a zero state (the forward kernel's ``STATE_ONLY`` pass), giving its end state
  ``hloc_j`` and ``S_j = sum of delta`` over the piece; the piece's decay is ``P_j = exp(A S_j)`` (per channel
  and state).
  Then ``h_in_{j+1} = P_j h_in_j + hloc_j`` from the document's initial state (``carry_states``), a short
  loop over the pieces of a document; the last value is the document's final state. The full forward then
  runs every piece from its ``h_in_j``.
* backward: the adjoint runs the other way, ``dh_{t-1} = a_t (dh_t + g_t C_t)``; each piece's adjoint of its
  start state from a zero adjoint at its end is ``ldh_j`` (``local_adjoints``), and the adjoint entering piece
  j from its end is ``dfin_j = ldh_{j+1} + P_{j+1} dfin_{j+1}`` from the document's final-state gradient
  (``carry_adjoints``); the last value is the gradient of the document's initial state. The full backward
  then runs every piece with its ``dfin_j``; parameter gradients are sums over pieces anyway.

Pieces are indexed like the checkpoint slots of :mod:`triton_scan`: piece k of document i is
``start_i // split + i + k``. These ranges never overlap, so the offsets (:func:`piece_offsets`) are built on
the device without a host sync; unused indices are empty pieces.
"""

import torch
import triton
import triton.language as tl

from m1_kernels.selective_scan.triton_scan import _and_lt
from m1_kernels.selective_scan.triton_scan import _bc_rows
from m1_kernels.selective_scan.triton_scan import _channel_block
from m1_kernels.selective_scan.triton_scan import _seq_bounds
from m1_kernels.triton_math import exp
from m1_kernels.triton_math import sigmoid
from m1_kernels.triton_math import softplus


def piece_offsets(cu_seqlens: torch.Tensor, n_tokens: int, split: int) -> torch.Tensor:
    """``(n_pieces + 1,)`` int32 offsets of the pieces, ``n_pieces = n_tokens // split + docs``.

    Piece ``cu[i] // split + i + k`` (k < ceil(len_i / split)) starts at ``cu[i] + k * split``; every other index
    is an empty piece at the next piece's start, so the offsets are non-decreasing and each real piece ends where
    the next real one starts (or at its document's end). All device ops: no host sync.

    Example::

        >>> piece_offsets(torch.tensor([0, 5, 5, 12]), 12, 4).tolist()
        [0, 4, 5, 5, 9, 12, 12]
    """
    dev = cu_seqlens.device
    cu = cu_seqlens.to(torch.int64)
    n_docs = cu.numel() - 1
    n_pieces = n_tokens // split + n_docs
    starts, lens = cu[:-1], cu[1:] - cu[:-1]
    k = torch.arange(n_tokens // split + 1, device=dev)
    slot = starts[:, None] // split + torch.arange(n_docs, device=dev)[:, None] + k[None, :]
    valid = k[None, :] < (lens[:, None] + split - 1) // split
    # Invalid (doc, k) pairs write into a spare last element, dropped below.
    offs = torch.full((n_pieces + 2,), n_tokens, dtype=torch.int64, device=dev)
    offs.scatter_(0, torch.where(valid, slot, n_pieces + 1).flatten(), (starts[:, None] + k[None, :] * split).flatten())
    offs = offs[: n_pieces + 1]
    # Empty pieces take the next real start: a running minimum from the right.
    return offs.flip(0).cummin(0).values.flip(0).to(torch.int32)


@triton.jit
def _pieces_of_doc(cu_ptr, pid_doc, SPLIT: tl.constexpr):
    """(first piece, number of pieces) of document ``pid_doc`` (see :func:`piece_offsets`)."""
    start = tl.load(cu_ptr + pid_doc).to(tl.int64)
    end = tl.load(cu_ptr + pid_doc + 1).to(tl.int64)
    return start // SPLIT + pid_doc, tl.cdiv(end - start, SPLIT)


@triton.jit
def _local_adjoints_kernel(
    dt_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dout_ptr, cu_ptr, ldh_ptr, d_inner, N,
    s_dt_l, s_dt_d, s_C_l, s_C_g, s_C_n, s_z_l, s_z_d, s_do_l, s_do_d, s_A_d, s_A_n,
    CPC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """Per (piece, channel block): the adjoint of the piece's start state from a zero adjoint at its end.

    ``dh <- a_t (dh + g_t C_t)`` walking back from the last token, with ``g_t = dout_t silu'(z_t)-gated`` as in
    the backward kernel (``dout_t z_t sigmoid(z_t)`` with z, ``dout_t`` without)."""
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    start, end, row, _ = _seq_bounds(cu_ptr, pid_s, 0, 0, True, 1)
    offs_d, offs_n, mask_d, mask_dn, A, bias = _channel_block(pid_d, d_inner, N, A_ptr, s_A_d, s_A_n, bias_ptr,
                                                              HAS_BIAS, BLOCK_D, BLOCK_N)  # fmt: skip
    dt_ptr += offs_d * s_dt_d
    dout_ptr += offs_d * s_do_d
    if HAS_Z:
        z_ptr += offs_d * s_z_d
    C_ptr, _, mask_c = _bc_rows(C_ptr, C_ptr, row, pid_d, offs_d, offs_n, mask_dn, 0, s_C_g, s_C_n,
                                0, s_C_g, s_C_n, N, CPC, 1, BLOCK_D)  # fmt: skip
    dh = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    # One-token software pipeline backwards: token t-1's loads are issued before token t's maths.
    m_d, m_c = _and_lt(mask_d, start, end), _and_lt(mask_c, start, end)
    dtn = tl.load(dt_ptr + (end - 1) * s_dt_l, mask=m_d, other=0.0).to(tl.float32)
    don = tl.load(dout_ptr + (end - 1) * s_do_l, mask=m_d, other=0.0).to(tl.float32)
    Cn = tl.load(C_ptr + (end - 1) * s_C_l, mask=m_c, other=0.0).to(tl.float32)
    zn = dtn
    if HAS_Z:
        zn = tl.load(z_ptr + (end - 1) * s_z_l, mask=m_d, other=0.0).to(tl.float32)
    for i in range(0, end - start):
        t = end - 1 - i
        delta, do, Ct, zt = dtn, don, Cn, zn
        m_d, m_c = _and_lt(mask_d, start, t), _and_lt(mask_c, start, t)
        dtn = tl.load(dt_ptr + (t - 1) * s_dt_l, mask=m_d, other=0.0).to(tl.float32)
        don = tl.load(dout_ptr + (t - 1) * s_do_l, mask=m_d, other=0.0).to(tl.float32)
        Cn = tl.load(C_ptr + (t - 1) * s_C_l, mask=m_c, other=0.0).to(tl.float32)
        if HAS_Z:
            zn = tl.load(z_ptr + (t - 1) * s_z_l, mask=m_d, other=0.0).to(tl.float32)
            g = do * zt * sigmoid(zt)
        else:
            g = do
        if HAS_BIAS:
            delta += bias
        if SOFTPLUS:
            delta = softplus(delta)
        dh = exp(delta[:, None] * A) * (dh + g[:, None] * Ct)
    tl.store(ldh_ptr + pid_s * d_inner * N + offs_d[:, None] * N + offs_n[None, :], dh, mask=mask_dn)


@triton.jit
def _carry_kernel(
    cu_ptr, A_ptr, dsum_ptr, local_ptr, edge_ptr, carry_ptr, doc_out_ptr, d_inner, N, s_A_d, s_A_n, s_e_s, s_e_d,
    s_e_n, SPLIT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, REVERSE: tl.constexpr,
    HAS_EDGE: tl.constexpr,
):  # fmt: skip
    """Per (document, channel block): ``c <- exp(A S_j) c + local_j`` over the document's pieces, storing the
    value entering each piece in ``carry`` and the last one in ``doc_out``.

    Forward (``REVERSE=False``): pieces in order, ``edge`` = initial states, local = end states from zero; the
    carry is each piece's initial state and the last value the document's final state. Backward: pieces last
    first, ``edge`` = final-state gradients, local = start-state adjoints from zero; the carry is each piece's
    final-state gradient and the last value the gradient of the document's initial state."""
    pid_doc = tl.program_id(0)
    pid_d = tl.program_id(1)
    first, n_pieces = _pieces_of_doc(cu_ptr, pid_doc, SPLIT)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d_inner
    mask_dn = mask_d[:, None] & (offs_n[None, :] < N)
    state_offs = offs_d[:, None] * N + offs_n[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n, mask=mask_dn, other=0.0).to(tl.float32)
    if HAS_EDGE:
        edge = edge_ptr + pid_doc * s_e_s + offs_d[:, None] * s_e_d + offs_n[None, :] * s_e_n
        c = tl.load(edge, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        c = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for k in range(0, n_pieces):
        if REVERSE:
            j = first + n_pieces - 1 - k
        else:
            j = first + k
        tl.store(carry_ptr + j * d_inner * N + state_offs, c, mask=mask_dn)
        dsum = tl.load(dsum_ptr + j * d_inner + offs_d, mask=mask_d, other=0.0)
        local = tl.load(local_ptr + j * d_inner * N + state_offs, mask=mask_dn, other=0.0)
        c = exp(dsum[:, None] * A) * c + local
    tl.store(doc_out_ptr + pid_doc * d_inner * N + state_offs, c, mask=mask_dn)


def _carry(cu, A, dsum, local, edge, n_pieces, split, block_d, block_n, reverse):
    """(per-piece carries, per-document result) of :func:`_carry_kernel`."""
    n_docs, (d, N) = cu.numel() - 1, A.shape
    carry = torch.zeros((n_pieces, d, N), device=A.device, dtype=torch.float32)
    doc_out = torch.empty((n_docs, d, N), device=A.device, dtype=torch.float32)
    _carry_kernel[(n_docs, triton.cdiv(d, block_d))](
        cu, A, dsum, local, edge, carry, doc_out, d, N, *A.stride(), *(edge.stride() if edge is not None else (0,) * 3),
        SPLIT=split, BLOCK_D=block_d, BLOCK_N=block_n, REVERSE=reverse, HAS_EDGE=edge is not None, num_warps=1,
    )  # fmt: skip
    return carry, doc_out


def carry_states(cu, A, dsum, hloc, h0, split, block_d, block_n):
    """``(h_in (pieces, d, N), final (docs, d, N))`` from the pieces' end states from zero (``hloc``) and sums of
    delta (``dsum``), both from the forward kernel's local pass: every piece's initial state and each document's
    final state."""
    return _carry(cu, A, dsum, hloc, h0, hloc.shape[0], split, block_d, block_n, reverse=False)


def piece_final_grads(dt, A, C, z, dt_bias, dt_softplus, dout, cu, pieces, dsum, dfinal, split, meta, num_warps):
    """``(dfin (pieces, d, N), dh0 (docs, d, N))``: the adjoint entering every piece from its end, and the gradient
    of each document's initial state."""
    n_pieces, (d, N) = pieces.numel() - 1, A.shape
    ldh = torch.empty((n_pieces, d, N), device=dt.device, dtype=torch.float32)
    zs = z.stride()[1:] if z is not None else (0, 0)
    _local_adjoints_kernel[(n_pieces, triton.cdiv(d, meta["BLOCK_D"]))](
        dt, A, C, z, dt_bias, dout, pieces, ldh, d, N, *dt.stride()[1:], *C.stride()[1:], *zs, *dout.stride()[1:],
        *A.stride(), CPC=meta["CPC"], BLOCK_D=meta["BLOCK_D"], BLOCK_N=meta["BLOCK_N"], HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), num_warps=num_warps,
    )  # fmt: skip
    return _carry(cu, A, dsum, ldh, dfinal, n_pieces, split, meta["BLOCK_D"], meta["BLOCK_N"], reverse=True)
