"""Plain PyTorch references for token log-probs and entropy: full ``(T, V)`` fp32 log-softmax under autograd."""

import torch


def logprob_entropy_from_logits_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    *,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`m1_kernels.logprob_entropy.logprob_entropy_from_logits`: ``(logprobs, entropy)`` fp32."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    valid = labels != ignore_index
    lp = logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)


def fused_linear_logprob_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`m1_kernels.logprob_entropy.fused_linear_logprob_entropy`: lm_head then the above."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return logprob_entropy_from_logits_ref(logits, labels, temperature, ignore_index=ignore_index)
