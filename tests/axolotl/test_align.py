"""``m1_align_steps``: the plugin's alignment stage on a real M1DistillTrainer (packed Axolotl batches)."""

import torch

from axolotl_m1.align import align_student

from .helpers import collate
from .helpers import make_trainer


def test_align_student_trains_only_the_mamba_mixers(axolotl_setup, tmp_path):
    cfg, ds = axolotl_setup
    trainer, tokenizer = make_trainer(cfg, tmp_path)
    trainer.setup_distillation(cfg)
    batch = collate(tokenizer, [ds[i] for i in range(4)], packed=True)
    assert (batch["position_ids"] == 0).sum() >= 4  # several documents in one row
    trainer.get_train_dataloader = lambda: [batch]  # cycled over: the same packed batch every step
    student, teacher = trainer.model, trainer.m1_teacher
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    t_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}

    metrics = align_student(trainer, steps=4, lr=1e-3)

    assert set(metrics) == {"align_rel_err_first", "align_rel_err_last", "align_rel_err_max_first",
                            "align_rel_err_max_last"}  # fmt: skip
    assert 0 < metrics["align_rel_err_last"] < metrics["align_rel_err_first"] <= metrics["align_rel_err_max_first"]
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".mamba." in n for n in changed)
    assert any(".mamba.in_proj" in n for n in changed)
    assert all(p.grad is None for p in student.parameters())
    assert all(torch.equal(p, t_before[n]) for n, p in teacher.named_parameters())
    assert all(not layer.self_attn._forward_hooks for layer in teacher.model.layers)  # hooks removed
