"""Triton kernels for token log-prob + entropy rows (CUDA, or CPU under ``TRITON_INTERPRET=1``).

One program per token row, streaming the vocabulary in ``BLOCK_V`` slices in fp32 (``l = x / temp``):

- forward: online ``m = max l``, ``z = sum e^(l - m)``, ``a = sum e^(l - m) l``; then
  ``lse = m + log z``, ``entropy = lse - a / z``, ``logprob = l[label] - lse``;
- backward: ``dL/dl = g_lp (onehot(label) - p) - g_ent p (log p + entropy)``, divided by ``temp``
  and stored over ``G`` (may alias the logits row; each element is read before it is written).

Written for triton 3.6 to 3.9.
"""

import triton
import triton.language as tl


@triton.jit
def _lpe_fwd_kernel(
    X,
    LABELS,
    LP,
    ENT,
    LSE,
    stride_x,
    V,
    ignore_index,
    inv_temp,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    label = tl.load(LABELS + row)
    valid = label != ignore_index
    m = tl.full([], float("-inf"), tl.float32)
    z = tl.full([], 0.0, tl.float32)
    a = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        msk = offs < V
        l = tl.load(X + offs, mask=msk, other=float("-inf")).to(tl.float32) * inv_temp
        new_m = tl.maximum(m, tl.max(l, 0))
        e = tl.exp(l - new_m)
        alpha = tl.exp(m - new_m)
        z = z * alpha + tl.sum(e, 0)
        a = a * alpha + tl.sum(tl.where(msk, e * l, 0.0), 0)
        m = new_m
    lse = m + tl.log(z)
    ent = lse - a / z
    safe = tl.where(valid, label, 0).to(tl.int64)
    lp = tl.load(X + safe).to(tl.float32) * inv_temp - lse
    tl.store(LP + row, tl.where(valid, lp, 0.0))
    tl.store(ENT + row, tl.where(valid, ent, 0.0))
    tl.store(LSE + row, lse)


@triton.jit
def _lpe_bwd_kernel(
    X,
    G,
    LABELS,
    LSE,
    ENT,
    G_LP,
    G_ENT,
    stride_x,
    stride_g,
    V,
    ignore_index,
    inv_temp,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    G += row * stride_g
    label = tl.load(LABELS + row)
    valid = label != ignore_index
    lse = tl.load(LSE + row)
    ent = tl.load(ENT + row)
    g_lp = tl.load(G_LP + row).to(tl.float32)
    g_ent = tl.load(G_ENT + row).to(tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        msk = offs < V
        logp = tl.load(X + offs, mask=msk, other=0.0).to(tl.float32) * inv_temp - lse
        p = tl.exp(logp)
        g = -g_lp * p - g_ent * p * (logp + ent)
        g = g + tl.where(offs == label, g_lp, 0.0)
        g = tl.where(valid, g * inv_temp, 0.0)
        tl.store(G + offs, g.to(G.dtype.element_ty), mask=msk)


def _launch_config(V: int) -> tuple[int, int]:
    block = min(4096, triton.next_power_of_2(V))
    return block, (8 if block >= 2048 else 4)


def lpe_fwd_triton(x, labels, lp_out, ent_out, lse_out, *, temperature, ignore_index) -> None:
    """Rows of ``x (rows, V)``: write logprob, entropy (0 where ignored) and lse, all fp32 ``(rows,)``."""
    rows, V = x.shape
    if rows == 0:
        return
    assert x.stride(-1) == 1
    block, warps = _launch_config(V)
    _lpe_fwd_kernel[(rows,)](
        x, labels, lp_out, ent_out, lse_out, x.stride(0), V, ignore_index, 1.0 / temperature,
        BLOCK_V=block, num_warps=warps,
    )  # fmt: skip


def lpe_bwd_triton(x, grad, labels, lse, ent, g_lp, g_ent, *, temperature, ignore_index) -> None:
    """Write the gradient wrt the logits rows ``x`` into ``grad`` (may be ``x`` itself)."""
    rows, V = x.shape
    if rows == 0:
        return
    assert x.stride(-1) == 1 and grad.stride(-1) == 1
    block, warps = _launch_config(V)
    _lpe_bwd_kernel[(rows,)](
        x, grad, labels, lse, ent, g_lp.contiguous(), g_ent.contiguous(), x.stride(0), grad.stride(0),
        V, ignore_index, 1.0 / temperature, BLOCK_V=block, num_warps=warps,
    )  # fmt: skip
