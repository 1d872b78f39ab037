# SPDX-License-Identifier: Apache-2.0
# Decode step of the selective scan (Mamba-1 recurrence, Gu & Dao 2023, arXiv 2312.00752) in the M1 GQA layout
# (arXiv 2504.10449). Written for m1-suite; the maths is in README_update.md.
"""Triton decode step: one token against an SSM state cache, updated in place.

Each program owns ``BLOCK_D`` channels x ``BLOCK_N`` state entries of one batch row. It reads the row's
slot, loads its ``(BLOCK_D, N)`` state tile (contiguous: ``BLOCK_D * N`` elements of one slot), updates it
in fp32, stores it back in the state's dtype and writes ``y``. Rows whose slot is ``pad_slot_id`` are
masked out: no state traffic, output zero. The GQA repeat is folded into the B/C gathers.

Not autotuned on purpose: autotuning would run the in-place update several times per shape. Block
sizes come from :func:`_launch_config`, a hand table documented there.
"""

import torch
import triton
import triton.language as tl

from m1_kernels.selective_scan.naive import check_groups
from m1_kernels.triton_math import exp
from m1_kernels.triton_math import sigmoid
from m1_kernels.triton_math import softplus


@triton.jit
def _state_update_kernel(
    state_ptr,
    x_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    dt_bias_ptr,
    idx_ptr,
    out_ptr,
    d_inner,
    N,
    pad_slot_id,
    chan_per_c,  # d_inner // G_C
    c_per_b,  # G_C // G_B
    s_state_slot,
    s_state_d,
    s_state_n,
    s_x_b,
    s_x_d,
    s_dt_b,
    s_dt_d,
    s_A_d,
    s_A_n,
    s_B_b,
    s_B_g,
    s_B_n,
    s_C_b,
    s_C_g,
    s_C_n,
    s_z_b,
    s_z_d,
    s_out_b,
    s_out_d,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr,
    HAS_INDICES: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_d = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d_inner
    mask_n = offs_n < N

    if HAS_INDICES:
        slot = tl.load(idx_ptr + row).to(tl.int64)
    else:
        slot = row
    # Row liveness as a (BLOCK_D,) vector rather than a scalar (the interpreter rejects scalar-bool masks).
    live = (tl.zeros([BLOCK_D], dtype=tl.int64) + slot) != pad_slot_id
    mask_dn = mask_d[:, None] & mask_n[None, :]
    live_dn = mask_dn & live[:, None]

    # Inputs of this row (fp32 compute whatever the input dtype).
    x = tl.load(x_ptr + row * s_x_b + offs_d * s_x_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + row * s_dt_b + offs_d * s_dt_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if DT_SOFTPLUS:
        dt = softplus(dt)
    A = tl.load(A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n, mask=mask_dn, other=0.0).to(tl.float32)

    # M1 GQA layout: channel d reads C group d // (d_inner / G_C) and B group c_group // (G_C / G_B).
    c_grp = offs_d // chan_per_c
    b_grp = c_grp // c_per_b
    Bv = tl.load(B_ptr + row * s_B_b + b_grp[:, None] * s_B_g + offs_n[None, :] * s_B_n, mask=mask_dn, other=0.0).to(
        tl.float32
    )
    Cv = tl.load(C_ptr + row * s_C_b + c_grp[:, None] * s_C_g + offs_n[None, :] * s_C_n, mask=mask_dn, other=0.0).to(
        tl.float32
    )

    # The slot may be pad_slot_id (e.g. -1): the pointer is then never dereferenced (masked).
    s_ptrs = state_ptr + slot * s_state_slot + offs_d[:, None] * s_state_d + offs_n[None, :] * s_state_n
    h = tl.load(s_ptrs, mask=live_dn, other=0.0).to(tl.float32)
    h = exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bv
    tl.store(s_ptrs, h.to(state_ptr.dtype.element_ty), mask=live_dn)

    y = tl.sum(h * Cv, axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + row * s_z_b + offs_d * s_z_d, mask=mask_d, other=0.0).to(tl.float32)
        y *= z * sigmoid(z)
    y = tl.where(live, y, 0.0)
    tl.store(out_ptr + row * s_out_b + offs_d * s_out_d, y.to(out_ptr.dtype.element_ty), mask=mask_d)


def _launch_config(batch: int, d_inner: int, N: int, fill_gpu: bool = True):
    """Hand-picked ``(BLOCK_D, num_warps)``, keyed on the state tile and the number of programs.

    The kernel is bandwidth bound: each program moves ``BLOCK_D * N`` state elements in and out. The
    table aims at ~2K state elements (8 KB fp32) per program with 4 warps, which keeps 16-byte vector
    accesses and enough loads in flight per SM, and shrinks the tile when the grid would otherwise leave
    SMs idle (small decode batches: batch 1 at d_inner 3072 gives 192 programs of 16 channels rather than
    24 of 128 on a 132-SM H100). Rationale, not measurements: re-tune with benchmarks/bench_decode.py.
    """
    block_n = triton.next_power_of_2(N)
    target = 2048 if block_n <= 64 else 4096
    block_d = max(1, min(triton.next_power_of_2(d_inner), target // block_n))
    # Keep >= ~4 programs per SM of a large GPU (132 SMs x 4) when the batch is small. Not on CPU tensors:
    # the Triton interpreter runs programs one after another, so fewer, larger tiles are faster there.
    while fill_gpu and block_d > 4 and batch * triton.cdiv(d_inner, block_d) < 512:
        block_d //= 2
    elems = block_d * block_n
    num_warps = 8 if elems >= 4096 else 4 if elems >= 1024 else 2 if elems >= 256 else 1
    return block_d, block_n, num_warps


def selective_state_update_triton(
    state,
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus: bool = True,
    state_indices=None,
    pad_slot_id: int = -1,
):
    """Triton decode step; arguments, shapes and semantics as :func:`m1_kernels.selective_state_update`.

    ``state (n_slots, d_inner, N)`` (fp32 or bf16, any strides) is read, updated in fp32 and stored back
    in its own dtype, in place. Returns ``y (b, d_inner)`` in x's dtype; rows whose slot is
    ``pad_slot_id`` get zeros and leave the cache untouched. CUDA-graph capturable: no host syncs and no
    data-dependent allocation (only ``y`` is allocated).
    """
    bsz, d_inner = x.shape
    n_slots, d_state, N = state.shape
    G_B, G_C = B.shape[1], C.shape[1]
    if d_state != d_inner or A.shape != (d_inner, N) or B.shape != (bsz, G_B, N) or C.shape != (bsz, G_C, N):
        raise ValueError(
            f"shape mismatch: state {tuple(state.shape)}, x {tuple(x.shape)}, A {tuple(A.shape)}, "
            f"B {tuple(B.shape)}, C {tuple(C.shape)}"
        )
    check_groups(d_inner, G_C, G_B)
    if state_indices is None and n_slots < bsz:
        raise ValueError(f"without state_indices the cache needs >= {bsz} slots, has {n_slots}")
    # 1-D parameters are read with unit stride (a no-op for the usual contiguous parameters).
    D, dt_bias = (t.contiguous() if t is not None else None for t in (D, dt_bias))
    out = torch.empty_like(x)
    block_d, block_n, num_warps = _launch_config(bsz, d_inner, N, fill_gpu=x.is_cuda)
    grid = (triton.cdiv(d_inner, block_d), bsz)
    zs = z.stride() if z is not None else (0, 0)
    _state_update_kernel[grid](
        state,
        x,
        dt,
        A,
        B,
        C,
        D,
        z,
        dt_bias,
        state_indices,
        out,
        d_inner,
        N,
        pad_slot_id,
        d_inner // G_C,
        G_C // G_B,
        *state.stride(),
        *x.stride(),
        *dt.stride(),
        *A.stride(),
        *B.stride(),
        *C.stride(),
        *zs,
        *out.stride(),
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_DT_BIAS=dt_bias is not None,
        HAS_INDICES=state_indices is not None,
        DT_SOFTPLUS=bool(dt_softplus),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return out
