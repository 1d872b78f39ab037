"""PyTorch reference of the causal depthwise conv1d over x (varlen, with states).

``out_t[d] = act(bias[d] + sum_k weight[d, k] * x_{t - (K - 1) + k}[d])``, where inputs before a
document's first token come from its initial state (the last ``K - 1`` inputs, oldest first;
zeros by default). Each packed document restarts from its own state.
"""

import torch
import torch.nn.functional as F

from m1_kernels.selective_scan.naive import check_cu_seqlens
from m1_kernels.selective_scan.naive import compute_dtype
from m1_kernels.selective_scan.naive import live_slots

_ACTIVATIONS = {None: lambda t: t, "silu": F.silu, "swish": F.silu}


def activation_fn(activation):
    """The conv's output activation by name ('silu' or None)."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(_ACTIVATIONS)}, got {activation!r}")
    return _ACTIVATIONS[activation]


def causal_conv1d_ref(
    x,
    weight,
    bias=None,
    activation="silu",
    cu_seqlens=None,
    initial_state=None,
    return_final_state: bool = False,
):
    """Reference conv; arguments and shapes as :func:`m1_kernels.causal_conv1d`.

    Returns ``out`` (dtype of ``x``) and, if asked, final states ``(rows or docs, d, K-1)`` in the
    dtype of ``x``.
    """
    act = activation_fn(activation)
    b, L, d = x.shape
    K = weight.shape[1]
    ct = compute_dtype(x.dtype)
    if cu_seqlens is None:
        segments = [(r, 0, L) for r in range(b)]
    else:
        check_cu_seqlens(cu_seqlens, b, L)
        cu = cu_seqlens.tolist()
        segments = [(0, s, e) for s, e in zip(cu[:-1], cu[1:])]
    outs, finals = [], []
    w = weight.to(ct)
    for i, (row, start, end) in enumerate(segments):
        prev = torch.zeros(d, K - 1, dtype=ct, device=x.device) if initial_state is None else initial_state[i].to(ct)
        seq = torch.cat([prev, x[row, start:end].to(ct).T], dim=1)  # (d, K-1+len)
        if end > start:
            windows = seq.unfold(1, K, 1)  # (d, len, K)
            out = (windows * w[:, None, :]).sum(-1)
        else:  # empty document (repeated cu_seqlens entry): no output, the state passes through
            out = seq.new_zeros(d, 0)
        if bias is not None:
            out = out + bias.to(ct)[:, None]
        outs.append(act(out).T)
        finals.append(seq[:, seq.shape[1] - (K - 1) :])
    if cu_seqlens is None:
        y = torch.stack(outs, dim=0)
    else:
        y = torch.cat(outs, dim=0).unsqueeze(0)
    y = y.to(x.dtype)
    if not return_final_state:
        return y
    return y, torch.stack(finals, dim=0).to(x.dtype)


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation="silu", state_indices=None, pad_slot_id=-1):
    """One token of the conv against a state cache ``conv_state (n_slots, d, K-1)``, in place.

    ``x (b, d)``; row ``i`` uses slot ``state_indices[i]`` (row ``i`` when None); rows whose slot is
    ``pad_slot_id`` are skipped (output zero).
    """
    act = activation_fn(activation)
    bsz = x.shape[0]
    ct = compute_dtype(x.dtype)
    rows, slots = live_slots(state_indices, bsz, pad_slot_id, x.device)
    window = torch.cat([conv_state[slots].to(ct), x[rows].to(ct).unsqueeze(-1)], dim=-1)  # (n, d, K)
    conv_state[slots] = window[..., 1:].to(conv_state.dtype)
    y = (window * weight.to(ct)).sum(-1)
    if bias is not None:
        y = y + bias.to(ct)
    out = torch.zeros_like(x)
    out[rows] = act(y).to(x.dtype)
    return out
