"""Chunked token log-prob + entropy (GRPO) with a recomputing backward.

Forward: per chunk of C token rows, build the logits (from hidden states through the lm_head, or a
slice of given logits), reduce each row to ``logprob``, ``entropy`` and ``lse`` (fp32), drop the
chunk. Backward: rebuild each chunk's logits, turn them in place into ``dL/dlogits`` using the saved
``lse``/``entropy`` and the incoming ``(g_logprob, g_entropy)``, then fold them into the gradients of
hidden/weight/bias (or copy them out for the logits variant). Saved for backward: the inputs and
three fp32 ``(T,)`` vectors. Peak extra memory: O(C·V) (plus ``grad_weight`` fp32 ``(V, H)``), never
O(T·V) except the returned ``(T, V)`` gradient of :func:`logprob_entropy_from_logits`.
"""

import torch

from m1_kernels.dispatch import use_triton
from m1_kernels.fused_kl.fused import _addmm_fp32_
from m1_kernels.fused_kl.fused import default_chunk_rows


def _fwd_rows_torch(x, labels, lp_out, ent_out, lse_out, *, temperature, ignore_index):
    l = x.to(torch.float32, copy=True).div_(temperature)
    lse = torch.logsumexp(l, dim=-1)
    valid = labels != ignore_index
    lp = l.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0] - lse
    p = (l - lse[:, None]).exp_()
    ent = lse - (p.mul_(l)).sum(-1)
    lp_out.copy_(torch.where(valid, lp, 0.0))
    ent_out.copy_(torch.where(valid, ent, 0.0))
    lse_out.copy_(lse)


def _bwd_rows_torch(x, grad, labels, lse, ent, g_lp, g_ent, *, temperature, ignore_index):
    valid = labels != ignore_index
    logp = x.to(torch.float32, copy=True).div_(temperature).sub_(lse[:, None])
    p = logp.exp()
    g_lp = g_lp.float()
    g = logp.add_(ent[:, None]).mul_(p).mul_(-g_ent.float()[:, None])  # -g_ent p (log p + H)
    g.sub_(p.mul_(g_lp[:, None]))  # - g_lp p
    g.scatter_add_(1, torch.where(valid, labels, 0)[:, None], g_lp[:, None])  # + g_lp onehot
    g.div_(temperature).masked_fill_(~valid[:, None], 0.0)
    grad.copy_(g)


def _fwd_rows(x, *args, **kw):
    if use_triton(x):
        from m1_kernels.logprob_entropy.triton_kernels import lpe_fwd_triton

        return lpe_fwd_triton(x, *args, **kw)
    return _fwd_rows_torch(x, *args, **kw)


def _bwd_rows(x, *args, **kw):
    if use_triton(x):
        from m1_kernels.logprob_entropy.triton_kernels import lpe_bwd_triton

        return lpe_bwd_triton(x, *args, **kw)
    return _bwd_rows_torch(x, *args, **kw)


def _vectors(T, device):
    return tuple(torch.empty(T, dtype=torch.float32, device=device) for _ in range(3))


class LinearLogprobEntropyFunction(torch.autograd.Function):
    """Autograd Function behind :func:`fused_linear_logprob_entropy`; ``hidden (T, H)``, ``weight (V, H)``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, chunk_size):
        T, H = hidden.shape
        V = weight.shape[0]
        chunk = chunk_size or default_chunk_rows(T, V, H, use_triton(hidden))
        lp, ent, lse = _vectors(T, hidden.device)
        for start in range(0, T, chunk):
            sl = slice(start, start + chunk)
            logits = torch.nn.functional.linear(hidden[sl], weight, bias).contiguous()
            _fwd_rows(logits, labels[sl], lp[sl], ent[sl], lse[sl], temperature=temperature, ignore_index=ignore_index)
            del logits
        ctx.save_for_backward(hidden, weight, bias, labels, lse, ent)
        ctx.opts = (temperature, ignore_index, chunk)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
        temperature, ignore_index, chunk = ctx.opts
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        T, H = hidden.shape
        V = weight.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros((V, H), dtype=torch.float32, device=hidden.device) if need_w else None
        grad_b = torch.zeros((V,), dtype=torch.float32, device=hidden.device) if need_b else None
        for start in range(0, T, chunk):
            sl = slice(start, start + chunk)
            h = hidden[sl]
            logits = torch.nn.functional.linear(h, weight, bias).contiguous()
            _bwd_rows(
                logits, logits, labels[sl], lse[sl], ent[sl], g_lp[sl], g_ent[sl],
                temperature=temperature, ignore_index=ignore_index,
            )  # fmt: skip
            if need_h:
                torch.mm(logits, weight, out=grad_h[sl])
            if need_w:
                _addmm_fp32_(grad_w, logits.t(), h)
            if need_b:
                grad_b += logits.sum(0, dtype=torch.float32)
            del logits
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


class LogprobEntropyFunction(torch.autograd.Function):
    """Autograd Function behind :func:`logprob_entropy_from_logits`; ``logits (T, V)``."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, chunk_size):
        T, V = logits.shape
        x = logits.contiguous()
        chunk = chunk_size or default_chunk_rows(T, V, None, use_triton(x))
        lp, ent, lse = _vectors(T, x.device)
        for start in range(0, T, chunk):
            sl = slice(start, start + chunk)
            _fwd_rows(x[sl], labels[sl], lp[sl], ent[sl], lse[sl], temperature=temperature, ignore_index=ignore_index)
        ctx.save_for_backward(x, labels, lse, ent)
        ctx.opts = (temperature, ignore_index, chunk)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        x, labels, lse, ent = ctx.saved_tensors
        temperature, ignore_index, chunk = ctx.opts
        grad = torch.empty_like(x)
        for start in range(0, x.shape[0], chunk):
            sl = slice(start, start + chunk)
            _bwd_rows(
                x[sl], grad[sl], labels[sl], lse[sl], ent[sl], g_lp[sl], g_ent[sl],
                temperature=temperature, ignore_index=ignore_index,
            )  # fmt: skip
        return grad, None, None, None, None


def _check(temperature, chunk_size):
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def fused_linear_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log p(label)`` and entropy of ``softmax((hidden @ weight.T + bias) / temperature)``, chunked.

    Both outputs are fp32 and differentiable wrt ``hidden``, ``weight`` and ``bias``: any loss of
    them (e.g. ``pg_loss(logprobs) - c * entropy.mean()``) backpropagates correctly. No ``(T, V)``
    tensor is kept: the forward keeps three fp32 ``(T,)`` vectors and the backward rebuilds each
    chunk's logits (one extra lm_head matmul per chunk). Entropy ``H = lse(l) - sum softmax(l) l``.
    Tokens whose label is ``ignore_index`` get 0 for both outputs and no gradient.

    Args:
        hidden: ``(..., H)``; weight: ``(V, H)``; labels: ``(...)`` integer token ids.
        chunk_size: token rows per chunk (default ``next_pow2(ceil(T / ceil(V / H)))``).

    Returns:
        ``(logprobs, entropy)``, each fp32 of shape ``labels.shape``.

    Example::

        >>> import torch
        >>> from m1_kernels.logprob_entropy import fused_linear_logprob_entropy
        >>> h = torch.randn(2, 4, 16, requires_grad=True); w = torch.randn(50, 16, requires_grad=True)
        >>> lp, ent = fused_linear_logprob_entropy(h, w, torch.randint(0, 50, (2, 4)), temperature=0.7)
        >>> (-lp.mean() - 0.01 * ent.mean()).backward()
        >>> lp.shape, bool((lp <= 0).all()), h.grad.shape, w.grad.shape
        (torch.Size([2, 4]), True, torch.Size([2, 4, 16]), torch.Size([50, 16]))
    """
    _check(temperature, chunk_size)
    H = hidden.shape[-1]
    lp, ent = LinearLogprobEntropyFunction.apply(
        hidden.reshape(-1, H), weight, bias, labels.reshape(-1), float(temperature), ignore_index, chunk_size
    )
    return lp.view(labels.shape), ent.view(labels.shape)


def logprob_entropy_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    *,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log p(label)`` and entropy of ``softmax(logits / temperature)``, without fp32 ``(T, V)`` copies.

    Same outputs and gradients (wrt ``logits``, in its dtype) as the naive log-softmax version;
    only three fp32 ``(T,)`` vectors are saved, and the backward recomputes per chunk.

    Example::

        >>> import torch
        >>> from m1_kernels.logprob_entropy import logprob_entropy_from_logits
        >>> x = torch.randn(3, 10, requires_grad=True)
        >>> lp, ent = logprob_entropy_from_logits(x, torch.tensor([0, 5, 9]))
        >>> ent.sum().backward()
        >>> bool((ent > 0).all() and (ent <= torch.log(torch.tensor(10.0))).all()), x.grad.shape
        (True, torch.Size([3, 10]))
    """
    _check(temperature, chunk_size)
    V = logits.shape[-1]
    lp, ent = LogprobEntropyFunction.apply(
        logits.reshape(-1, V), labels.reshape(-1), float(temperature), ignore_index, chunk_size
    )
    return lp.view(labels.shape), ent.view(labels.shape)
