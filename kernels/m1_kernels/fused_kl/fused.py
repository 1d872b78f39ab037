"""Fused, token-chunked KL losses for distillation: the gradient is computed in the forward pass.

Two autograd Functions share one per-chunk routine, ``_kl_rows``, which for a block of rows
writes the per-row KL, the top-1 agreement and the gradient of ``sum_rows KL / n`` wrt the student
logits. It is a Triton kernel on CUDA (``triton_kernels.py``) and chunked fp32 PyTorch elsewhere.

Memory (T tokens, V vocabulary, H hidden, C = chunk rows, b = bytes per input element):

- ``fused_kl_div``: the only ``(T, V)`` tensor created is the returned student gradient (b·T·V);
  the Triton path keeps O(T) scalars beside it, the PyTorch path ~4 fp32 ``(C, V)`` temporaries.
  The naive version keeps ~6 fp32 ``(T, V)`` tensors for autograd (4·6·T·V bytes).
- ``fused_linear_kl_div``: per chunk, the student logits ``(C, V)`` are built, overwritten in place
  by their gradient, and folded into ``grad_hidden (T, H)`` and an fp32 ``grad_weight (V, H)``.
  No ``(T, V)`` tensor exists at any time. The default ``C = next_pow2(ceil(T / ceil(V / H)))``
  makes the ``(C, V)`` logits buffer about as large as the hidden states ``(T, H)``.
"""

import torch

from m1_kernels.dispatch import use_triton
from m1_kernels.fused_kl.naive import _check_direction
from m1_kernels.fused_kl.stats import KLStats

# The PyTorch path keeps a few fp32 (C, V) buffers: 2**23 elements = 32 MiB each.
_TORCH_CHUNK_ELEMS = 2**23


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def default_chunk_rows(T: int, V: int, H: int | None, triton: bool) -> int:
    """Rows per chunk: ``next_pow2(ceil(T / ceil(V / H)))`` with an lm_head, else a fixed fp32 budget.

    Without an lm_head the Triton kernel streams every row independently, so one launch covers all T.
    """
    if H is not None:
        inc = -(-V // H)
        # At least 64 rows: tiny chunks cost a matmul launch each for nothing (short CPU batches).
        return max(1, min(T, max(64, _next_pow2(-(-T // inc)))))
    if triton:
        return max(1, T)
    return max(1, min(T, _TORCH_CHUNK_ELEMS // V))


def _kl_rows_torch(s, t, grad, labels, inv_n, kl_out, agree_out, *, ignore_index, reverse, temperature):
    """Chunked PyTorch twin of ``kl_rows_triton`` (same contract; ``grad`` may alias ``s``)."""
    agree = s.argmax(-1) == t.argmax(-1)  # before s may be overwritten
    log_ps = torch.log_softmax(s.to(torch.float32, copy=True).div_(temperature), dim=-1)
    log_pt = torch.log_softmax(t.to(torch.float32, copy=True).div_(temperature), dim=-1)
    if reverse:
        p = log_ps.exp()
        d = log_ps.sub_(log_pt)  # log p_s - log p_t, in place
        kl = (p * d).sum(-1)
        g = p.mul_(d.sub_(kl[:, None]))  # p_s (d - KL)
    else:
        p_t = log_pt.exp()
        kl = (p_t * log_pt.sub_(log_ps)).sum(-1)
        g = log_ps.exp_().sub_(p_t)  # p_s - p_t
    g.mul_(inv_n / temperature)
    if labels is not None:
        counted = labels != ignore_index
        g.masked_fill_(~counted[:, None], 0.0)
        kl = torch.where(counted, kl, 0.0)
        agree &= counted
    grad.copy_(g)
    kl_out.copy_(kl)
    agree_out.copy_(agree)


def _kl_rows(s, t, grad, labels, inv_n, kl_out, agree_out, **kw):
    if use_triton(s):
        from m1_kernels.fused_kl.triton_kernels import kl_rows_triton

        return kl_rows_triton(s, t, grad, labels, inv_n, kl_out, agree_out, **kw)
    return _kl_rows_torch(s, t, grad, labels, inv_n, kl_out, agree_out, **kw)


def _count(labels, T, ignore_index, device):
    if labels is None:
        n = torch.full((), T, dtype=torch.int64, device=device)
    else:
        n = (labels != ignore_index).sum()
    return n, 1.0 / n.clamp_min(1).to(torch.float32)


_FP32_OUT_MM = {"ok": True}


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32 and ``a``/``b`` possibly bf16/fp16 (fp32 accumulation)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _FP32_OUT_MM["ok"]:
        try:  # cuBLAS bf16 x bf16 -> fp32 with beta = 1 (torch >= 2.8)
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):
            _FP32_OUT_MM["ok"] = False
    acc.add_(a @ b)  # low-precision product per chunk, fp32 sum across chunks


class _OnceBackward:
    @staticmethod
    def check(ctx):
        if getattr(ctx, "backward_done", False):
            raise RuntimeError("fused KL: backward can run once per forward (the stored gradients are scaled in place)")
        ctx.backward_done = True


class FusedKLDivFunction(torch.autograd.Function):
    """Autograd Function behind :func:`fused_kl_div`; inputs already 2-D ``(T, V)``."""

    @staticmethod
    def forward(ctx, student, teacher, labels, ignore_index, reverse, temperature, chunk_size):
        T, V = student.shape
        s, t = student.contiguous(), teacher.contiguous()
        triton = use_triton(s)
        chunk = chunk_size or default_chunk_rows(T, V, None, triton)
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(s) if need_grad else torch.empty((min(chunk, T), V), dtype=s.dtype, device=s.device)
        kl = torch.empty(T, dtype=torch.float32, device=s.device)
        agree = torch.empty(T, dtype=torch.float32, device=s.device)
        n, inv_n = _count(labels, T, ignore_index, s.device)
        for start in range(0, T, chunk):
            sl = slice(start, start + chunk)
            rows = min(chunk, T - start)
            _kl_rows(
                s[sl],
                t[sl],
                grad[sl] if need_grad else grad[:rows],
                None if labels is None else labels[sl],
                inv_n,
                kl[sl],
                agree[sl],
                ignore_index=ignore_index,
                reverse=reverse,
                temperature=temperature,
            )
        loss = kl.sum() * inv_n
        agreement = agree.sum() * inv_n
        ctx.save_for_backward(grad if need_grad else None)
        ctx.mark_non_differentiable(agreement, n)
        return loss, agreement, n

    @staticmethod
    def backward(ctx, grad_loss, _grad_agree, _grad_n):
        _OnceBackward.check(ctx)
        (grad,) = ctx.saved_tensors
        if grad is not None:
            grad.mul_(grad_loss)
        return grad, None, None, None, None, None, None


class FusedLinearKLDivFunction(torch.autograd.Function):
    """Autograd Function behind :func:`fused_linear_kl_div`; ``hidden (T, H)``, ``weight (V, H)``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, labels, ignore_index, reverse, temperature, chunk_size):
        T, H = hidden.shape
        V = weight.shape[0]
        dev = hidden.device
        t = teacher.contiguous()
        chunk = chunk_size or default_chunk_rows(T, V, H, use_triton(hidden))
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros((V, H), dtype=torch.float32, device=dev) if need_w else None
        grad_b = torch.zeros((V,), dtype=torch.float32, device=dev) if need_b else None
        kl = torch.empty(T, dtype=torch.float32, device=dev)
        agree = torch.empty(T, dtype=torch.float32, device=dev)
        n, inv_n = _count(labels, T, ignore_index, dev)
        for start in range(0, T, chunk):
            sl = slice(start, start + chunk)
            h = hidden[sl]
            logits = torch.nn.functional.linear(h, weight, bias).contiguous()  # (C, V), the only vocab buffer
            _kl_rows(
                logits,
                t[sl],
                logits,  # gradient written in place over the logits
                None if labels is None else labels[sl],
                inv_n,
                kl[sl],
                agree[sl],
                ignore_index=ignore_index,
                reverse=reverse,
                temperature=temperature,
            )
            if need_h:
                torch.mm(logits, weight, out=grad_h[sl])
            if need_w:
                _addmm_fp32_(grad_w, logits.t(), h)
            if need_b:
                grad_b += logits.sum(0, dtype=torch.float32)
            del logits
        loss = kl.sum() * inv_n
        agreement = agree.sum() * inv_n
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(agreement, n)
        return loss, agreement, n

    @staticmethod
    def backward(ctx, grad_loss, _grad_agree, _grad_n):
        _OnceBackward.check(ctx)
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if grad_h is not None:
            grad_h.mul_(grad_loss)
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss).to(ctx.weight_dtype)
        if grad_b is not None:
            grad_b = grad_b.mul_(grad_loss).to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def _check(direction, temperature, chunk_size):
    _check_direction(direction)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _finish(loss, agreement, n, return_stats):
    if return_stats:
        return loss, KLStats(kl=loss.detach(), top1_agreement=agreement, num_tokens=n)
    return loss


def fused_kl_div(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    direction: str = "reverse",
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_stats: bool = False,
):
    """Token-mean KL between student and teacher over the full vocabulary, memory-bounded.

    Per token (``s``, ``t`` = logits / temperature, ``p = softmax``):
    reverse ``KL(p_s || p_t) = sum_v p_s (log p_s - log p_t)``; forward ``KL(p_t || p_s)``.
    The loss is the sum over tokens with ``labels != ignore_index`` (all tokens when ``labels`` is
    None) divided by their count; with no counted token it is 0 and every gradient is 0. There is no
    ``temperature**2`` factor: multiply the loss yourself if you want one.

    The gradient wrt ``student_logits`` is computed during the forward pass in fp32 and stored in
    the student's dtype (a Triton kernel on CUDA, chunks of ``chunk_size`` rows of PyTorch
    otherwise); ``teacher_logits`` gets no gradient. Backward may run once per forward.

    Args:
        student_logits, teacher_logits: ``(..., V)``, any float dtype (bf16 in training).
        labels: ``(...)`` integer labels, only compared with ``ignore_index``; or None.
        direction: ``"reverse"`` (default, the distillation loss) or ``"forward"``.
        chunk_size: rows per chunk (default: all rows per Triton launch, a 32 MiB fp32 budget in PyTorch).
        return_stats: also return a :class:`KLStats` (mean KL, top-1 agreement, token count).

    Returns:
        0-d fp32 loss, or ``(loss, KLStats)``.

    Example::

        >>> import torch
        >>> from m1_kernels.fused_kl import fused_kl_div
        >>> s = torch.randn(6, 50, requires_grad=True); t = torch.randn(6, 50)
        >>> labels = torch.tensor([1, 2, -100, 4, 5, -100])
        >>> loss, stats = fused_kl_div(s, t, labels, return_stats=True)
        >>> loss.backward()
        >>> int(stats.num_tokens), bool(s.grad[2].abs().sum() == 0), loss.item() > 0
        (4, True, True)
    """
    _check(direction, temperature, chunk_size)
    V = student_logits.shape[-1]
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher {tuple(teacher_logits.shape)} != student {tuple(student_logits.shape)}")
    flat_labels = None if labels is None else labels.reshape(-1)
    loss, agreement, n = FusedKLDivFunction.apply(
        student_logits.reshape(-1, V),
        teacher_logits.detach().reshape(-1, V),
        flat_labels,
        ignore_index,
        direction == "reverse",
        float(temperature),
        chunk_size,
    )
    return _finish(loss, agreement, n, return_stats)


def fused_linear_kl_div(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    direction: str = "reverse",
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_stats: bool = False,
    lm_head_bias: torch.Tensor | None = None,
):
    """:func:`fused_kl_div` of ``student_hidden @ lm_head_weight.T (+ bias)``, never keeping the student logits.

    Token chunks of the student logits are built, turned in place into their gradient, and folded
    into the gradients of ``student_hidden``, ``lm_head_weight`` (accumulated in fp32, returned in
    the weight's dtype) and ``lm_head_bias``. Same loss, options and return value as
    :func:`fused_kl_div`.

    Args:
        student_hidden: ``(..., H)`` final hidden states (after the last norm).
        lm_head_weight: ``(V, H)``; lm_head_bias: ``(V,)`` or None.
        teacher_logits: ``(..., V)``; labels: ``(...)`` or None.
        chunk_size: token rows per chunk (default ``next_pow2(ceil(T / ceil(V / H)))``).

    Example::

        >>> import torch
        >>> from m1_kernels.fused_kl import fused_linear_kl_div
        >>> h = torch.randn(2, 5, 16, requires_grad=True); w = torch.randn(40, 16, requires_grad=True)
        >>> loss = fused_linear_kl_div(h, w, torch.randn(2, 5, 40), direction="forward", temperature=2.0)
        >>> loss.backward()
        >>> h.grad.shape, w.grad.shape
        (torch.Size([2, 5, 16]), torch.Size([40, 16]))
    """
    _check(direction, temperature, chunk_size)
    H = student_hidden.shape[-1]
    V = lm_head_weight.shape[0]
    if teacher_logits.shape[-1] != V or teacher_logits.numel() // V != student_hidden.numel() // H:
        raise ValueError(f"teacher {tuple(teacher_logits.shape)} does not match hidden {tuple(student_hidden.shape)}")
    flat_labels = None if labels is None else labels.reshape(-1)
    loss, agreement, n = FusedLinearKLDivFunction.apply(
        student_hidden.reshape(-1, H),
        lm_head_weight,
        lm_head_bias,
        teacher_logits.detach().reshape(-1, V),
        flat_labels,
        ignore_index,
        direction == "reverse",
        float(temperature),
        chunk_size,
    )
    return _finish(loss, agreement, n, return_stats)
