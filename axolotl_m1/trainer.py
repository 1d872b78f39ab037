"""Stage-1 distillation and stage-2 SFT trainers (Axolotl's trainer, resumable packed data order).

The loss maths (counted positions, :class:`DistillBatch`, the fused KL inside the model's forward)
live in :mod:`axolotl_m1.loss`, which imports no Axolotl code; the names are re-exported here.
"""

from __future__ import annotations

import torch
from axolotl.core.trainers.base import AxolotlTrainer

from .align import align_student
from .align import choose_attention
from .loss import IGNORE_INDEX
from .loss import DistillBatch
from .loss import M1DistillOutput
from .loss import chunked_cross_entropy
from .loss import distill_forward
from .loss import distill_loss
from .loss import distill_positions
from .loss import document_starts
from .loss import install_distill_forward
from .plugin import DistillSettings
from .plugin import _get
from .plugin import settings as resolve_settings
from .plugin import teacher_dtype
from .teacher import check_vocab
from .teacher import load_teacher
from .teacher import load_teacher_tokenizer
from .teacher import teacher_logits_at

__all__ = [
    "IGNORE_INDEX",
    "DistillBatch",
    "M1DistillOutput",
    "M1DistillTrainer",
    "M1Trainer",
    "chunked_cross_entropy",
    "distill_forward",
    "distill_loss",
    "distill_positions",
    "document_starts",
    "install_distill_forward",
]


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

    With ``m1_align_steps > 0``, a fresh run (not a resumed one) first aligns the Mamba mixers to
    the teacher's attention (:func:`axolotl_m1.align.align_student`); its ``align_rel_err*``
    metrics are logged with the first training step.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.m1_teacher = None
        self.m1_settings = DistillSettings()
        self.m1_align_steps, self.m1_align_lr = 0, 1e-3
        self.m1_attn_auto, self.m1_num_attn_layers = False, None
        self.m1_chosen: dict[str, object] = {}
        self._m1_pending_logs: dict[str, float] = {}

    def setup_distillation(self, cfg, teacher=None, teacher_tokenizer=None) -> None:
        """Resolve the loss settings, load the teacher (or take ``teacher``) and check vocabularies.

        Args:
            cfg: the Axolotl config (``m1_*`` keys).
            teacher: an already loaded teacher model (tests); loaded from ``cfg.m1_teacher_model`` if None.
            teacher_tokenizer: its tokenizer; loaded from ``cfg.m1_teacher_model`` if None and a name is set.
        """
        self.m1_settings = resolve_settings(cfg)
        self.m1_align_steps = int(_get(cfg, "m1_align_steps", 0))
        self.m1_align_lr = float(_get(cfg, "m1_align_lr", 1e-3))
        self.m1_attn_auto = _get(cfg, "m1_attn_layers", None) == "auto"
        self.m1_num_attn_layers = _get(cfg, "m1_num_attn_layers", None)
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
            attn = (cfg.get("m1_teacher_attn_implementation") if hasattr(cfg, "get") else None) or "m1_varlen"
            teacher = load_teacher(name, dtype, self.args.device, attn, trust)
        t_vocab = teacher.get_output_embeddings().weight.shape[0]
        check_vocab(self.processing_class, teacher_tokenizer, student.lm_head.weight.shape[0], t_vocab, name)
        self.m1_teacher = teacher.eval().requires_grad_(False)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Align the Mamba mixers first (``m1_align_steps``, fresh runs only), with ``m1_attn_layers: auto``
        choose the attention layers then, and train as usual (the optimiser is built after both)."""
        if self.m1_align_steps > 0 and not resume_from_checkpoint:
            if self.m1_teacher is None:
                raise RuntimeError("M1DistillTrainer.setup_distillation was not called (M1Plugin does it)")
            self._m1_pending_logs = align_student(self, self.m1_align_steps, self.m1_align_lr)
            if self.m1_attn_auto:
                self.m1_chosen = choose_attention(self, self.m1_num_attn_layers)
        elif resume_from_checkpoint and self.m1_attn_auto:
            self._restore_checkpoint_layers(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _restore_checkpoint_layers(self, resume_from_checkpoint) -> None:
        """Resuming an ``auto`` run: the model was loaded with no attention layers; give it the checkpoint's
        (their weights then come from the checkpoint like every other tensor)."""
        import json
        from pathlib import Path

        from transformers.trainer_utils import get_last_checkpoint

        from m1_hybrid.convert import restore_attention

        path = resume_from_checkpoint
        if not isinstance(path, str):
            path = get_last_checkpoint(self.args.output_dir)
        config = Path(path or "") / "config.json"
        if not config.exists():
            raise FileNotFoundError(f"no checkpoint config at {config}: cannot tell which layers it chose")
        layers = json.loads(config.read_text())["attn_layers"]
        restore_attention(self.accelerator.unwrap_model(self.model), self.m1_teacher, layers)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Axolotl's log; the alignment metrics join the first training log (kept in ``log_history``)."""
        if self._m1_pending_logs and "loss" in logs:
            logs = {**self._m1_pending_logs, **logs}
            self._m1_pending_logs = {}
        super().log(logs, *args, **kwargs)

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
