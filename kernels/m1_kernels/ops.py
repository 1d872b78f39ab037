"""Public M1 ops: one function per op, dispatching to the GPU kernels (Triton; CUDA C++ for the scan) or the
PyTorch reference."""

from m1_kernels.conv1d.naive import causal_conv1d_ref
from m1_kernels.conv1d.naive import causal_conv1d_update_ref
from m1_kernels.dispatch import use_cuda_scan
from m1_kernels.dispatch import use_triton
from m1_kernels.selective_scan.naive import selective_scan_ref
from m1_kernels.selective_scan.naive import selective_state_update_ref


def selective_scan(
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
    """Selective scan (Mamba-1 recurrence) in the M1 layout, padded or packed, differentiable.

    Args:
        x, dt, z: ``(b, L, d_inner)``; ``dt`` is the pre-softplus step (``dt_proj`` output).
        A: ``(d_inner, N)``, negative (``-exp(A_log)``).
        B: ``(b, L, G_B, N)`` and C: ``(b, L, G_C, N)``, G_B dividing G_C dividing d_inner.
        D: ``(d_inner,)`` skip; dt_bias: ``(d_inner,)`` added before softplus (M1-3B passes the
            ``dt_proj`` bias here a second time).
        cu_seqlens: ``(docs + 1,)`` int32 document offsets when ``b == 1`` packs several documents.
        initial_state: ``(b or docs, d_inner, N)``.

    Returns:
        ``y (b, L, d_inner)`` in x's dtype, plus final states ``(b or docs, d_inner, N)`` in fp32
        when ``return_final_state``.

    Example::

        >>> import torch, m1_kernels
        >>> x = torch.randn(1, 4, 8); A = -torch.ones(8, 4)
        >>> y = m1_kernels.selective_scan(x, x, A, torch.randn(1, 4, 1, 4), torch.randn(1, 4, 2, 4))
        >>> y.shape
        torch.Size([1, 4, 8])
    """
    args = (x, dt, A, B, C, D, z, dt_bias, dt_softplus, cu_seqlens, initial_state, return_final_state)
    if use_cuda_scan(x, dt, A, B, C, z):
        from m1_kernels.selective_scan.cuda_scan import selective_scan_cuda

        return selective_scan_cuda(*args)
    if use_triton(x):
        from m1_kernels.selective_scan.triton_scan import selective_scan_triton

        return selective_scan_triton(*args)
    return selective_scan_ref(*args)


def selective_state_update(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, state_indices=None, pad_slot_id=-1
):
    """One decode token of the scan; ``state (n_slots, d_inner, N)`` is updated in place.

    ``x, dt, z (b, d_inner)``, ``B (b, G_B, N)``, ``C (b, G_C, N)``; row ``i`` reads and writes slot
    ``state_indices[i]`` (row ``i`` when None); rows with slot ``pad_slot_id`` are skipped.
    Returns ``y (b, d_inner)``.

    Example::

        >>> import torch, m1_kernels
        >>> state = torch.zeros(3, 8, 4)
        >>> y = m1_kernels.selective_state_update(state, torch.randn(2, 8), torch.randn(2, 8),
        ...     -torch.ones(8, 4), torch.randn(2, 1, 4), torch.randn(2, 2, 4),
        ...     state_indices=torch.tensor([2, -1]))
        >>> bool(state[0].abs().sum() == 0 and state[2].abs().sum() > 0)
        True
    """
    args = (state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_indices, pad_slot_id)
    if use_triton(x):
        from m1_kernels.selective_scan.triton_update import selective_state_update_triton

        return selective_state_update_triton(*args)
    return selective_state_update_ref(*args)


def causal_conv1d(
    x, weight, bias=None, activation="silu", cu_seqlens=None, initial_state=None, return_final_state=False
):
    """Causal depthwise conv1d over ``x (b, L, d)`` with ``weight (d, K)``, padded or packed.

    Packed documents (``cu_seqlens``) each start from their own ``initial_state (docs, d, K-1)``
    (zeros by default). Returns ``out (b, L, d)`` and, when asked, final states ``(b or docs, d, K-1)``.

    Example::

        >>> import torch, m1_kernels
        >>> out = m1_kernels.causal_conv1d(torch.randn(1, 5, 8), torch.randn(8, 4),
        ...     cu_seqlens=torch.tensor([0, 1, 5], dtype=torch.int32))
        >>> out.shape
        torch.Size([1, 5, 8])
    """
    args = (x, weight, bias, activation, cu_seqlens, initial_state, return_final_state)
    if use_triton(x):
        from m1_kernels.conv1d.triton_conv import causal_conv1d_triton

        return causal_conv1d_triton(*args)
    return causal_conv1d_ref(*args)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation="silu", state_indices=None, pad_slot_id=-1):
    """One token of the conv; ``conv_state (n_slots, d, K-1)`` is shifted in place.

    ``x (b, d)``; slots as in :func:`selective_state_update`. Returns ``out (b, d)``.
    """
    args = (x, conv_state, weight, bias, activation, state_indices, pad_slot_id)
    if use_triton(x):
        from m1_kernels.conv1d.triton_conv import causal_conv1d_update_triton

        return causal_conv1d_update_triton(*args)
    return causal_conv1d_update_ref(*args)
