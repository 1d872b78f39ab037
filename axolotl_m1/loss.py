"""The stage-1 distillation loss, free of Axolotl: usable by the plugin's trainer and by plain PyTorch loops.

Loss (per micro-batch, over the counted positions ``P``: position ``t`` counts when its next-token
target ``labels[t+1]`` is trained (assistant tokens) and ``t+1`` does not start a packed document)::

    loss = kl_weight * mean_{t in P} KL_t + ce_weight * mean_{t in P} -log p_student(labels[t+1] | <= t)
    KL_t = sum_v p_s,t(v) (log p_s,t(v) - log p_t,t(v))          (reverse, the M1 loss; or forward)

This fixes the released code's off-by-one (it masked the *unshifted* logits with ``labels != -100``,
so it trained the position of each assistant token instead of the one predicting it).

Memory: the teacher's lm_head runs on the counted rows only (``(n, V)`` in the teacher's dtype);
the student's logits are never materialised: ``m1_kernels.fused_kl.fused_linear_kl_div`` streams
token chunks of ``hidden @ lm_head.T`` and computes the gradient in the forward pass. The CE (weight
or just logging) is computed chunk by chunk under activation checkpointing.

The fused loss runs inside the model's own ``forward`` (see :func:`install_distill_forward`), so
under FSDP the lm_head is unsharded there exactly as for an ordinary loss.

This module imports no Axolotl code (``benchmarks/distill_gpu.py`` runs it where Axolotl is not
installed); :mod:`axolotl_m1.trainer` re-exports its names.
"""

from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from m1_hybrid.packing import is_packed


@dataclass(frozen=True)
class DistillSettings:
    """Resolved loss settings (the plugin's ``m1_kl_*`` / ``m1_ce_weight`` YAML keys with defaults applied)."""

    kl_weight: float = 1.0
    ce_weight: float = 0.0
    direction: str = "reverse"
    temperature: float = 1.0
    chunk_size: int | None = None


IGNORE_INDEX = -100
_CE_CHUNK_ELEMS = 2**24  # rows x vocab per CE chunk (64 MiB of fp32 logits)


def document_starts(position_ids, attention_mask, shape, device) -> torch.Tensor:
    """``(b, L)`` bool: True where a packed document starts (position 0 or a segment-id change)."""
    starts = torch.zeros(shape, dtype=torch.bool, device=device)
    if not is_packed(position_ids, attention_mask):
        return starts
    if position_ids is not None:
        starts |= position_ids == 0
    if attention_mask is not None and attention_mask.dim() == 2:
        starts[:, 1:] |= attention_mask[:, 1:] != attention_mask[:, :-1]
    return starts


def distill_positions(labels, position_ids=None, attention_mask=None) -> torch.Tensor:
    """``(b, L)`` bool: positions whose next-token prediction is trained.

    Position ``t`` counts iff ``labels[t+1] != -100`` and ``t+1`` is not the first token of a packed
    document (the last token of one document never predicts the next one). The last position of a
    row never counts. Same set as the CE of ``M1HybridForCausalLM.next_token_loss``.

    Example::

        >>> import torch
        >>> distill_positions(torch.tensor([[-100, -100, 7, 8, -100]])).int().tolist()
        [[0, 1, 1, 0, 0]]
    """
    b, L = labels.shape
    counted = torch.zeros(b, L, dtype=torch.bool, device=labels.device)
    nxt = labels[:, 1:] != IGNORE_INDEX
    nxt &= ~document_starts(position_ids, attention_mask, (b, L), labels.device)[:, 1:]
    counted[:, :-1] = nxt
    return counted


@dataclass
class DistillBatch:
    """What the distillation forward needs besides the model inputs."""

    positions: torch.Tensor  # (b, L) bool
    teacher_logits: torch.Tensor  # (n, V), teacher dtype
    targets: torch.Tensor  # (n,) next-token ids at the counted positions
    settings: DistillSettings


@dataclass
class M1DistillOutput(CausalLMOutputWithPast):
    """``loss`` plus detached logging stats: mean ``kl``, mean ``ce``, teacher-student ``top1`` agreement."""

    kl: torch.Tensor | None = None
    ce: torch.Tensor | None = None
    top1: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None


def _ce_sum(hidden, weight, bias, targets):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_cross_entropy(hidden, weight, bias, targets, chunk_rows: int | None = None, grad: bool = True):
    """Mean CE of ``hidden @ weight.T (+ bias)`` against ``targets``, ``chunk_rows`` at a time.

    Each chunk is checkpointed: only one ``(chunk_rows, V)`` block of logits exists at a time, in the
    forward and in the backward (recomputed). 0 when there are no rows.
    """
    n, V = hidden.shape[0], weight.shape[0]
    rows = chunk_rows or max(1, _CE_CHUNK_ELEMS // V)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, rows):
        args = (hidden[start : start + rows], weight, bias, targets[start : start + rows])
        if grad and torch.is_grad_enabled():
            part = torch.utils.checkpoint.checkpoint(_ce_sum, *args, use_reentrant=False)
        else:
            with torch.no_grad():
                part = _ce_sum(*args)
        total = total + part
    return total / max(n, 1)


def distill_loss(head, hidden, batch: DistillBatch) -> M1DistillOutput:
    """The loss (module docstring) from the student's final hidden states at the counted positions.

    Args:
        head: the student's ``lm_head`` (``weight (V, H)``, optional ``bias``).
        hidden: ``(n, H)`` final hidden states (after the last norm) at ``batch.positions``.
        batch: teacher logits ``(n, V)``, targets ``(n,)`` and settings.
    """
    from m1_kernels.fused_kl import fused_linear_kl_div

    s = batch.settings
    teacher = batch.teacher_logits.to(hidden.device)
    weight, bias = head.weight, head.bias
    chunk = s.chunk_size
    if chunk is None and not hidden.is_cuda:
        # The op's default (sized for GPU memory) gives 1-2 row chunks for short CPU batches: 10x slower.
        chunk = max(1, _CE_CHUNK_ELEMS // weight.shape[0])
    device_type = hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        # fp32 parameters under autocast: the fused op's matmuls write into preallocated buffers
        # (``out=``), which autocast does not cast; cast its inputs the way autocast casts a linear.
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        kl, stats = fused_linear_kl_div(
            hidden,
            weight,
            teacher,
            None,
            direction=s.direction,
            temperature=s.temperature,
            chunk_size=chunk,
            return_stats=True,
            lm_head_bias=bias,
        )
    ce = chunked_cross_entropy(hidden, weight, bias, batch.targets, chunk, grad=s.ce_weight > 0)
    loss = s.kl_weight * kl
    if s.ce_weight > 0:
        loss = loss + s.ce_weight * ce
    return M1DistillOutput(
        loss=loss, kl=stats.kl, ce=ce.detach(), top1=stats.top1_agreement, num_tokens=stats.num_tokens
    )


def distill_forward(model, batch: DistillBatch, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
    """The distillation loss of an ``M1HybridForCausalLM`` (called inside its forward): decoder, then
    :func:`distill_loss` on the final hidden states at the counted positions."""
    out = model.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        inputs_embeds=kwargs.get("inputs_embeds"),
        use_cache=False,
    )
    return distill_loss(model.lm_head, out.last_hidden_state[batch.positions], batch)


def install_distill_forward(model) -> None:
    """Give ``model`` (an ``M1HybridForCausalLM`` instance) a ``m1_distill=`` path in its ``forward``.

    Without the keyword the model behaves exactly as before (same signature, same outputs); with a
    :class:`DistillBatch` it returns :class:`M1DistillOutput`. Only this instance is changed.
    """
    if getattr(model, "_m1_distill_forward", False):
        return
    cls_forward = type(model).forward

    @functools.wraps(cls_forward)
    def forward(self, *args, m1_distill: DistillBatch | None = None, **kwargs):
        if m1_distill is None:
            return cls_forward(self, *args, **kwargs)
        if args:
            raise TypeError("the distillation forward takes keyword arguments only")
        kwargs.pop("labels", None)
        return distill_forward(self, m1_distill, **kwargs)

    model.forward = types.MethodType(forward, model)
    model._m1_distill_forward = True
