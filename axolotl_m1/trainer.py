"""Stage-1 distillation loss and trainer.

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
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from axolotl.core.trainers.base import AxolotlTrainer
from transformers.modeling_outputs import CausalLMOutputWithPast

from m1_hybrid.packing import is_packed

from .plugin import DistillSettings
from .plugin import settings as resolve_settings
from .plugin import teacher_dtype
from .teacher import check_vocab
from .teacher import load_teacher
from .teacher import load_teacher_tokenizer
from .teacher import teacher_logits_at

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


def distill_forward(model, batch: DistillBatch, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
    """The loss of :mod:`axolotl_m1.trainer` for an ``M1HybridForCausalLM`` (called inside its forward)."""
    from m1_kernels.fused_kl import fused_linear_kl_div

    s = batch.settings
    out = model.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        inputs_embeds=kwargs.get("inputs_embeds"),
        use_cache=False,
    )
    hidden = out.last_hidden_state[batch.positions]  # (n, H)
    head = model.lm_head
    teacher = batch.teacher_logits.to(hidden.device)
    chunk = s.chunk_size
    if chunk is None and not hidden.is_cuda:
        # The op's default (sized for GPU memory) gives 1-2 row chunks for short CPU batches: 10x slower.
        chunk = max(1, _CE_CHUNK_ELEMS // head.weight.shape[0])
    kl, stats = fused_linear_kl_div(
        hidden,
        head.weight,
        teacher,
        None,
        direction=s.direction,
        temperature=s.temperature,
        chunk_size=chunk,
        return_stats=True,
        lm_head_bias=head.bias,
    )
    ce = chunked_cross_entropy(hidden, head.weight, head.bias, batch.targets, chunk, grad=s.ce_weight > 0)
    loss = s.kl_weight * kl
    if s.ce_weight > 0:
        loss = loss + s.ce_weight * ce
    return M1DistillOutput(
        loss=loss, kl=stats.kl, ce=ce.detach(), top1=stats.top1_agreement, num_tokens=stats.num_tokens
    )


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


class _SeededRandomSampler(torch.utils.data.RandomSampler):
    """A random permutation that depends only on ``(seed, epoch)``, not on the global RNG's history."""

    def __init__(self, data_source, seed: int):
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def __iter__(self):
        gen = torch.Generator()
        gen.manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=gen).tolist()


class M1Trainer(AxolotlTrainer):
    """Axolotl's trainer with a resumable packed data order (used for SFT and, subclassed, distillation).

    Axolotl's packed sampler shuffles with the global RNG at the moment the epoch starts, so a run
    resumed from a checkpoint (which consumed the RNG differently before that point) sees other
    batches than the original run. Here the shuffle is seeded by ``data_seed``/``seed`` and the
    epoch, so ``resume_from_checkpoint`` continues the same run.
    """

    def _get_train_sampler(self, train_dataset=None):
        from axolotl.utils.samplers import MultipackBatchSampler

        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, MultipackBatchSampler) and type(sampler.sampler) is torch.utils.data.RandomSampler:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            seeded = _SeededRandomSampler(sampler.sampler.data_source, seed)
            sampler.sampler = seeded
            sampler._batches = None
            base_set_epoch = sampler.set_epoch

            def set_epoch(epoch: int):
                seeded.epoch = epoch
                base_set_epoch(epoch)

            sampler.set_epoch = set_epoch
        return sampler


class M1DistillTrainer(M1Trainer):
    """Axolotl trainer whose loss is online distillation from a frozen teacher (stage 1).

    Logs ``kl``, ``ce`` and ``top1_agreement`` (means over the counted tokens of the logging
    window; ``eval_*`` in evaluation). The loss is a per-micro-batch token mean; the HF Trainer
    divides it by the gradient-accumulation steps (``model_accepts_loss_kwargs = False``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.m1_teacher = None
        self.m1_settings = DistillSettings()

    def setup_distillation(self, cfg, teacher=None, teacher_tokenizer=None) -> None:
        """Resolve the loss settings, load the teacher (or take ``teacher``) and check vocabularies.

        Args:
            cfg: the Axolotl config (``m1_*`` keys).
            teacher: an already loaded teacher model (tests); loaded from ``cfg.m1_teacher_model`` if None.
            teacher_tokenizer: its tokenizer; loaded from ``cfg.m1_teacher_model`` if None and a name is set.
        """
        self.m1_settings = resolve_settings(cfg)
        student = self.accelerator.unwrap_model(self.model)
        install_distill_forward(student)
        name = (cfg.get("m1_teacher_model") if hasattr(cfg, "get") else None) or "<teacher>"
        trust = bool(cfg.get("trust_remote_code")) if hasattr(cfg, "get") else False
        if teacher_tokenizer is None and teacher is None:
            teacher_tokenizer = load_teacher_tokenizer(name, trust)
        if teacher is None:
            from transformers import AutoConfig

            t_cfg = AutoConfig.from_pretrained(name, trust_remote_code=trust)
            check_vocab(self.processing_class, teacher_tokenizer, student.config.vocab_size, t_cfg.vocab_size, name)
            dtype = teacher_dtype(cfg, next(student.parameters()).dtype)
            attn = (cfg.get("m1_teacher_attn_implementation") if hasattr(cfg, "get") else None) or "sdpa"
            teacher = load_teacher(name, dtype, self.args.device, attn, trust)
        t_vocab = teacher.get_output_embeddings().weight.shape[0]
        check_vocab(self.processing_class, teacher_tokenizer, student.lm_head.weight.shape[0], t_vocab, name)
        self.m1_teacher = teacher.eval().requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Distillation loss of one micro-batch (see the module docstring)."""
        if self.m1_teacher is None:
            raise RuntimeError("M1DistillTrainer.setup_distillation was not called (M1Plugin does it)")
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        position_ids, attention_mask = inputs.get("position_ids"), inputs.get("attention_mask")
        positions = distill_positions(labels, position_ids, attention_mask)
        teacher_logits = teacher_logits_at(
            self.m1_teacher, inputs["input_ids"], positions, attention_mask, position_ids
        )
        targets = labels[:, 1:][positions[:, :-1]]
        batch = DistillBatch(positions, teacher_logits, targets, self.m1_settings)
        out = model(**inputs, m1_distill=batch)
        prefix = "" if model.training else "eval_"
        self.store_metrics(
            {
                f"{prefix}kl": float(out.kl),
                f"{prefix}ce": float(out.ce),
                f"{prefix}top1_agreement": float(out.top1),
            },
            train_eval="train" if model.training else "eval",
        )
        return (out.loss, out) if return_outputs else out.loss
