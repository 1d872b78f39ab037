"""Layer-wise alignment: train each converted Mamba mixer to reproduce the attention it replaced.

Before end-to-end distillation, every Mamba mixer of a freshly converted student can learn, on its
own, to map the teacher's input of that layer to the teacher's attention output (MOHAWK's
"hidden-state alignment", Bick et al. 2024, arXiv 2408.10189). The targets come from one teacher
forward pass, and the layers do not feed each other (each mixer sees the teacher's input, not the
previous student layer's output), so all of them train in parallel from a single backward and the
gradients are local: no signal has to travel through 30 layers and the lm_head. End-to-end
reverse-KL distillation then starts from mixers that already approximate their attention.

The loss of layer ``i`` is the relative squared error over the real tokens::

    rel_i = sum_t ||mamba_i(u_t) - attn_i(u_t)||^2 / sum_t ||attn_i(u_t)||^2

with ``u`` the teacher's input of layer ``i`` after its ``input_layernorm``. Relative, so layers
whose attention output is large do not dominate; the training loss is the mean over layers.

Example::

    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from m1_hybrid.convert import convert_model
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> teacher = LlamaForCausalLM(cfg).eval()
    >>> student = convert_model(teacher, attn_layers=[1], d_state=4)
    >>> align = AttentionAlignment(teacher, student)
    >>> out = align(torch.randint(0, 64, (2, 8)), torch.arange(8).repeat(2, 1))
    >>> out.layers, tuple(out.per_layer.shape), bool(out.loss > 0)
    ([0], (1,), True)
    >>> align.remove()

:func:`substitution_kl` then scores each aligned mixer by the damage it does alone inside the teacher,
and :func:`choose_attention_layers` keeps attention where that is largest (``distill_gpu.py
--attn-layers auto``: align a student converted with no attention layers, then choose).

:func:`alignment_step` is one optimiser step of that loss over the Mamba parameters
(:func:`mamba_parameters`, :func:`alignment_optimizer`); the Axolotl plugin (``m1_align_steps``,
:mod:`axolotl_m1.align`) and ``benchmarks/distill_gpu.py`` (``--align-minutes``) loop over it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .varlen_attention import hf_packed_kwargs


@dataclass
class AlignmentOutput:
    """``loss``: mean relative error over the aligned layers (differentiable); ``per_layer`` (detached)."""

    loss: torch.Tensor
    per_layer: torch.Tensor
    layers: list[int]


class AttentionAlignment:
    """Captures the teacher's per-layer attention inputs/outputs and scores the student's mixers on them.

    ``teacher``: the Llama/Qwen2 model the student was converted from (frozen); ``student``: an
    ``M1HybridForCausalLM`` with the same layer count. Only the student's Mamba layers are aligned
    (its attention layers are the teacher's own). Call :meth:`remove` to detach the hooks.
    """

    def __init__(self, teacher, student):
        t_layers = getattr(teacher, teacher.base_model_prefix).layers
        s_layers = student.model.layers
        if len(t_layers) != len(s_layers):
            raise ValueError(
                f"teacher has {len(t_layers)} layers, student {len(s_layers)}: align a student converted from "
                "this teacher (m1_hybrid.convert.convert_model)"
            )
        self.teacher, self.student = teacher, student
        self.layers = [i for i, layer in enumerate(s_layers) if not layer.is_attention]
        self._captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooks = [
            t_layers[i].self_attn.register_forward_hook(self._capture(i), with_kwargs=True) for i in self.layers
        ]

    def _capture(self, index: int):
        def hook(module, args, kwargs, output):
            inputs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            attn_out = output[0] if isinstance(output, tuple) else output
            self._captured[index] = (inputs.detach(), attn_out.detach())

        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __call__(self, input_ids, position_ids=None, token_mask=None) -> AlignmentOutput:
        """Teacher forward (no grad), then every aligned mixer on its captured input.

        ``position_ids`` restarting at 0 mark packed documents (the mixers then reset their SSM and
        conv state there, as the teacher's attention does); ``token_mask (b, L)`` (True = counted)
        drops padding from the sums.
        """
        self._captured.clear()
        base = getattr(self.teacher, self.teacher.base_model_prefix)
        packed = hf_packed_kwargs(position_ids)  # {} unless packed; cu_seqlens for the teacher and the mixers
        with torch.no_grad():
            base(input_ids=input_ids, position_ids=position_ids, use_cache=False, **packed)
        cu = packed.get("cu_seq_lens_q")
        weight = None if token_mask is None else token_mask.unsqueeze(-1)
        losses = []
        for i in self.layers:
            u, target = self._captured[i]
            pred = _run_mixer(self.student.model.layers[i].mamba, u, cu)
            acc = torch.promote_types(pred.dtype, torch.float32)  # bf16 outputs are compared in fp32
            err = (pred.to(acc) - target.to(acc)).square()
            ref = target.to(acc).square()
            if weight is not None:
                err, ref = err * weight.to(acc), ref * weight.to(acc)
            losses.append(err.sum() / ref.sum().clamp_min(1e-12))
        self._captured.clear()
        per_layer = torch.stack(losses)
        return AlignmentOutput(per_layer.mean(), per_layer.detach(), list(self.layers))


def _run_mixer(mixer, u, cu_seqlens):
    """A Mamba mixer on a teacher layer input ``u (b, L, H)``; packed rows run as one row of documents."""
    u = u.to(mixer.in_proj.weight.dtype)
    if cu_seqlens is None:
        return mixer(u)
    b, L, _ = u.shape  # as in M1DecoderLayer: state resets at every document start
    return mixer(u.reshape(1, b * L, -1), cu_seqlens=cu_seqlens).view(b, L, -1)


@torch.no_grad()
def substitution_kl(teacher, student, input_ids, position_ids=None, token_mask=None) -> dict[int, float]:
    """How much each aligned mixer alone costs the teacher: ``{layer: KL(p_swapped || p_teacher)}``.

    For every Mamba layer ``i`` of ``student``, the teacher runs with only its layer-``i`` attention
    replaced by the student's mixer ``i`` (same input, same residual path, everything else exact),
    and the reverse KL to the unmodified teacher is averaged over the counted tokens
    (``token_mask``, default all). Unlike a mixer's relative error, this weighs the error by what
    it does to the next-token distribution: a layer whose attention output is small next to the
    residual stream, or that later layers correct, scores low. :func:`choose_attention_layers`
    keeps attention where the score is highest.
    """
    base = getattr(teacher, teacher.base_model_prefix)
    packed = hf_packed_kwargs(position_ids)  # {} unless packed
    cu = packed.get("cu_seq_lens_q")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if token_mask is None else token_mask.bool()

    def logprobs():  # full-vocabulary logits at the counted tokens only
        hidden = base(input_ids=input_ids, position_ids=position_ids, use_cache=False, **packed).last_hidden_state
        return torch.log_softmax(teacher.get_output_embeddings()(hidden[mask]).float(), dim=-1)

    reference = logprobs()
    scores = {}
    for i, layer in enumerate(student.model.layers):
        if layer.is_attention:
            continue

        def swap(module, args, kwargs, output, mixer=layer.mamba):
            u = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            new = _run_mixer(mixer, u, cu).to(u.dtype)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        hook = base.layers[i].self_attn.register_forward_hook(swap, with_kwargs=True)
        try:
            swapped = logprobs()
        finally:
            hook.remove()
        kl = (swapped.exp() * (swapped - reference)).sum(-1)  # KL(p_swapped || p_teacher) per token
        scores[i] = float(kl.mean())
    return scores


def mean_substitution_kl(teacher, student, batches, autocast=contextlib.nullcontext) -> dict[int, float]:
    """:func:`substitution_kl` over ``batches`` of ``(input_ids, position_ids, token_mask)``, weighted by
    their counted tokens (batches with none are skipped), with the student in eval mode meanwhile."""
    was_training = student.training
    student.eval()
    totals: dict[int, float] = {}
    count = 0
    try:
        for input_ids, position_ids, token_mask in batches:
            weight = int(token_mask.sum())
            if weight == 0:
                continue
            with autocast():
                scores = substitution_kl(teacher, student, input_ids, position_ids, token_mask)
            for i, v in scores.items():
                totals[i] = totals.get(i, 0.0) + v * weight
            count += weight
    finally:
        student.train(was_training)
    if not count:
        raise ValueError("no counted tokens in the scoring batches: score on batches with assistant tokens")
    return {i: v / count for i, v in totals.items()}


def choose_attention_layers(scores: dict[int, float], num_attention: int) -> list[int]:
    """The ``num_attention`` layers whose substitution costs most (:func:`substitution_kl`), sorted.

    Example::

        >>> choose_attention_layers({0: 0.9, 1: 0.1, 2: 0.5, 3: 0.05}, 2)
        [0, 2]
    """
    if not 0 < num_attention <= len(scores):
        raise ValueError(f"num_attention must be in 1..{len(scores)} (the scored layers), got {num_attention}")
    return sorted(sorted(scores, key=lambda i: scores[i], reverse=True)[:num_attention])


def mamba_parameters(student) -> list[torch.nn.Parameter]:
    """The parameters alignment trains: those of the Mamba mixers (names containing ``.mamba.``)."""
    return [p for n, p in student.named_parameters() if ".mamba." in n]


def alignment_optimizer(params, lr: float, fused: bool = False) -> torch.optim.AdamW:
    """AdamW for the alignment stage: betas (0.9, 0.95), no weight decay."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, fused=fused)


def alignment_step(
    align: AttentionAlignment,
    optimizer: torch.optim.Optimizer,
    params,
    input_ids,
    position_ids=None,
    token_mask=None,
    autocast=contextlib.nullcontext,
    max_grad_norm: float = 1.0,
    reduce_grads=None,
) -> tuple[AlignmentOutput, float]:
    """One alignment step: score under ``autocast()``, backward, clip ``params`` to ``max_grad_norm``, step.

    Sets the learning rate only through ``optimizer`` (the caller schedules it); returns the
    step's :class:`AlignmentOutput` and the gradient norm before clipping. ``reduce_grads(params)``, if
    given, runs between the backward and the clip: data parallelism averages the ranks' gradients there.
    """
    with autocast():
        out = align(input_ids, position_ids, token_mask)
    out.loss.backward()
    if reduce_grads is not None:
        reduce_grads(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return AlignmentOutput(out.loss.detach(), out.per_layer, out.layers), float(grad_norm)
