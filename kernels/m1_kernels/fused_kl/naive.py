"""Plain PyTorch references for the fused KL losses: full ``(T, V)`` fp32 log-softmaxes under autograd.

These are the ground truth the fused paths are tested against and the baselines the benchmarks
beat. They materialise every ``(T, V)`` intermediate, so keep them to test-sized inputs.
"""

import torch

from m1_kernels.fused_kl.stats import KLStats


def _check_direction(direction: str) -> None:
    if direction not in ("reverse", "forward"):
        raise ValueError(f"direction must be 'reverse' or 'forward', got {direction!r}")


def fused_kl_div_ref(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    direction: str = "reverse",
    temperature: float = 1.0,
    return_stats: bool = False,
):
    """Reference of :func:`m1_kernels.fused_kl.fused_kl_div` (same arguments and outputs)."""
    _check_direction(direction)
    log_ps = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_pt = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if direction == "reverse":
        kl_rows = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    else:
        kl_rows = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if labels is None:
        mask = torch.ones_like(kl_rows, dtype=torch.bool)
    else:
        mask = labels != ignore_index
    n = mask.sum()
    # Masked rows are zeroed with where (not multiplied), so a row of inf/NaN there cannot leak.
    loss = torch.where(mask, kl_rows, 0.0).sum() / n.clamp_min(1)
    if not return_stats:
        return loss
    agree = student_logits.detach().argmax(-1) == teacher_logits.detach().argmax(-1)
    stats = KLStats(
        kl=loss.detach(),
        top1_agreement=(agree & mask).sum().float() / n.clamp_min(1),
        num_tokens=n,
    )
    return loss, stats


def fused_linear_kl_div_ref(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    direction: str = "reverse",
    temperature: float = 1.0,
    return_stats: bool = False,
    lm_head_bias: torch.Tensor | None = None,
):
    """Reference of :func:`m1_kernels.fused_kl.fused_linear_kl_div`: ``lm_head`` then :func:`fused_kl_div_ref`."""
    student_logits = torch.nn.functional.linear(student_hidden, lm_head_weight, lm_head_bias)
    return fused_kl_div_ref(
        student_logits,
        teacher_logits,
        labels,
        ignore_index=ignore_index,
        direction=direction,
        temperature=temperature,
        return_stats=return_stats,
    )
