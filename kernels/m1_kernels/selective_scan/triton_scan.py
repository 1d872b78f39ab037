# SPDX-License-Identifier: Apache-2.0
# Selective scan (Mamba-1 recurrence, Gu & Dao 2023, arXiv 2312.00752) in the M1 GQA layout (arXiv 2504.10449).
# Written for m1-suite; the maths (recurrence, gradients, checkpointing) is in README.md next to this file.
"""Triton selective scan, forward and backward, padded or packed (``cu_seqlens``).

Parallelisation: one program per (sequence, block of ``BLOCK_D`` channels); a sequence is a batch row
(padded), a document (packed) or a piece of one (:mod:`time_split`). The ``(BLOCK_D, N)`` fp32 state lives in
registers. The program walks the sequence token by token (sequential forward, backward), or ``TILE_T`` tokens at a
time with a parallel scan over each tile (chunked forward, used below ``SEQUENTIAL_FWD_MIN_PROGRAMS`` programs).
With many programs and N <= 16 the forward holds the state as ``(N, 32)``, one channel per thread
(``_scan_fwd_cpt_kernel``). README.md says which runs when, and why.
The GQA repeat is folded into the B/C address computation
(channel ``d`` reads C group ``d // CPC`` and B group ``d // CPC // CPB``), so no repeated B/C is ever
materialised.

Memory (M1-3B, d_inner=3072, N=16, 32768 packed tokens as 16 documents of 2048, bf16 inputs):

* forward: reads x, dt, z (3 x 201 MB), B, C (67 + 201 MB), writes y (201 MB). For the backward it also
  writes the state at every ``CHUNK``-th token of each document (fp32 ``d_inner * N * 4`` = 196 KB per
  checkpoint; ``L / CHUNK + docs`` of them = 100 MB at CHUNK=64) instead of the 6.4 GB that keeping
  every h_t would need.
* backward: per chunk (last chunk first) a program reloads the chunk's starting state, recomputes h_t
  for the chunk's tokens into a private fp32 scratch tile (``CHUNK * BLOCK_D * N * 4`` bytes per
  program, written and read back at once, so it mostly stays in L2), then walks the chunk backwards
  carrying the adjoint ``dh`` in registers. dC and the per-C-group partial dB are reduced over the
  channels of a group inside the program (``BLOCK_D`` is a multiple of ``CPC``), dA / dD / d(dt_bias)
  are accumulated in registers and written once per (sequence, channel block).

Not autotuned: block sizes come from :func:`_launch_config`, so results never depend on a timing run.
"""

import torch
import triton
import triton.language as tl

from m1_kernels.selective_scan.naive import check_cu_seqlens
from m1_kernels.selective_scan.naive import check_groups
from m1_kernels.selective_scan.naive import cu_seqlens_int32
from m1_kernels.selective_scan.naive import documents_longest_first
from m1_kernels.selective_scan.naive import selective_scan_ref
from m1_kernels.triton_math import LN2
from m1_kernels.triton_math import LOG2E
from m1_kernels.triton_math import exp
from m1_kernels.triton_math import exp2
from m1_kernels.triton_math import sigmoid
from m1_kernels.triton_math import softplus

# Tokens between two saved states. Memory: checkpoints L*d*N*4/CHUNK bytes, backward scratch
# n_programs*CHUNK*BLOCK_D*N*4 = seqs*d*N*4*CHUNK bytes; 64 balances the two for 2048-token documents.
CHUNK = 64
# Forward path choice (see README, "Two forward kernels"): the time-parallel (chunked) forward processes TILE_T
# tokens per step with a parallel scan and is throughput-bound; the sequential forward steps token by token and is
# latency-bound (its loads are prefetched one token ahead), so it only pays when there are enough (sequence, channel
# block) programs to fill the GPU. H100, bf16, one warp: M1-3B 2048-token documents, 768 programs: chunked 1.36 ms,
# sequential 1.28 ms; SmolLM2 hybrid (d_inner 576, N 16) 16k tokens: 288 programs (2048-token documents) chunked
# 0.86 vs sequential 1.25 ms, 2304 programs (256-token documents) 0.60 vs 0.39 ms. The threshold sits between.
# The chunked forward's (TILE_T, BLOCK_D, BLOCK_N) tiles spill beyond small states (N 64: 18.5 ms vs 1.26 ms), so
# it is only used up to CHUNKED_FWD_MAX_STATE state entries per program.
SEQUENTIAL_FWD_MIN_PROGRAMS = 512
CHUNKED_FWD_MAX_STATE = 256
FWD_TILE_T = 16  # tokens per step of the chunked forward (divides CHUNK); 16 beat 32 and 64 on the H100
# Warps of the sequential forward and of the backward; 0 = by state-tile size (see _launch_config).
SEQ_NUM_WARPS = 0
# Time-parallel split (time_split.py, README "Splitting long documents"): below SPLIT_BELOW_PROGRAMS (document,
# channel block) programs, documents are cut into pieces of a power-of-two length >= SPLIT_MIN_TOKENS so that there
# are about SPLIT_TARGET_PROGRAMS programs. 0 turns splitting off.
SPLIT_BELOW_PROGRAMS = 512
SPLIT_TARGET_PROGRAMS = 4096
SPLIT_MIN_TOKENS = 256
# One-channel-per-thread forward (_scan_fwd_cpt_kernel) for states up to this many entries per channel (its
# registers grow with N: h, A, B and C rows are N each per thread), with this many warps (32 channels each), from
# CPT_MIN_PROGRAMS programs of it on. It runs ~2x fewer instructions per token than the (channels, states) tile but
# is latency-bound below that (H100, M1-3B: 384 programs at 8k tokens 1.42 vs 1.30 ms; 1536 at 32k 1.79 vs 2.82 ms).
CPT_MAX_STATE = 16
CPT_WARPS = 1
CPT_MIN_PROGRAMS = 512
# Register cap of the backward kernel on CUDA from BWD_CAP_MIN_PROGRAMS (sequence, channel block) programs on
# (0: never). Its 228 registers let an SM hold 8 one-warp programs; capped at 168 it holds 12 (some spills). That pays
# once the grid has more programs than the GPU holds (H100, M1-3B, 32k tokens, 3072 programs: fwd+bwd 21.3 -> 18.2
# ms) and costs a little below (8k tokens, 768 programs: 7.07 -> 7.29 ms).
BWD_MAXNREG = 168
BWD_CAP_MIN_PROGRAMS = 2048
# Packed documents are handed to programs longest first (_program_ids); 0 keeps their order in the batch.
LONGEST_FIRST = 1


@triton.jit
def _linrec_combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2) of the linear recurrence h -> a * h + b: h -> a2 * (a1 * h + b1) + b2.
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _seq_bounds(cu_ptr, pid_s, L, n_ckpt_per_row, IS_VARLEN: tl.constexpr, CHUNK: tl.constexpr):
    """(start, end, row, first checkpoint slot) of sequence ``pid_s``.

    Packed: document i owns slots ``start_i // CHUNK + i + c`` for its chunks c < cdiv(len_i, CHUNK);
    these ranges never overlap (see README) and need no host-side prefix sum.
    """
    if IS_VARLEN:
        start = tl.load(cu_ptr + pid_s).to(tl.int64)
        end = tl.load(cu_ptr + pid_s + 1).to(tl.int64)
        row = pid_s.to(tl.int64) * 0
        slot0 = start // CHUNK + pid_s
    else:
        start = pid_s.to(tl.int64) * 0
        end = start + L
        row = start + pid_s
        slot0 = row * n_ckpt_per_row
    return start, end, row, slot0


@triton.jit
def _program_ids(order_ptr, d_inner, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(sequence, channel block) of this program of the 1-D grid: all blocks of a sequence are consecutive
    programs, and packed documents come longest first (``order_ptr``, :func:`_longest_first`).

    A program's time is its document's length; the GPU starts programs roughly in grid order, so a long
    document that starts last would run on alone at the end (documents of mixed lengths, as packed
    training batches hold). Longest first is the classic cure for that tail.
    """
    n_db = tl.cdiv(d_inner, BLOCK_D)
    pid = tl.program_id(0)
    rank = pid // n_db
    pid_s = tl.load(order_ptr + rank) if IS_VARLEN else rank
    return pid_s, pid % n_db


@triton.jit
def _and_lt(mask, a, b):
    """``mask & (a < b)`` for scalars a, b, broadcast to the mask's shape first (the interpreter rejects scalar
    masks)."""
    return mask & ((mask.to(tl.int64) * 0 + a) < b)


@triton.jit
def _bc_rows(B_ptr, C_ptr, row, pid_d, offs_d, offs_n, mask_dn, s_B_b, s_B_g, s_B_n, s_C_b, s_C_g, s_C_n, N,
             CPC: tl.constexpr, CPB: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """Pointers to the B and C rows of the program's channels at token 0 of ``row``, and their load mask.

    When the block is exactly one C group (M1-3B: 16 channels per group), all its channels read the same B and C
    rows, so they are loaded once per token as (1, BLOCK_N) and broadcast: a sixteenth of the address arithmetic
    and load instructions of the (BLOCK_D, BLOCK_N) gather used when a block spans several groups.
    """
    if BLOCK_D == CPC:
        g = (pid_d * BLOCK_D) // CPC
        n = offs_n[None, :]
        return B_ptr + row * s_B_b + (g // CPB) * s_B_g + n * s_B_n, C_ptr + row * s_C_b + g * s_C_g + n * s_C_n, n < N
    else:
        c_grp = offs_d // CPC
        B_rows = B_ptr + row * s_B_b + (c_grp // CPB)[:, None] * s_B_g + offs_n[None, :] * s_B_n
        return B_rows, C_ptr + row * s_C_b + c_grp[:, None] * s_C_g + offs_n[None, :] * s_C_n, mask_dn


@triton.jit
def _group_sum(v, GPB: tl.constexpr, CPC: tl.constexpr, BLOCK_N: tl.constexpr):
    """(GPB, BLOCK_N) sums of a (GPB * CPC, BLOCK_N) tile over the CPC channels of each C group. One group is a
    plain column sum: no reshape, whose layout conversion goes through shared memory."""
    if GPB == 1:
        return tl.sum(v, axis=0)[None, :]
    else:
        return tl.sum(tl.reshape(v, (GPB, CPC, BLOCK_N)), axis=1)


@triton.jit
def _channel_block(pid_d, d_inner, N, A_ptr, s_A_d, s_A_n, bias_ptr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr):  # fmt: skip
    """Channel / state offsets and masks of channel block ``pid_d`` in the (BLOCK_D, BLOCK_N) layout, its fp32 A
    tile and dt bias (zeros without a bias)."""
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d_inner
    mask_dn = mask_d[:, None] & (offs_n[None, :] < N)
    A = tl.load(A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n, mask=mask_dn, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return offs_d, offs_n, mask_d, mask_dn, A, bias


@triton.jit
def _skip_and_gate(y, xt, zt, Dv, HAS_D: tl.constexpr, HAS_Z: tl.constexpr):
    """``(y + D x) * silu(z)``, each term only when present."""
    if HAS_D:
        y += Dv * xt
    if HAS_Z:
        y = y * zt * sigmoid(zt)
    return y


@triton.jit
def _recurrence_loads(x_ptr, dt_ptr, B_ptr, t, s_x_l, s_dt_l, s_B_l, mask_d, mask_bc):
    """fp32 x_t, dt_t (BLOCK_D,) and B_t of one token: what the state update needs. The pointers already point at
    the program's channels; B's are those of :func:`_bc_rows` (B_t is then (1, BLOCK_N) or (BLOCK_D, BLOCK_N))."""
    xt = tl.load(x_ptr + t * s_x_l, mask=mask_d, other=0.0).to(tl.float32)
    dtt = tl.load(dt_ptr + t * s_dt_l, mask=mask_d, other=0.0).to(tl.float32)
    Bt = tl.load(B_ptr + t * s_B_l, mask=mask_bc, other=0.0).to(tl.float32)
    return xt, dtt, Bt


@triton.jit
def _token_loads(
    x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, t, s_x_l, s_dt_l, s_B_l, s_C_l, s_z_l, mask_d, mask_bc, HAS_Z: tl.constexpr
):
    """:func:`_recurrence_loads` plus C_t (shaped like B_t) and z_t (zeros without z): one token's inputs."""
    xt, dtt, Bt = _recurrence_loads(x_ptr, dt_ptr, B_ptr, t, s_x_l, s_dt_l, s_B_l, mask_d, mask_bc)
    Ct = tl.load(C_ptr + t * s_C_l, mask=mask_bc, other=0.0).to(tl.float32)
    if HAS_Z:
        zt = tl.load(z_ptr + t * s_z_l, mask=mask_d, other=0.0).to(tl.float32)
    else:
        zt = xt * 0.0
    return xt, dtt, Bt, Ct, zt


@triton.jit
def _scratch_prev(scr_ptr, rel, h_start, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """h_{t-1} for the token at ``rel = t - cs`` of a chunk: scratch row ``rel - 1``, the chunk's starting state
    at ``rel == 0`` (and nothing is read for ``rel < 0``, past the chunk's start)."""
    # (the interpreter rejects scalar masks, so the condition is broadcast to a tile first)
    inside = (tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.int32) + rel) > 0
    h_prev = tl.load(scr_ptr + (rel - 1) * (BLOCK_D * BLOCK_N), mask=inside, other=0.0)
    return tl.where(inside, h_prev, h_start)


@triton.jit
def _load_td(ptr, t, offs_d, s_l, s_d, mask):
    """(T, BLOCK_D) fp32 tile of a (b, L, d) tensor (``ptr`` already at the row)."""
    return tl.load(ptr + t[:, None] * s_l + offs_d[None, :] * s_d, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_group_tile(ptr, t, grp, offs_n, s_l, s_g, s_n, mask_t, mask_n, mask_dn, ONE_GROUP: tl.constexpr):
    """B or C rows of the block's channels for tokens ``t``: (T, 1, BLOCK_N) when all BLOCK_D channels share one
    group (``grp`` is then the scalar group), else a (T, BLOCK_D, BLOCK_N) gather (``grp`` per channel)."""
    if ONE_GROUP:
        p = ptr + grp * s_g + t[:, None] * s_l + offs_n[None, :] * s_n
        return tl.expand_dims(tl.load(p, mask=mask_t[:, None] & mask_n[None, :], other=0.0).to(tl.float32), 1)
    else:
        p = ptr + t[:, None, None] * s_l + grp[None, :, None] * s_g + offs_n[None, None, :] * s_n
        return tl.load(p, mask=mask_t[:, None, None] & mask_dn[None, :, :], other=0.0).to(tl.float32)


@triton.jit
def _chunk_states(
    x_ptr,
    dt_ptr,
    B_ptr,
    t,
    offs_d,
    offs_n,
    b_grp,
    A,
    bias,
    h_in,
    mask_t,
    mask_d,
    mask_n,
    mask_dn,
    s_x_l,
    s_x_d,
    s_dt_l,
    s_dt_d,
    s_B_l,
    s_B_g,
    s_B_n,
    ONE_GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
):
    """States h_t (T, BLOCK_D, BLOCK_N) of one chunk from the state ``h_in`` entering it, by a parallel scan.

    Also returns x_t, the raw dt_t (+ bias), delta_t (T, BLOCK_D) and b_t = delta_t x_t B_t. Steps past the
    document end get delta = 0, x = 0: a = 1, b = 0, so they carry the last state unchanged.
    """
    mask_td = mask_t[:, None] & mask_d[None, :]
    xt = _load_td(x_ptr, t, offs_d, s_x_l, s_x_d, mask_td)
    dt_raw = _load_td(dt_ptr, t, offs_d, s_dt_l, s_dt_d, mask_td)
    if HAS_BIAS:
        dt_raw += bias[None, :]
    if SOFTPLUS:
        delta = softplus(dt_raw)
    else:
        delta = dt_raw
    delta = tl.where(mask_td, delta, 0.0)
    Bt = _load_group_tile(B_ptr, t, b_grp, offs_n, s_B_l, s_B_g, s_B_n, mask_t, mask_n, mask_dn, ONE_GROUP)
    a = exp(delta[:, :, None] * A[None, :, :])
    b = (delta * xt)[:, :, None] * Bt
    a_cum, h_loc = tl.associative_scan((a, b), 0, _linrec_combine)
    h = h_loc + a_cum * h_in[None, :, :]
    return h, xt, dt_raw, delta, Bt, b


@triton.jit
def _scan_fwd_chunked_kernel(
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
    order_ptr,
    out_ptr,
    final_ptr,
    ckpt_ptr,
    L,
    d_inner,
    N,
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
    CPC: tl.constexpr,
    CPB: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
    TILE_T: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_H0: tl.constexpr,
    SAVE_CKPT: tl.constexpr,
):
    pid_s, pid_d = _program_ids(order_ptr, d_inner, BLOCK_D, IS_VARLEN)
    start, end, row, slot0 = _seq_bounds(cu_ptr, pid_s, L, n_ckpt_per_row, IS_VARLEN, CHUNK)
    ONE_GROUP: tl.constexpr = BLOCK_D <= CPC
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, TILE_T)
    CKPT_EVERY: tl.constexpr = CHUNK // TILE_T  # tiles per checkpoint interval
    mask_d = offs_d < d_inner
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    if ONE_GROUP:
        c_grp = (pid_d * BLOCK_D) // CPC
    else:
        c_grp = offs_d // CPC
    b_grp = c_grp // CPB

    A = tl.load(A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n, mask=mask_dn, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_H0:
        h = tl.load(
            h0_ptr + pid_s * s_h0_s + offs_d[:, None] * s_h0_d + offs_n[None, :] * s_h0_n, mask=mask_dn, other=0.0
        ).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)

    x_ptr += row * s_x_b
    dt_ptr += row * s_dt_b
    if HAS_Z:
        z_ptr += row * s_z_b
    out_ptr += row * s_o_b
    B_ptr += row * s_B_b
    C_ptr += row * s_C_b
    ck_ptr = ckpt_ptr + offs_d[:, None] * N + offs_n[None, :]

    n_tiles = tl.cdiv(end - start, TILE_T)
    for c in range(0, n_tiles):
        if SAVE_CKPT:
            # State entering checkpoint interval c // CKPT_EVERY (the interpreter rejects scalar masks: a tile mask).
            first = (tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.int64) + c % CKPT_EVERY) == 0
            tl.store(ck_ptr + (slot0 + c // CKPT_EVERY) * d_inner * N, h, mask=mask_dn & first)
        t = start + c * TILE_T + offs_t
        mask_t = t < end
        mask_td = mask_t[:, None] & mask_d[None, :]
        hs, xt, dt_raw, delta, Bt, b = _chunk_states(
            x_ptr, dt_ptr, B_ptr, t, offs_d, offs_n, b_grp, A, bias, h, mask_t, mask_d, mask_n, mask_dn,
            s_x_l, s_x_d, s_dt_l, s_dt_d, s_B_l, s_B_g, s_B_n, ONE_GROUP, HAS_BIAS, SOFTPLUS,
        )  # fmt: skip
        Ct = _load_group_tile(C_ptr, t, c_grp, offs_n, s_C_l, s_C_g, s_C_n, mask_t, mask_n, mask_dn, ONE_GROUP)
        y = tl.sum(hs * Ct, axis=2)
        if HAS_D:
            y += Dv[None, :] * xt
        if HAS_Z:
            zt = _load_td(z_ptr, t, offs_d, s_z_l, s_z_d, mask_td)
            y = y * zt * sigmoid(zt)
        tl.store(out_ptr + t[:, None] * s_o_l + offs_d[None, :] * s_o_d, y.to(out_ptr.dtype.element_ty), mask=mask_td)
        # State after the tile: its last row (steps past the document end leave the state unchanged).
        h = tl.sum(tl.where((offs_t == TILE_T - 1)[:, None, None], hs, 0.0), axis=0)

    tl.store(final_ptr + pid_s * d_inner * N + offs_d[:, None] * N + offs_n[None, :], h, mask=mask_dn)


@triton.jit
def _scan_fwd_kernel(
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
    order_ptr,
    out_ptr,
    final_ptr,
    ckpt_ptr,
    L,
    d_inner,
    N,
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
    CPC: tl.constexpr,
    CPB: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_H0: tl.constexpr,
    SAVE_CKPT: tl.constexpr,
):
    pid_s, pid_d = _program_ids(order_ptr, d_inner, BLOCK_D, IS_VARLEN)
    start, end, row, slot0 = _seq_bounds(cu_ptr, pid_s, L, n_ckpt_per_row, IS_VARLEN, CHUNK)
    offs_d, offs_n, mask_d, mask_dn, A, bias = _channel_block(pid_d, d_inner, N, A_ptr, s_A_d, s_A_n, bias_ptr,
                                                              HAS_BIAS, BLOCK_D, BLOCK_N)  # fmt: skip
    A2 = A * LOG2E  # exp(delta A) = exp2(delta A2)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_H0:
        h = tl.load(
            h0_ptr + pid_s * s_h0_s + offs_d[:, None] * s_h0_d + offs_n[None, :] * s_h0_n, mask=mask_dn, other=0.0
        ).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)

    x_ptr += row * s_x_b + offs_d * s_x_d
    dt_ptr += row * s_dt_b + offs_d * s_dt_d
    if HAS_Z:
        z_ptr += row * s_z_b + offs_d * s_z_d
    out_ptr += row * s_o_b + offs_d * s_o_d
    B_ptr, C_ptr, mask_bc = _bc_rows(B_ptr, C_ptr, row, pid_d, offs_d, offs_n, mask_dn, s_B_b, s_B_g, s_B_n,
                                     s_C_b, s_C_g, s_C_n, N, CPC, CPB, BLOCK_D)  # fmt: skip
    ck_ptr = ckpt_ptr + offs_d[:, None] * N + offs_n[None, :]

    # Software pipeline: the loop is latency-bound (each token waits for its global loads), so token t+1's
    # loads are issued before token t's arithmetic and their latency overlaps it. Past the end they are masked.
    xn, dn, Bn, Cn, zn = _token_loads(x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, start, s_x_l, s_dt_l, s_B_l,
                                      s_C_l, s_z_l, _and_lt(mask_d, start, end),
                                      _and_lt(mask_bc, start, end), HAS_Z)  # fmt: skip
    for t in range(start, end):
        xt, delta, Bt, Ct, zt = xn, dn, Bn, Cn, zn
        xn, dn, Bn, Cn, zn = _token_loads(x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, t + 1, s_x_l, s_dt_l,
                                          s_B_l, s_C_l, s_z_l, _and_lt(mask_d, t + 1, end),
                                          _and_lt(mask_bc, t + 1, end), HAS_Z)  # fmt: skip
        if SAVE_CKPT:
            # State entering chunk (t - start) // CHUNK; a masked-off store costs no memory traffic.
            rel = t - start
            # (the interpreter rejects scalar masks, so the condition is broadcast to a tile first)
            at_boundary = (tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.int64) + rel % CHUNK) == 0
            tl.store(ck_ptr + (slot0 + rel // CHUNK) * d_inner * N, h, mask=mask_dn & at_boundary)
        if HAS_BIAS:
            delta += bias
        if SOFTPLUS:
            delta = softplus(delta)
        h = exp2(delta[:, None] * A2) * h + (delta * xt)[:, None] * Bt
        y = _skip_and_gate(tl.sum(h * Ct, axis=1), xt, zt, Dv, HAS_D, HAS_Z)
        tl.store(out_ptr + t * s_o_l, y.to(out_ptr.dtype.element_ty), mask=mask_d)

    tl.store(final_ptr + pid_s * d_inner * N + offs_d[:, None] * N + offs_n[None, :], h, mask=mask_dn)


@triton.jit
def _load_f32(ptr, mask, EVEN: tl.constexpr):
    """fp32 load; unmasked when ``EVEN`` (the caller then passes ``mask=None``)."""
    if EVEN:
        return tl.load(ptr).to(tl.float32)
    else:
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _cpt_loads(x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, t, s_x_l, s_dt_l, s_B_l, s_C_l, s_z_l, b_offs, c_offs, mask_d,
               mask_nd, EVEN: tl.constexpr, LOAD_Z: tl.constexpr, LOAD_C: tl.constexpr):  # fmt: skip
    """fp32 inputs of token ``t`` in the one-channel-per-thread layout: x, dt, z (BLOCK_D,), B and C (BLOCK_N,
    BLOCK_D) (C and z zeros unless asked for)."""
    xt = _load_f32(x_ptr + t * s_x_l, mask_d, EVEN)
    dtt = _load_f32(dt_ptr + t * s_dt_l, mask_d, EVEN)
    Bt = _load_f32(B_ptr + t * s_B_l + b_offs, mask_nd, EVEN)
    Ct = Bt * 0.0
    zt = xt * 0.0
    if LOAD_C:
        Ct = _load_f32(C_ptr + t * s_C_l + c_offs, mask_nd, EVEN)
    if LOAD_Z:
        zt = _load_f32(z_ptr + t * s_z_l, mask_d, EVEN)
    return xt, dtt, Bt, Ct, zt


@triton.jit(do_not_specialize=["s_B_n", "s_C_n", "s_A_n"])
def _scan_fwd_cpt_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, cu_ptr, order_ptr, out_ptr, final_ptr,
    ckpt_ptr, dsum_ptr, L, d_inner, N, n_ckpt_per_row, s_x_b, s_x_l, s_x_d, s_dt_b, s_dt_l, s_dt_d, s_z_b, s_z_l,
    s_z_d, s_o_b, s_o_l, s_o_d, s_B_b, s_B_l, s_B_g, s_B_n, s_C_b, s_C_l, s_C_g, s_C_n, s_A_d, s_A_n, s_h0_s,
    s_h0_d, s_h0_n, CPC: tl.constexpr, CPB: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_H0: tl.constexpr, SAVE_CKPT: tl.constexpr, EVEN: tl.constexpr,
    STATE_ONLY: tl.constexpr,
):  # fmt: skip
    """Sequential forward, one channel per thread: the state is a (BLOCK_N, BLOCK_D) tile whose BLOCK_N states of a
    channel sit in one thread's registers, so y's sum over states is in-thread adds (no shuffles).

    The strides along N are not specialised (``do_not_specialize``): were the compiler to see B/C/A contiguous
    along N it would spread N over the threads (to vectorise those loads) and every sum over states would become
    warp shuffles. Each thread gathers its group's B and C rows (the lanes of a group read the same bytes).
    ``EVEN``: every channel and state of every block is real, so no masks. ``STATE_ONLY``: no outputs, only the
    final state and each channel's sum of delta (``dsum``), for the pieces of :mod:`time_split`.
    """
    pid_s, pid_d = _program_ids(order_ptr, d_inner, BLOCK_D, IS_VARLEN)
    start, end, row, slot0 = _seq_bounds(cu_ptr, pid_s, L, n_ckpt_per_row, IS_VARLEN, CHUNK)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    if EVEN:
        mask_d = None
        mask_nd = None
    else:
        mask_d = offs_d < d_inner
        mask_nd = (offs_n[:, None] < N) & mask_d[None, :]
    state_offs = offs_d[None, :] * N + offs_n[:, None]
    # exp(delta A) = exp2(delta (A log2 e)): fold the constant into A once.
    A2 = _load_f32(A_ptr + offs_d[None, :] * s_A_d + offs_n[:, None] * s_A_n, mask_nd, EVEN)
    A2 = A2 * LOG2E
    if HAS_BIAS:
        bias = _load_f32(bias_ptr + offs_d, mask_d, EVEN)
    if HAS_D:
        Dv = _load_f32(D_ptr + offs_d, mask_d, EVEN)
    if HAS_H0:
        h0_offs = offs_d[None, :] * s_h0_d + offs_n[:, None] * s_h0_n
        h = _load_f32(h0_ptr + pid_s * s_h0_s + h0_offs, mask_nd, EVEN)
    else:
        h = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    c_grp = offs_d // CPC
    # Loop-invariant int32 offsets; per token only the row base moves.
    b_offs = (c_grp // CPB)[None, :] * s_B_g + offs_n[:, None] * s_B_n
    c_offs = c_grp[None, :] * s_C_g + offs_n[:, None] * s_C_n
    x_ptr += row * s_x_b + offs_d * s_x_d
    dt_ptr += row * s_dt_b + offs_d * s_dt_d
    if HAS_Z:
        z_ptr += row * s_z_b + offs_d * s_z_d
    out_ptr += row * s_o_b + offs_d * s_o_d
    B_ptr += row * s_B_b
    C_ptr += row * s_C_b
    dsum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # One-token software pipeline: token t+1's loads are issued before token t's maths (the loop is latency-bound
    # otherwise). Prefetch indices are clamped into the sequence (and to token 0 for an empty one; the caller never
    # launches on an empty input), so no load reads out of bounds and none needs a time mask.
    t0 = tl.maximum(tl.minimum(start, end - 1), 0)
    xn, dn, Bn, Cn, zn = _cpt_loads(x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, t0, s_x_l, s_dt_l, s_B_l, s_C_l, s_z_l,
                                    b_offs, c_offs, mask_d, mask_nd, EVEN, HAS_Z and not STATE_ONLY,
                                    not STATE_ONLY)  # fmt: skip
    for t in range(start, end):
        xt, delta, Bt, Ct, zt = xn, dn, Bn, Cn, zn
        tn = tl.minimum(t + 1, end - 1)
        xn, dn, Bn, Cn, zn = _cpt_loads(x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, tn, s_x_l, s_dt_l, s_B_l, s_C_l, s_z_l,
                                        b_offs, c_offs, mask_d, mask_nd, EVEN, HAS_Z and not STATE_ONLY,
                                        not STATE_ONLY)  # fmt: skip
        if SAVE_CKPT and not STATE_ONLY:
            rel = t - start
            if rel % CHUNK == 0:  # state entering checkpoint interval rel // CHUNK
                tl.store(ckpt_ptr + (slot0 + rel // CHUNK) * d_inner * N + state_offs, h, mask=mask_nd)
        if HAS_BIAS:
            delta += bias
        if SOFTPLUS:
            delta = softplus(delta)
        h = exp2(delta[None, :] * A2) * h + (delta * xt)[None, :] * Bt
        if STATE_ONLY:
            dsum += delta
        else:
            y = _skip_and_gate(tl.sum(h * Ct, axis=0), xt, zt, Dv, HAS_D, HAS_Z)
            tl.store(out_ptr + t * s_o_l, y.to(out_ptr.dtype.element_ty), mask=mask_d)
    tl.store(final_ptr + pid_s * d_inner * N + state_offs, h, mask=mask_nd)
    if STATE_ONLY:
        tl.store(dsum_ptr + pid_s * d_inner + offs_d, dsum, mask=mask_d)


@triton.jit
def _scan_bwd_kernel(
    x_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    cu_ptr,
    order_ptr,
    dout_ptr,
    dfinal_ptr,
    ckpt_ptr,
    scratch_ptr,
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
    N,
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
    CPC: tl.constexpr,
    CPB: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
):
    pid_s, pid_d = _program_ids(order_ptr, d_inner, BLOCK_D, IS_VARLEN)
    start, end, row, slot0 = _seq_bounds(cu_ptr, pid_s, L, n_ckpt_per_row, IS_VARLEN, CHUNK)
    GPB: tl.constexpr = BLOCK_D // CPC  # C groups per channel block
    offs_d, offs_n, mask_d, mask_dn, A, bias = _channel_block(pid_d, d_inner, N, A_ptr, s_A_d, s_A_n, bias_ptr,
                                                              HAS_BIAS, BLOCK_D, BLOCK_N)  # fmt: skip
    # Only A log2(e) is kept: exp(delta A) = exp2(delta A2), and sum(da A) = ln(2) sum(da A2) (a multiply per
    # channel instead of one per state entry).
    A2 = A * LOG2E
    offs_g = pid_d * GPB + tl.arange(0, GPB)
    mask_gn = (offs_g[:, None] < G_C) & (offs_n[None, :] < N)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    state_offs = offs_d[:, None] * N + offs_n[None, :]
    if HAS_DFINAL:
        dh = tl.load(dfinal_ptr + pid_s * d_inner * N + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        dh = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)

    x_ptr += row * s_x_b + offs_d * s_x_d
    dt_ptr += row * s_dt_b + offs_d * s_dt_d
    if HAS_Z:
        z_ptr += row * s_z_b + offs_d * s_z_d
    dout_ptr += row * s_do_b + offs_d * s_do_d
    B_ptr, C_ptr, mask_bc = _bc_rows(B_ptr, C_ptr, row, pid_d, offs_d, offs_n, mask_dn, s_B_b, s_B_g, s_B_n,
                                     s_C_b, s_C_g, s_C_n, N, CPC, CPB, BLOCK_D)  # fmt: skip
    # Gradients of the (b, L, d) tensors are written contiguous; dC / dB partials are (b, L, G_C, N) fp32.
    grad_off = row * L * d_inner + offs_d
    g_off = row * L * G_C * N + offs_g[:, None] * N + offs_n[None, :]
    # Private scratch tile of this program: CHUNK states of (BLOCK_D, BLOCK_N), fp32, contiguous.
    pid_lin = tl.program_id(0)  # one program per (sequence, channel block): a private tile each
    scr_ptr = (
        scratch_ptr
        + pid_lin.to(tl.int64) * (CHUNK * BLOCK_D * BLOCK_N)
        + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N
        + offs_n[None, :]
    )

    n_chunks = tl.cdiv(end - start, CHUNK)
    for ci in range(0, n_chunks):
        c = n_chunks - 1 - ci
        cs = start + c * CHUNK
        ce = tl.minimum(cs + CHUNK, end)
        h_start = tl.load(ckpt_ptr + (slot0 + c) * d_inner * N + state_offs, mask=mask_dn, other=0.0)
        # Make sure every thread is done reading the previous chunk's scratch before it is overwritten.
        tl.debug_barrier()
        # 1) Recompute h_cs .. h_{ce-1} from the checkpoint, keeping them in the scratch tile.
        # (Software-pipelined like the sequential forward: token t+1's loads are issued before token t's maths.)
        h = h_start
        xn, dn, Bn = _recurrence_loads(x_ptr, dt_ptr, B_ptr, cs, s_x_l, s_dt_l, s_B_l, mask_d, mask_bc)
        for t in range(cs, ce):
            xt, delta, Bt = xn, dn, Bn
            xn, dn, Bn = _recurrence_loads(x_ptr, dt_ptr, B_ptr, t + 1, s_x_l, s_dt_l, s_B_l,
                                           _and_lt(mask_d, t + 1, ce), _and_lt(mask_bc, t + 1, ce))  # fmt: skip
            if HAS_BIAS:
                delta += bias
            if SOFTPLUS:
                delta = softplus(delta)
            h = exp2(delta[:, None] * A2) * h + (delta * xt)[:, None] * Bt
            tl.store(scr_ptr + (t - cs) * (BLOCK_D * BLOCK_N), h)
        # Scratch written by one thread is read by another below: a CTA barrier orders them.
        tl.debug_barrier()
        # 2) Walk the chunk backwards. h_cur = h_t; h_prev = h_{t-1} (the checkpoint at t == cs).
        # Token t-1's loads (inputs and h_{t-2} from the scratch) are issued before token t's maths.
        h_cur = h
        xn, dn, Bn, Cn, zn = _token_loads(
            x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, ce - 1, s_x_l, s_dt_l, s_B_l, s_C_l, s_z_l, mask_d, mask_bc, HAS_Z
        )
        don = tl.load(dout_ptr + (ce - 1) * s_do_l, mask=mask_d, other=0.0).to(tl.float32)
        hpn = _scratch_prev(scr_ptr, ce - 1 - cs, h_start, BLOCK_D, BLOCK_N)
        for i in range(0, ce - cs):
            t = ce - 1 - i
            xt, dt_raw, Bt, Ct, zt, do, h_prev = xn, dn, Bn, Cn, zn, don, hpn
            xn, dn, Bn, Cn, zn = _token_loads(x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, t - 1, s_x_l, s_dt_l,
                                              s_B_l, s_C_l, s_z_l, _and_lt(mask_d, cs, t),
                                              _and_lt(mask_bc, cs, t), HAS_Z)  # fmt: skip
            don = tl.load(dout_ptr + (t - 1) * s_do_l, mask=_and_lt(mask_d, cs, t), other=0.0).to(tl.float32)
            hpn = _scratch_prev(scr_ptr, t - 1 - cs, h_start, BLOCK_D, BLOCK_N)
            if HAS_BIAS:
                dt_raw += bias
            if SOFTPLUS:
                delta = softplus(dt_raw)
            else:
                delta = dt_raw
            a = exp2(delta[:, None] * A2)
            if HAS_Z:
                sig = sigmoid(zt)
                y_pre = tl.sum(h_cur * Ct, axis=1)
                if HAS_D:
                    y_pre += Dv * xt
                dz = do * y_pre * sig * (1.0 + zt * (1.0 - sig))
                tl.store(dz_ptr + grad_off + t * d_inner, dz.to(dz_ptr.dtype.element_ty), mask=mask_d)
                g = do * zt * sig
            else:
                g = do
            # Adjoint of h_t: from y_t, plus a_{t+1} * adjoint of h_{t+1} (already in dh).
            dh += g[:, None] * Ct
            # dC_t[group] = sum over the group's channels of g_t[d] * h_t[d, :].
            dC_t = _group_sum(g[:, None] * h_cur, GPB, CPC, BLOCK_N)
            tl.store(dC_ptr + g_off + t * (G_C * N), dC_t, mask=mask_gn)
            # dB_t (per C group; the wrapper sums the CPB C groups of each B group).
            dB_t = _group_sum(dh * (delta * xt)[:, None], GPB, CPC, BLOCK_N)
            tl.store(dBp_ptr + g_off + t * (G_C * N), dB_t, mask=mask_gn)
            dhB = tl.sum(dh * Bt, axis=1)
            dx = dhB * delta
            if HAS_D:
                dx += g * Dv
                dD_acc += g * xt
            da = dh * h_prev * a  # d loss / d(delta * A) per state entry
            ddelta = dhB * xt + tl.sum(da * A2, axis=1) * LN2
            dA_acc += da * delta[:, None]
            if SOFTPLUS:
                ddt = tl.where(dt_raw <= 20.0, ddelta * sigmoid(dt_raw), ddelta)
            else:
                ddt = ddelta
            dbias_acc += ddt
            tl.store(dx_ptr + grad_off + t * d_inner, dx.to(dx_ptr.dtype.element_ty), mask=mask_d)
            tl.store(ddt_ptr + grad_off + t * d_inner, ddt.to(ddt_ptr.dtype.element_ty), mask=mask_d)
            dh = dh * a
            h_cur = h_prev

    # dh is now the adjoint of the initial state h_{-1}.
    tl.store(dh0_ptr + pid_s * d_inner * N + state_offs, dh, mask=mask_dn)
    tl.store(dA_ptr + pid_s * d_inner * N + state_offs, dA_acc, mask=mask_dn)
    tl.store(dD_ptr + pid_s * d_inner + offs_d, dD_acc, mask=mask_d)
    tl.store(dbias_ptr + pid_s * d_inner + offs_d, dbias_acc, mask=mask_d)


def _launch_config(cpc: int, N: int):
    """``(BLOCK_D, BLOCK_N, num_warps)``: whole C groups per program, a small state tile.

    BLOCK_D is the channels-per-C-group (16 in M1-3B) rounded up to at least 16, so the dC/dB group
    sums stay inside a program; 16x16 fp32 is 8 registers per thread for each state-sized tensor on one
    warp, leaving room for the backward's ~8 live tiles.
    """
    block_n = triton.next_power_of_2(N)
    block_d = max(cpc, 16)
    elems = block_d * block_n
    # One warp per 256 state entries (M1-3B's 16x16 tile: one warp, 1.3x faster than two on the H100 in the
    # backward at 8k and 32k tokens, where the GPU is full of programs), at most 8.
    num_warps = min(8, max(1, elems // 256))
    return block_d, block_n, SEQ_NUM_WARPS or num_warps


def _supported(x, N: int, cpc: int) -> bool:
    return (
        x.dtype in (torch.float16, torch.bfloat16, torch.float32) and cpc & (cpc - 1) == 0 and cpc <= 256 and N <= 256
    )


def _strides3(t, like):
    return t.stride() if t is not None else like.stride()


def split_length(n_tokens: int, n_docs: int, n_dblocks: int, block_n: int) -> int:
    """Piece length for :mod:`time_split` (0: do not split), from shapes only (no host sync).

    Splits when the (document, channel block) programs are fewer than ``SPLIT_BELOW_PROGRAMS`` and the documents
    are on average longer than a piece: the piece is the power of two (at least ``SPLIT_MIN_TOKENS`` and ``CHUNK``)
    that brings the programs to about ``SPLIT_TARGET_PROGRAMS``. The pieces' local pass is the one-channel-per-thread
    forward, so states above ``CPT_MAX_STATE`` are never split.
    """
    if n_docs == 0 or block_n > CPT_MAX_STATE or n_docs * n_dblocks >= min(SPLIT_BELOW_PROGRAMS, SPLIT_TARGET_PROGRAMS):
        return 0
    per_program = triton.cdiv(n_tokens * n_dblocks, SPLIT_TARGET_PROGRAMS)
    split = max(SPLIT_MIN_TOKENS, CHUNK, triton.next_power_of_2(per_program))
    return split if split < n_tokens / n_docs else 0


def _longest_first(cu):
    """Packed documents by decreasing length (int32 indices, sorted on the device: no host sync), the order in
    which :func:`_program_ids` hands them to programs; None for padded rows."""
    if cu is None:
        return None
    if not LONGEST_FIRST:
        return torch.arange(cu.numel() - 1, device=cu.device, dtype=torch.int32)
    return documents_longest_first(cu)


def _launch_fwd(x, dt, A, B, C, D, z, dt_bias, h0, cu, order, out, final, ckpt, n_seqs, n_ckpt_per_row, meta, num_warps,
                save_ckpt, dsum=None):  # fmt: skip
    """The forward kernel over ``n_seqs`` sequences (rows, or ``cu``'s documents); with ``dsum`` given, only the final
    states and sums of delta (the local pass of :mod:`time_split`)."""
    b, L, d = x.shape
    N = A.shape[1]
    args = [x, dt, A, B, C, D, z, dt_bias, h0, cu, order, out, final, ckpt]
    strides = [L, d, N, n_ckpt_per_row, *x.stride(), *dt.stride(), *_strides3(z, x), *out.stride(), *B.stride(),
               *C.stride(), *A.stride(), *(h0.stride() if h0 is not None else (0, 0, 0))]  # fmt: skip
    flags = dict(HAS_H0=h0 is not None, SAVE_CKPT=save_ckpt)
    grid = (n_seqs * triton.cdiv(d, meta["BLOCK_D"]),)  # 1-D: see _program_ids
    few_programs = grid[0] < SEQUENTIAL_FWD_MIN_PROGRAMS
    cpt_blocks = triton.cdiv(d, 32 * CPT_WARPS)
    if dsum is None and few_programs and meta["BLOCK_D"] * meta["BLOCK_N"] <= CHUNKED_FWD_MAX_STATE:
        tile_t = min(FWD_TILE_T, meta["CHUNK"])
        num_warps = max(4, min(16, tile_t * meta["BLOCK_D"] * meta["BLOCK_N"] // 1024))
        _scan_fwd_chunked_kernel[grid](*args, *strides, **meta, **flags, TILE_T=tile_t, num_warps=num_warps)
    elif meta["BLOCK_N"] <= CPT_MAX_STATE and (dsum is not None or n_seqs * cpt_blocks >= CPT_MIN_PROGRAMS):
        block_d = 32 * CPT_WARPS
        even = d % block_d == 0 and N == meta["BLOCK_N"]
        _scan_fwd_cpt_kernel[(n_seqs * triton.cdiv(d, block_d),)](
            *args, dsum, *strides, **{**meta, "BLOCK_D": block_d}, **flags, EVEN=even, STATE_ONLY=dsum is not None,
            num_warps=CPT_WARPS,
        )  # fmt: skip
    else:
        assert dsum is None, "the local pass of time_split needs the one-channel-per-thread forward"
        _scan_fwd_kernel[grid](*args, *strides, **meta, **flags, num_warps=num_warps)


class SelectiveScanFunction(torch.autograd.Function):
    """Autograd wrapper: Triton forward (saving chunk checkpoints) and Triton backward.

    Long packed documents on a GPU with idle room are cut into pieces that run side by side
    (:func:`split_length`, :mod:`m1_kernels.selective_scan.time_split`); the main kernels then see the pieces as
    their sequences, with initial states and final-state gradients carried across the cuts.
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, dt_softplus, return_final_state):
        b, L, d = x.shape
        N = A.shape[1]
        G_C, G_B = C.shape[2], B.shape[2]
        cpc, cpb = d // G_C, G_C // G_B
        block_d, block_n, num_warps = _launch_config(cpc, N)
        # Compile-time layout and options, shared by the forward and backward kernels (the checkpoint interval
        # is read once here, so both see the same one).
        meta = dict(CPC=cpc, CPB=cpb, BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=CHUNK, HAS_D=D is not None,
                    HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
                    IS_VARLEN=cu_seqlens is not None)  # fmt: skip
        save_ckpt = any(ctx.needs_input_grad)
        cu, pieces, dsum, split = None, None, None, 0
        n_ckpt_per_row = 0
        if cu_seqlens is not None:
            cu = cu_seqlens_int32(cu_seqlens, x.device)
            n_seqs = cu.numel() - 1
            split = split_length(L, n_seqs, triton.cdiv(d, block_d), block_n)
        else:
            n_seqs = b
            n_ckpt_per_row = triton.cdiv(L, CHUNK)
        final = torch.empty((n_seqs, d, N), device=x.device, dtype=torch.float32)
        out = torch.empty((b, L, d), device=x.device, dtype=x.dtype)
        run_cu, run_seqs, run_h0, run_final = cu, n_seqs, initial_state, final
        if split:
            from m1_kernels.selective_scan import time_split  # (imports this module's kernel helpers)

            pieces = time_split.piece_offsets(cu, L, split)
            run_cu, run_seqs = pieces, pieces.numel() - 1
        order = _longest_first(run_cu)  # the programs' document order, shared by every launch and the backward
        if split:
            run_final = torch.empty((run_seqs, d, N), device=x.device, dtype=torch.float32)  # end states from zero
            dsum = torch.empty((run_seqs, d), device=x.device, dtype=torch.float32)
            _launch_fwd(x, dt, A, B, C, D, z, dt_bias, None, pieces, order, out, run_final, run_final, run_seqs, 0,
                        meta, num_warps, False, dsum=dsum)  # fmt: skip
            run_h0, final = time_split.carry_states(cu, A, dsum, run_final, initial_state, split, block_d, block_n)
        n_slots = L // CHUNK + run_seqs + 1 if cu is not None else b * n_ckpt_per_row
        ckpt = torch.empty((max(n_slots, 1) if save_ckpt else 1, d, N), device=x.device, dtype=torch.float32)
        if run_seqs > 0 and L > 0:
            _launch_fwd(x, dt, A, B, C, D, z, dt_bias, run_h0, run_cu, order, out, run_final, ckpt, run_seqs,
                        n_ckpt_per_row, meta, num_warps, save_ckpt)  # fmt: skip
        elif L == 0 and initial_state is not None:  # no tokens: every final state is the initial one
            final.copy_(initial_state)
        elif L == 0:
            final.zero_()
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_state, cu, ckpt, pieces, dsum, order)
        ctx.cfg = (n_seqs, n_ckpt_per_row, num_warps, cpb, split)
        ctx.meta = meta
        ctx.return_final_state = return_final_state
        if return_final_state:
            return out, final
        return out

    @staticmethod
    def backward(ctx, dout, *rest):
        x, dt, A, B, C, D, z, dt_bias, initial_state, cu, ckpt, pieces, dsum, order = ctx.saved_tensors
        n_seqs, n_ckpt_per_row, num_warps, cpb, split = ctx.cfg
        meta = ctx.meta
        dfinal = rest[0] if ctx.return_final_state and rest else None
        b, L, d = x.shape
        N = A.shape[1]
        G_C, G_B = C.shape[2], B.shape[2]
        dev = x.device
        if dfinal is not None:
            dfinal = dfinal.to(torch.float32).contiguous()
        run_cu, run_seqs, run_dfinal = cu, n_seqs, dfinal
        if split:
            from m1_kernels.selective_scan import time_split

            run_dfinal, dh0_docs = time_split.piece_final_grads(
                dt, A, C, z, dt_bias, meta["SOFTPLUS"], dout, cu, pieces, dsum, dfinal, split, meta, num_warps
            )
            run_cu, run_seqs = pieces, pieces.numel() - 1
        n_dblocks = triton.cdiv(d, meta["BLOCK_D"])
        dx = torch.empty((b, L, d), device=dev, dtype=x.dtype)
        ddt = torch.empty((b, L, d), device=dev, dtype=dt.dtype)
        dz = torch.empty((b, L, d), device=dev, dtype=z.dtype) if z is not None else None
        dBp = torch.empty((b, L, G_C, N), device=dev, dtype=torch.float32)
        dC = torch.empty((b, L, G_C, N), device=dev, dtype=torch.float32)
        dA = torch.empty((run_seqs, d, N), device=dev, dtype=torch.float32)
        dD = torch.empty((run_seqs, d), device=dev, dtype=torch.float32)
        dbias = torch.empty((run_seqs, d), device=dev, dtype=torch.float32)
        dh0 = torch.empty((run_seqs, d, N), device=dev, dtype=torch.float32)
        scratch_shape = (run_seqs * n_dblocks, meta["CHUNK"], meta["BLOCK_D"], meta["BLOCK_N"])  # the fwd's interval
        scratch = torch.empty(scratch_shape, device=dev, dtype=torch.float32)
        if run_seqs > 0:
            capped = dev.type == "cuda" and BWD_MAXNREG and run_seqs * n_dblocks >= BWD_CAP_MIN_PROGRAMS
            _scan_bwd_kernel[(run_seqs * n_dblocks,)](
                x, dt, A, B, C, D, z, dt_bias, run_cu, order, dout, run_dfinal, ckpt, scratch, dx,
                ddt, dz, dBp, dC, dA, dD, dbias, dh0, L, d, N, G_C, n_ckpt_per_row, *x.stride(), *dt.stride(),
                *_strides3(z, x), *dout.stride(), *B.stride(), *C.stride(), *A.stride(), **meta,
                HAS_DFINAL=run_dfinal is not None, num_warps=num_warps, **(dict(maxnreg=BWD_MAXNREG) if capped else {}),
            )  # fmt: skip
        else:  # no sequences: nothing flows anywhere
            for t in (dA, dD, dbias):
                t.zero_()
        if split:
            dh0 = dh0_docs
        dB = dBp.view(b, L, G_B, cpb, N).sum(3).to(B.dtype)
        return (
            dx,
            ddt,
            dA.sum(0).to(A.dtype),
            dB,
            dC.to(C.dtype),
            dD.sum(0).to(D.dtype) if D is not None else None,
            dz,
            dbias.sum(0).to(dt_bias.dtype) if dt_bias is not None else None,
            dh0.to(initial_state.dtype) if initial_state is not None else None,
            None,
            None,
            None,
        )


def selective_scan_triton(
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
    """Triton selective scan; arguments, shapes and returns as :func:`m1_kernels.selective_scan`.

    ``x, dt, z`` may be strided ``(b, L, d_inner)`` views (e.g. slices of a fused projection output);
    ``B``/``C`` ``(b, L, G, N)`` views likewise. Accumulates in fp32; ``y`` has x's dtype and the final
    states are fp32. Differentiable in x, dt, A, B, C, D, z, dt_bias and initial_state. float64 inputs
    (and layouts the kernel does not cover: channels per C group not a power of two) use the reference.

    Example::

        >>> y, h = selective_scan_triton(  # doctest: +SKIP
        ...     x, dt, A, B, C, D, z, dt_bias, cu_seqlens=cu, return_final_state=True)
    """
    b, L, d = x.shape
    N = A.shape[1]
    check_groups(d, C.shape[2], B.shape[2])
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, b, L)
    if not _supported(x, N, d // C.shape[2]):
        return selective_scan_ref(
            x, dt, A, B, C, D, z, dt_bias, dt_softplus, cu_seqlens, initial_state, return_final_state
        )
    n_seqs = b if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (n_seqs, d, N):
        raise ValueError(f"initial_state must be {(n_seqs, d, N)}, got {tuple(initial_state.shape)}")
    block_d, block_n, _ = _launch_config(d // C.shape[2], N)
    if cu_seqlens is None and b > 1 and split_length(b * L, b, triton.cdiv(d, block_d), block_n):
        # Long padded rows are split like packed documents: run them as one packed row (a view when the rows are
        # evenly strided, as slices of a projection output are).
        rows = torch.arange(b + 1, device=x.device, dtype=torch.int32) * L
        flat = [t.reshape(1, b * L, *t.shape[2:]) if t is not None else None for t in (x, dt, B, C, z)]
        y, final = SelectiveScanFunction.apply(
            flat[0], flat[1], A, flat[2], flat[3], D, flat[4], dt_bias, initial_state, rows, dt_softplus, True
        )
        y = y.view(b, L, d)
        return (y, final) if return_final_state else y
    return SelectiveScanFunction.apply(
        x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, dt_softplus, return_final_state
    )
