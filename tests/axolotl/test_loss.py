"""The plugin's distillation loss against a naive full-vocabulary KL, on Axolotl-tokenized ChatML chats."""

import pytest
import torch
import torch.nn.functional as F

from axolotl_m1.plugin import DistillSettings
from axolotl_m1.teacher import check_vocab
from axolotl_m1.trainer import distill_positions
from tests.testing import assert_close
from tests.testing import rel_err

from .helpers import collate
from .helpers import make_trainer
from .helpers import naive_kl


@pytest.fixture(scope="module")
def trainer(axolotl_setup, tmp_path_factory):
    cfg, _ = axolotl_setup
    trainer, tokenizer = make_trainer(cfg, tmp_path_factory.mktemp("loss"))
    trainer.setup_distillation(cfg)
    return trainer


def assistant_targets(tokenizer, ids: list[int]) -> set[int]:
    """Indices of the assistant turn's tokens (content + <|im_end|>), found from the ChatML markup."""
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    starts = [i + len(header) for i in range(len(ids)) if ids[i : i + len(header)] == header]
    assert len(starts) == 1, f"expected one assistant header, found {len(starts)}"
    stop = ids.index(end, starts[0])
    return set(range(starts[0], stop + 1))


def test_counted_positions_are_assistant_next_token_predictions(axolotl_setup, trainer):
    """ChatML: system/user/assistant headers and the prompt never count; position t counts iff token
    t+1 belongs to the assistant reply (its <|im_end|> included)."""
    _, ds = axolotl_setup
    tok = trainer.processing_class
    for row in (ds[0], ds[1], ds[2]):
        ids = list(row["input_ids"])
        targets = assistant_targets(tok, ids)
        text = tok.decode(ids)
        assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\n" in text
        labels = torch.tensor([row["labels"]])
        assert {i for i, v in enumerate(row["labels"]) if v != -100} == targets
        got = set(distill_positions(labels)[0].nonzero().flatten().tolist())
        assert got == {t - 1 for t in targets}
        assert max(got) < len(ids) - 1


@pytest.mark.parametrize(
    "settings",
    [DistillSettings(), DistillSettings(ce_weight=0.5), DistillSettings(direction="forward", temperature=2.0)],
    ids=["reverse", "reverse+ce", "forward-T2"],
)
def test_trainer_loss_equals_naive_kl(axolotl_setup, trainer, settings):
    """Trainer.compute_loss == naive fp32 KL over exactly the assistant next-token positions; same gradients."""
    _, ds = axolotl_setup
    tok = trainer.processing_class
    batch = collate(tok, [ds[3]], packed=False, drop_mask=False)
    student, teacher = trainer.model, trainer.m1_teacher
    trainer.m1_settings = settings

    student.zero_grad()
    loss = trainer.compute_loss(student, dict(batch))
    loss.backward()
    got_grads = {
        n: p.grad.clone() for n, p in student.named_parameters() if n.endswith(("lm_head.weight", "in_proj.weight"))
    }

    student.zero_grad()
    ids = batch["input_ids"]
    targets = assistant_targets(tok, ids[0].tolist())
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[0, [t - 1 for t in targets]] = True
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    s_logits = student(input_ids=ids).logits
    ref = settings.kl_weight * naive_kl(s_logits, t_logits, positions, settings.direction, settings.temperature)
    if settings.ce_weight:
        next_ids = ids[0, [t for t in sorted(targets)]]
        ref = ref + settings.ce_weight * F.cross_entropy(s_logits[positions].float(), next_ids)
    ref.backward()
    assert_close("loss", ref, loss, atol=1e-5, rtol=1e-4)
    for name, g in got_grads.items():
        ref_g = dict(student.named_parameters())[name].grad
        assert rel_err(ref_g, g) < 2e-3, f"grad {name}: relative error {rel_err(ref_g, g):.2e}"
    logged = trainer._stored_metrics["train"]
    assert {"kl", "ce", "top1_agreement"} <= set(logged)
    trainer.m1_settings = DistillSettings()


def test_vocab_size_mismatch_is_refused(axolotl_setup, trainer):
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM

    cfg, _ = axolotl_setup
    small = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(ValueError, match=r"1000 output logits but the student has 49152.*fix:"):
        trainer.setup_distillation(cfg, teacher=small, teacher_tokenizer=trainer.processing_class)


def test_tokenizer_mismatch_is_refused(teacher_dir):
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(teacher_dir)
    b = AutoTokenizer.from_pretrained(teacher_dir)
    b.add_tokens(["<m1_extra_token>"])
    with pytest.raises(ValueError, match=r"tokenizer \(49153 tokens\) differs from the student's \(49152 tokens\)"):
        check_vocab(a, b, 49152, 49152, "other-teacher")
    check_vocab(a, AutoTokenizer.from_pretrained(teacher_dir), 49152, 49152, "same")
