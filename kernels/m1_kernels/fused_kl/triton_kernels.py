"""Triton kernel for the per-row KL, its gradient and the top-1 agreement (CUDA, or CPU under ``TRITON_INTERPRET=1``).

One program owns one token row and streams its vocabulary twice in ``BLOCK_V`` slices, in fp32:

1. online ``max``/``sum exp`` of student and teacher (their log-sum-exps), the KL accumulator
   (see README), and the running first-occurrence argmax of both;
2. the gradient of ``KL_row / n`` wrt the student logits, stored over ``G`` (which may alias the
   student logits: each element is read before it is written, by the same program).

Extra memory is O(rows) scalars; the ``(rows, V)`` gradient is the only large output.
Written for triton 3.6 to 3.9 (``tl.argmax``/``tl.max`` only; no newer language features).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _kl_fwd_bwd_kernel(
    S,
    T,
    G,
    LABELS,
    INV_N,
    KL,
    AGREE,
    stride_s,
    stride_t,
    stride_g,
    V,
    ignore_index,
    inv_temp,
    HAS_LABELS: tl.constexpr,
    REVERSE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    S += row * stride_s
    T += row * stride_t
    G += row * stride_g
    if HAS_LABELS:
        counted = tl.load(LABELS + row) != ignore_index
    else:
        counted = tl.full([], 1, tl.int1)
    inv_n = tl.load(INV_N).to(tl.float32)

    m_s = tl.full([], float("-inf"), tl.float32)
    z_s = tl.full([], 0.0, tl.float32)
    m_t = tl.full([], float("-inf"), tl.float32)
    z_t = tl.full([], 0.0, tl.float32)
    acc = tl.full([], 0.0, tl.float32)  # reverse: sum e^(s - m_s) (s - t); forward: sum e^(t - m_t) (t - s)
    best_s = tl.full([], float("-inf"), tl.float32)
    best_t = tl.full([], float("-inf"), tl.float32)
    idx_s = tl.full([], 0, tl.int32)
    idx_t = tl.full([], 0, tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        msk = offs < V
        s_raw = tl.load(S + offs, mask=msk, other=float("-inf")).to(tl.float32)
        t_raw = tl.load(T + offs, mask=msk, other=float("-inf")).to(tl.float32)
        # first-occurrence argmax on the raw logits (temperature > 0 keeps the order)
        bs = tl.max(s_raw, 0)
        bt = tl.max(t_raw, 0)
        is_ = tl.argmax(s_raw, 0) + start
        it_ = tl.argmax(t_raw, 0) + start
        idx_s = tl.where(bs > best_s, is_, idx_s)
        idx_t = tl.where(bt > best_t, it_, idx_t)
        best_s = tl.maximum(best_s, bs)
        best_t = tl.maximum(best_t, bt)

        s = s_raw * inv_temp
        t = t_raw * inv_temp
        new_ms = tl.maximum(m_s, tl.max(s, 0))
        new_mt = tl.maximum(m_t, tl.max(t, 0))
        e_s = tl.exp(s - new_ms)
        e_t = tl.exp(t - new_mt)
        a_s = tl.exp(m_s - new_ms)
        a_t = tl.exp(m_t - new_mt)
        z_s = z_s * a_s + tl.sum(e_s, 0)
        z_t = z_t * a_t + tl.sum(e_t, 0)
        if REVERSE:
            acc = acc * a_s + tl.sum(tl.where(msk, e_s * (s - t), 0.0), 0)
        else:
            acc = acc * a_t + tl.sum(tl.where(msk, e_t * (t - s), 0.0), 0)
        m_s = new_ms
        m_t = new_mt

    lse_s = m_s + tl.log(z_s)
    lse_t = m_t + tl.log(z_t)
    if REVERSE:
        kl = acc / z_s - lse_s + lse_t
    else:
        kl = acc / z_t - lse_t + lse_s
    tl.store(KL + row, tl.where(counted, kl, 0.0))
    tl.store(AGREE + row, tl.where(counted & (idx_s == idx_t), 1.0, 0.0))

    scale = inv_n * inv_temp
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        msk = offs < V
        log_ps = tl.load(S + offs, mask=msk, other=0.0).to(tl.float32) * inv_temp - lse_s
        log_pt = tl.load(T + offs, mask=msk, other=0.0).to(tl.float32) * inv_temp - lse_t
        p_s = tl.exp(log_ps)
        if REVERSE:
            g = p_s * (log_ps - log_pt - kl)
        else:
            g = p_s - tl.exp(log_pt)
        g = tl.where(counted, g * scale, 0.0)
        tl.store(G + offs, g.to(G.dtype.element_ty), mask=msk)


def _launch_config(V: int) -> tuple[int, int]:
    block = min(4096, triton.next_power_of_2(V))
    warps = 8 if block >= 2048 else 4
    return block, warps


def kl_rows_triton(
    s: torch.Tensor,
    t: torch.Tensor,
    grad: torch.Tensor,
    labels: torch.Tensor | None,
    inv_n: torch.Tensor,
    kl_out: torch.Tensor,
    agree_out: torch.Tensor,
    *,
    ignore_index: int,
    reverse: bool,
    temperature: float,
) -> None:
    """Fill ``kl_out``/``agree_out`` (rows,) fp32 and ``grad`` (rows, V) (may be ``s`` itself) for one chunk."""
    rows, V = s.shape
    if rows == 0:
        return
    assert s.stride(-1) == 1 and t.stride(-1) == 1 and grad.stride(-1) == 1
    block, warps = _launch_config(V)
    _kl_fwd_bwd_kernel[(rows,)](
        s,
        t,
        grad,
        labels if labels is not None else kl_out,
        inv_n,
        kl_out,
        agree_out,
        s.stride(0),
        t.stride(0),
        grad.stride(0),
        V,
        ignore_index,
        1.0 / temperature,
        HAS_LABELS=labels is not None,
        REVERSE=reverse,
        BLOCK_V=block,
        num_warps=warps,
    )
