"""The ``use_fused_kernels`` forward of M1 in VeRL: token log-probs and entropy from hidden states.

VeRL's FSDP engine (``use_fused_kernels=True``) calls the model with ``temperature``,
``return_dict=True`` and, under remove-padding, ``shift_labels`` (the next token of every packed
position, rolled over the whole packed row), and reads ``output.log_probs`` / ``output.entropy``
of shape ``(1, total_nnz)`` (or ``(batch, seqlen)`` without remove-padding). This forward runs the
M1 backbone, then ``m1_kernels.fused_linear_logprob_entropy`` over the lm_head in token chunks, so
the ``(T, V)`` logits never exist at once, in forward or backward.

Example::

    >>> import torch
    >>> from m1_hybrid import M1HybridConfig, M1HybridForCausalLM
    >>> from verl_m1.fused import m1_forward_for_ppo
    >>> cfg = M1HybridConfig(num_hidden_layers=2, attn_layers=[1], hidden_size=64, num_attention_heads=2,
    ...     num_key_value_heads=1, intermediate_size=128, vocab_size=50)
    >>> model = M1HybridForCausalLM(cfg)
    >>> out = m1_forward_for_ppo(model, input_ids=torch.tensor([[1, 2, 3, 4, 5]]),
    ...     position_ids=torch.tensor([[0, 1, 2, 0, 1]]), return_dict=True)
    >>> out.log_probs.shape, out.entropy.shape
    (torch.Size([1, 5]), torch.Size([1, 5]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from transformers.modeling_outputs import CausalLMOutputWithPast

from m1_kernels import fused_linear_logprob_entropy


@dataclass
class M1OutputForPPO(CausalLMOutputWithPast):
    """Causal-LM output carrying per-token ``log_probs`` and ``entropy`` (what VeRL's engine reads)."""

    log_probs: torch.FloatTensor | None = None
    entropy: torch.FloatTensor | None = None


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as a plain tensor: the full value of a (sharded) DTensor, anything else unchanged."""
    if isinstance(t, DTensor):
        return t.full_tensor()
    return t


def m1_forward_for_ppo(
    self,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    past_key_values=None,
    inputs_embeds: torch.FloatTensor | None = None,
    labels: torch.LongTensor | None = None,
    use_cache: bool | None = None,
    output_hidden_states: bool | None = None,
    return_dict: bool | None = True,
    temperature: float = 1.0,
    shift_labels: torch.LongTensor | None = None,
    **kwargs,
) -> M1OutputForPPO:
    """Replacement ``forward`` of :class:`m1_hybrid.M1HybridForCausalLM` under VeRL's ``use_fused_kernels``.

    ``log_probs[b, t]`` is ``log softmax(logits[b, t] / temperature)[next token]`` and ``entropy[b, t]``
    the entropy of that distribution, both fp32 and differentiable. The next token is ``shift_labels``
    when given (VeRL's globally rolled labels), else ``labels`` or ``input_ids`` rolled left by one.
    Packed rows keep their document boundaries (the backbone reads them from ``position_ids``).
    """
    if return_dict is False:
        raise NotImplementedError("the M1 fused forward returns a dataclass output (return_dict=True)")
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise NotImplementedError("the M1 fused forward takes one scalar temperature")
        temperature = float(temperature)
    out = self.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        output_hidden_states=output_hidden_states,
    )
    hidden = out.last_hidden_state  # (b, L, H)
    if shift_labels is not None:
        targets = shift_labels
    elif labels is not None:
        targets = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        targets = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise ValueError("the M1 fused forward needs input_ids, labels or shift_labels")
    b, L, H = hidden.shape
    # We call the lm_head's weight directly instead of the module, so FSDP2 never unshards it for us when
    # it wraps the head (or the tied embedding) as its own unit: gather a sharded DTensor ourselves.
    # ``full_tensor`` is differentiable, its backward hands each rank the gradient of its shard.
    weight = _full(self.lm_head.weight)
    bias = _full(getattr(self.lm_head, "bias", None))
    log_probs, entropy = fused_linear_logprob_entropy(
        hidden.reshape(b * L, H).to(weight.dtype),
        weight,
        targets.reshape(b * L).to(hidden.device),
        temperature=temperature,
        bias=bias,
    )
    # Fresh tensors, not views: FSDP2 warns that in-place ops on a returned view would skip its backward hook.
    return M1OutputForPPO(
        log_probs=log_probs.view(b, L).clone(),
        entropy=entropy.view(b, L).clone(),
        past_key_values=out.past_key_values,
        hidden_states=out.hidden_states,
    )
