"""``m1_align_steps``: layer-wise alignment of the Mamba mixers before stage-1 distillation.

Before the first training step of a fresh run (not when resuming: the aligned weights are in the
checkpoint), :class:`axolotl_m1.trainer.M1DistillTrainer` calls :func:`align_student`: each Mamba
mixer learns to reproduce the teacher attention it replaced, on the teacher's input of that layer
(:mod:`m1_hybrid.alignment`). Only the ``.mamba.`` parameters learn, with their own AdamW
(``m1_align_lr``, betas 0.9/0.95, no weight decay, grad clip 1.0, linear warm-up over the first
~10% of the steps), on batches of the trainer's own train dataloader (packed rows keep their
per-document ``position_ids``; a padding/segment mask, when the batch has one, drops padding),
under the trainer's autocast. The teacher stays frozen; the hooks are removed afterwards.
"""

from __future__ import annotations

import torch
from axolotl.utils.logging import get_logger

from m1_hybrid.alignment import AttentionAlignment
from m1_hybrid.alignment import alignment_optimizer
from m1_hybrid.alignment import alignment_step
from m1_hybrid.alignment import mamba_parameters

LOG = get_logger(__name__)


def _batches(trainer):
    """The trainer's train batches, cycling over epochs of its dataloader."""
    while True:
        empty = True
        for batch in trainer.get_train_dataloader():
            empty = False
            yield batch
        if empty:
            raise ValueError("m1_align_steps: the train dataloader yields no batches")


def align_student(trainer, steps: int, lr: float = 1e-3) -> dict[str, float]:
    """Run ``steps`` alignment steps on ``trainer``'s student against its ``m1_teacher``.

    Returns the metrics to log: ``align_rel_err_{first,last}`` (mean relative error over the
    Mamba layers at the first and last step) and ``align_rel_err_max_{first,last}`` (worst layer).
    """
    from tqdm.auto import tqdm

    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        raise ValueError(
            "m1_align_steps runs before the model is sharded and is not supported with FSDP/DeepSpeed: set "
            "m1_align_steps: 0, or align in a single-GPU run first (max_steps: 1) and start from its checkpoint"
        )
    student, teacher = trainer.accelerator.unwrap_model(trainer.model), trainer.m1_teacher
    device = next(teacher.parameters()).device
    params = [p for p in mamba_parameters(student) if p.requires_grad]
    if not params:
        raise ValueError("m1_align_steps: the student has no trainable Mamba parameters (names with '.mamba.')")
    if params[0].device != device:
        raise ValueError(f"m1_align_steps: student on {params[0].device}, teacher on {device}")
    opt = alignment_optimizer(params, lr, fused=device.type == "cuda")
    warmup = max(1, min(20, steps // 10))
    align = AttentionAlignment(teacher, student)
    rows = []
    batches = _batches(trainer)
    bar = tqdm(total=steps, desc="m1 align", unit="step", disable=not trainer.is_world_process_zero())
    try:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup)
            batch = next(batches)
            ids = batch["input_ids"].to(device)
            pos = batch.get("position_ids")
            mask = batch.get("attention_mask")
            token_mask = (mask > 0).to(device) if mask is not None and mask.dim() == 2 else None
            out, _ = alignment_step(
                align,
                opt,
                params,
                ids,
                None if pos is None else pos.to(device),
                token_mask,
                autocast=trainer.accelerator.autocast,
            )
            rows.append((float(out.loss), float(out.per_layer.max())))
            bar.update(1)
            bar.set_postfix(rel_err=f"{rows[-1][0]:.4f}", worst=f"{rows[-1][1]:.4f}")
    finally:
        bar.close()
        align.remove()
        opt.zero_grad(set_to_none=True)
    del opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    metrics = {
        "align_rel_err_first": rows[0][0],
        "align_rel_err_last": rows[-1][0],
        "align_rel_err_max_first": rows[0][1],
        "align_rel_err_max_last": rows[-1][1],
    }
    LOG.info(
        "m1 alignment: %d steps over layers %s, relative error %.4f -> %.4f (worst layer %.4f -> %.4f)",
        steps,
        align.layers,
        *(metrics[k] for k in metrics),
    )
    return metrics


SCORE_BATCHES = 2  # train batches that score the aligned mixers for m1_attn_layers: auto


def choose_attention(trainer, num_attention: int | None = None) -> dict[str, object]:
    """``m1_attn_layers: auto``: after :func:`align_student` on a student with no attention layers, score
    each aligned mixer (:func:`m1_hybrid.alignment.mean_substitution_kl` over the assistant tokens of
    ``SCORE_BATCHES`` train batches), keep attention at the ``num_attention`` costliest layers (default
    ~25%, :func:`m1_hybrid.convert.default_attn_layers`) and give them the teacher's attention back
    (:func:`m1_hybrid.convert.restore_attention`). Returns the chosen layers for the log.
    """
    from m1_hybrid.alignment import choose_attention_layers
    from m1_hybrid.alignment import mean_substitution_kl
    from m1_hybrid.convert import default_attn_layers
    from m1_hybrid.convert import restore_attention

    student, teacher = trainer.accelerator.unwrap_model(trainer.model), trainer.m1_teacher
    if student.config.attn_layers:
        raise ValueError(
            f"m1_attn_layers: auto needs a student converted with no attention layers, this one has "
            f"{list(student.config.attn_layers)}: delete its m1_student_init_dir so the plugin converts it again"
        )
    num_attention = num_attention or len(default_attn_layers(student.config.num_hidden_layers))
    device = next(teacher.parameters()).device
    batches = _batches(trainer)
    scoring = []
    for _ in range(SCORE_BATCHES):
        batch = next(batches)
        pos = batch.get("position_ids")
        pos = None if pos is None else pos.to(device)
        scoring.append((batch["input_ids"].to(device), pos, (batch["labels"] != -100).to(device)))
    scores = mean_substitution_kl(teacher, student, scoring, trainer.accelerator.autocast)
    chosen = choose_attention_layers(scores, num_attention)
    restore_attention(student, teacher, chosen)
    LOG.info("m1 attention layers chosen: %s (substitution KL per layer: %s)", chosen,
             {i: round(v, 4) for i, v in scores.items()})  # fmt: skip
    return {"m1_attn_layers": chosen, "m1_substitution_kl": scores}
