"""PyTorch reference of the M1 selective scan (Mamba-1 recurrence, M1 group layout, varlen).

Per channel ``d`` and state index ``n``, with ``g_C(d) = d // (d_inner / G_C)`` and
``g_B(d) = g_C(d) // (G_C / G_B)`` (the M1 GQA repeat on d_state-sized chunks)::

    delta_t = softplus(dt_t + dt_bias)                       (or dt_t + dt_bias without softplus)
    h_t[d, n] = exp(delta_t[d] * A[d, n]) * h_{t-1}[d, n] + delta_t[d] * B_t[g_B(d), n] * x_t[d]
    y_t[d] = sum_n C_t[g_C(d), n] * h_t[d, n] + D[d] * x_t[d]
    out_t[d] = y_t[d] * silu(z_t[d])

``h_{-1}`` is the initial state (zeros by default) of each row, or of each document when
``cu_seqlens`` packs several documents into one row: the state restarts at every document start.
The loop runs in float32 (float64 for float64 inputs) and is the oracle for the Triton kernels.
"""

import weakref

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_groups(d_inner: int, n_c_groups: int, n_b_groups: int) -> None:
    """Raises unless G_B divides G_C and G_C divides d_inner (the M1 group layout)."""
    if d_inner % n_c_groups or n_c_groups % n_b_groups:
        raise ValueError(
            f"d_inner={d_inner} must be a multiple of the C groups ({n_c_groups}) and the C groups "
            f"a multiple of the B groups ({n_b_groups})"
        )


def group_index(d_inner: int, n_c_groups: int, n_b_groups: int, device=None):
    """Per-channel C-group and B-group indices of the M1 layout (see module docstring)."""
    check_groups(d_inner, n_c_groups, n_b_groups)
    c_idx = torch.arange(d_inner, device=device) // (d_inner // n_c_groups)
    return c_idx, c_idx // (n_c_groups // n_b_groups)


def discretize_dt(dt, dt_bias, dt_softplus: bool, ct: torch.dtype):
    """delta = softplus(dt + dt_bias) in the compute dtype."""
    delta = dt.to(ct)
    if dt_bias is not None:
        delta = delta + dt_bias.to(ct)
    return F.softplus(delta) if dt_softplus else delta


def live_slots(state_indices, batch: int, pad_slot_id: int, device):
    """``(rows, slots)`` of a decode step: the batch rows whose cache slot is not ``pad_slot_id``, and their slots
    (row ``i`` uses slot ``state_indices[i]``, or slot ``i`` when ``state_indices`` is None)."""
    slots = torch.arange(batch, device=device) if state_indices is None else state_indices.long()
    live = slots != pad_slot_id
    return live.nonzero().squeeze(-1), slots[live]


class TensorMemo:
    """Facts derived from a tensor, computed once while the tensor lives and its contents are unchanged.

    A training step hands one ``cu_seqlens`` to every layer's conv and scan, and each call needs facts about it:
    that its ends are right (a host read: on a GPU a sync, after which the GPU idles while Python prepares the next
    launch) and the documents' order by length (a sort: three launches). They are derived once per tensor. An entry
    is keyed by the tensor's identity, data pointer and version counter: an in-place change bumps the version and
    the facts are derived again; a dead tensor's entry is dropped. Inference-mode tensors (vLLM's) have no version
    counter: their facts hold while the tensor lives, so an in-place change to one after its first use is not seen.
    While a CUDA graph is being captured nothing is remembered (the recorded kernels run only at replay).

    Example::

        >>> memo = TensorMemo()
        >>> t = torch.tensor([0, 3, 5])
        >>> memo.get(t, "last", lambda v: int(v[-1]))
        5
        >>> t[-1] = 4
        >>> memo.get(t, "last", lambda v: int(v[-1]))
        4
    """

    def __init__(self):
        self._entries = {}  # id -> (weak reference, (data pointer, version), {name: fact})

    def get(self, tensor: torch.Tensor, name, derive):
        """``derive(tensor)``, computed on the first call for this tensor's current contents and ``name``."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # Kernels recorded into a CUDA graph run only when it is replayed: a fact derived now holds nothing yet.
            return derive(tensor)
        key, state = id(tensor), (tensor.data_ptr(), None if tensor.is_inference() else tensor._version)
        entry = self._entries.get(key)
        if entry is None or entry[0]() is not tensor or entry[1] != state:
            # The callback drops the entry when the tensor dies, before its id can be reused.
            ref = weakref.ref(tensor, lambda _, key=key: self._entries.pop(key, None))
            entry = self._entries[key] = (ref, state, {})
        facts = entry[2]
        if name not in facts:
            facts[name] = derive(tensor)
        return facts[name]


cu_seqlens_memo = TensorMemo()


@torch.compiler.disable  # reads ids and version counters, and the check itself copies to the host: eager when compiled
def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, length: int) -> None:
    """Packed input is one row whose documents ``cu_seqlens`` splits (0 first, length last). Checked once per
    tensor and length (:class:`TensorMemo`): on a GPU the check is a host sync.

    Example::

        >>> check_cu_seqlens(torch.tensor([0, 3, 5]), 1, 5)
        >>> check_cu_seqlens(torch.tensor([0, 3, 4]), 1, 5)
        Traceback (most recent call last):
        ...
        ValueError: cu_seqlens must start at 0 and end at the packed length 5, got [0, 3, 4]
    """
    if batch != 1:
        raise ValueError(f"packed input (cu_seqlens given) must have batch 1, got {batch}")
    if not cu_seqlens_memo.get(cu_seqlens, ("ends", length), lambda cu: _ends_are(cu, length)):
        raise ValueError(f"cu_seqlens must start at 0 and end at the packed length {length}, got {cu_seqlens.tolist()}")


def _ends_are(cu_seqlens: torch.Tensor, length: int) -> bool:
    # One device-to-host copy for both ends.
    return cu_seqlens.ndim == 1 and cu_seqlens.numel() > 0 and cu_seqlens[[0, -1]].tolist() == [0, length]


@torch.compiler.disable  # the memo reads ids and version counters
def cu_seqlens_int32(cu_seqlens: torch.Tensor, device) -> torch.Tensor:
    """``cu_seqlens`` as the kernels take it: contiguous int32 on ``device``. Converted once per tensor
    (:class:`TensorMemo`), so the documents' order derived from the result is sorted once too."""
    return cu_seqlens_memo.get(
        cu_seqlens, ("int32", device), lambda cu: cu.to(device=device, dtype=torch.int32).contiguous()
    )


@torch.compiler.disable  # the memo reads ids and version counters
def documents_longest_first(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Packed document indices by decreasing length (stable, int32), sorted on the device: no host sync. Sorted
    once per tensor (:class:`TensorMemo`).

    The scan kernels hand documents to the GPU in this order, so that a long document does not start last
    and run on alone (kernels/m1_kernels/selective_scan/README.md, "Longest documents first").
    """
    return cu_seqlens_memo.get(cu_seqlens, "longest first", _sort_by_length)


def _sort_by_length(cu: torch.Tensor) -> torch.Tensor:
    return torch.argsort(cu[1:] - cu[:-1], descending=True, stable=True).to(torch.int32)


def selective_scan_ref(
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
    """Reference selective scan; arguments and shapes as :func:`m1_kernels.selective_scan`.

    Returns ``y`` (dtype of ``x``) and, if asked, the final states ``(rows or docs, d_inner, N)``
    in the compute dtype.
    """
    b, L, d = x.shape
    ct = compute_dtype(x.dtype)
    c_idx, b_idx = group_index(d, C.shape[2], B.shape[2], x.device)
    delta = discretize_dt(dt, dt_bias, dt_softplus, ct)  # (b, L, d)
    xs = x.to(ct)
    dA = torch.exp(delta.unsqueeze(-1) * A.to(ct))  # (b, L, d, N)
    dBx = (delta * xs).unsqueeze(-1) * B.to(ct)[:, :, b_idx, :]  # (b, L, d, N)
    Cd = C.to(ct)[:, :, c_idx, :]
    if cu_seqlens is None:
        bounds = [(0, L)]
        n_states = b
    else:
        check_cu_seqlens(cu_seqlens, b, L)
        cu = cu_seqlens.tolist()
        bounds = list(zip(cu[:-1], cu[1:]))
        n_states = len(bounds)
    N = A.shape[1]
    h0 = torch.zeros(n_states, d, N, dtype=ct, device=x.device) if initial_state is None else initial_state.to(ct)
    ys, finals = [], []
    for i, (start, end) in enumerate(bounds):
        # Packed documents are independent rows of one batch: the state restarts at `start`.
        h = h0 if cu_seqlens is None else h0[i : i + 1]
        # Unbind once: indexing one token at a time would make autograd scatter a full-size zero
        # gradient per token (quadratic backward).
        steps = zip(*(t[:, start:end].unbind(1) for t in (dA, dBx, Cd)))
        for dA_t, dBx_t, C_t in steps:
            h = dA_t * h + dBx_t
            ys.append((h * C_t).sum(-1))
        finals.append(h)
    if not ys:  # no tokens at all
        y = xs * 0
    elif cu_seqlens is None:
        y = torch.stack(ys, dim=1)
    else:
        y = torch.cat(ys, dim=0).unsqueeze(0)
    if D is not None:
        y = y + xs * D.to(ct)
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(x.dtype)
    if not return_final_state:
        return y
    return y, torch.cat(finals, dim=0)


def selective_state_update_ref(
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
    """One decode step of the selective scan against a state cache, updated in place.

    ``state (n_slots, d_inner, N)`` (float32 or bfloat16), ``x, dt, z (b, d_inner)``,
    ``B (b, G_B, N)``, ``C (b, G_C, N)``; row ``i`` uses slot ``state_indices[i]`` (row ``i`` when
    None) and rows whose slot is ``pad_slot_id`` are left alone (their output is zero).
    """
    bsz, d = x.shape
    ct = compute_dtype(x.dtype)
    c_idx, b_idx = group_index(d, C.shape[1], B.shape[1], x.device)
    rows, slots = live_slots(state_indices, bsz, pad_slot_id, x.device)
    delta = discretize_dt(dt[rows], dt_bias, dt_softplus, ct)
    xs = x[rows].to(ct)
    h = state[slots].to(ct)
    h = torch.exp(delta.unsqueeze(-1) * A.to(ct)) * h + (delta * xs).unsqueeze(-1) * B[rows].to(ct)[:, b_idx]
    state[slots] = h.to(state.dtype)
    y = (h * C[rows].to(ct)[:, c_idx]).sum(-1)
    if D is not None:
        y = y + xs * D.to(ct)
    if z is not None:
        y = y * F.silu(z[rows].to(ct))
    out = torch.zeros_like(x)
    out[rows] = y.to(x.dtype)
    return out
