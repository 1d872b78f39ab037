"""Layer-wise alignment (``m1_hybrid.alignment``): the loss is what it says, packs documents without
leaking state, trains only the Mamba mixers, and training lowers it."""

import pytest
import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM

from m1_hybrid.alignment import AttentionAlignment
from m1_hybrid.alignment import alignment_optimizer
from m1_hybrid.alignment import alignment_step
from m1_hybrid.alignment import choose_attention_layers
from m1_hybrid.alignment import mamba_parameters
from m1_hybrid.alignment import mean_substitution_kl
from m1_hybrid.alignment import substitution_kl
from m1_hybrid.convert import convert_model


def _pair(layers=3, attn=(1,)):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=6,
        num_key_value_heads=2, attn_implementation="eager",
    )  # fmt: skip
    teacher = LlamaForCausalLM(cfg).eval().double()
    student = convert_model(teacher, attn_layers=list(attn), d_state=4).double()
    return teacher, student


def test_loss_is_the_relative_error_of_each_mixer_on_the_teachers_inputs():
    teacher, student = _pair()
    align = AttentionAlignment(teacher, student)
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    out = align(ids, token_mask=mask)
    assert out.layers == [0, 2]

    # By hand: run the teacher layer by layer, keep the normed input and the attention output.
    captured = {}
    hooks = [
        teacher.model.layers[i].self_attn.register_forward_hook(
            lambda m, a, kw, o, i=i: captured.__setitem__(i, (kw["hidden_states"], o[0])), with_kwargs=True
        )
        for i in out.layers
    ]
    with torch.no_grad():
        teacher.model(input_ids=ids)
    for h in hooks:
        h.remove()
    w = mask.double().unsqueeze(-1)
    expected = []
    for i in out.layers:
        u, target = captured[i]
        pred = student.model.layers[i].mamba(u)
        expected.append(((pred - target).square() * w).sum() / (target.square() * w).sum())
    torch.testing.assert_close(out.per_layer, torch.stack(expected).detach())
    torch.testing.assert_close(out.loss, torch.stack(expected).mean())
    align.remove()
    assert not teacher.model.layers[0].self_attn._forward_hooks


def test_packed_rows_equal_documents_one_by_one():
    """Two documents packed in one row (positions restart) score as the two documents alone."""
    teacher, student = _pair()
    align = AttentionAlignment(teacher, student)
    a, b = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 7))
    packed = align(torch.cat([a, b], 1), torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0))

    def sums(ids):  # numerator and denominator of each layer's relative error for one document
        out = align(ids)
        captured = {}
        hooks = [
            teacher.model.layers[i].self_attn.register_forward_hook(
                lambda m, a_, kw, o, i=i: captured.__setitem__(i, o[0].square().sum()), with_kwargs=True
            )
            for i in out.layers
        ]
        with torch.no_grad():
            teacher.model(input_ids=ids)
        for h in hooks:
            h.remove()
        den = torch.stack([captured[i] for i in out.layers])
        return out.per_layer * den, den

    (na, da), (nb, db) = sums(a), sums(b)
    torch.testing.assert_close(packed.per_layer, (na + nb) / (da + db))


def test_gradients_reach_only_the_mamba_mixers_and_training_lowers_the_loss():
    teacher, student = _pair()
    align = AttentionAlignment(teacher, student)
    ids = torch.randint(0, 97, (4, 16))
    opt = torch.optim.Adam([p for n, p in student.named_parameters() if ".mamba." in n], lr=3e-3)
    first = align(ids)
    first.loss.backward()
    touched = {n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched and all(".mamba." in n for n in touched)
    assert all(p.grad is None for p in teacher.parameters())
    for _ in range(30):
        opt.zero_grad()
        align(ids).loss.backward()
        opt.step()
    assert float(align(ids).loss) < 0.5 * float(first.loss)


def test_refuses_a_student_of_another_teacher():
    teacher, _ = _pair(layers=3)
    _, other = _pair(layers=2, attn=(0,))
    with pytest.raises(ValueError, match="teacher has 3 layers, student 2"):
        AttentionAlignment(teacher, other)


def test_alignment_step_trains_the_mixers_and_clears_gradients():
    """The shared step (plugin's m1_align_steps, distill_gpu's --align-minutes): only Mamba weights move."""
    teacher, student = _pair()
    align = AttentionAlignment(teacher, student)
    params = mamba_parameters(student)
    assert params and len(params) < len(list(student.parameters()))
    opt = alignment_optimizer(params, lr=3e-3)
    ids, pos = torch.randint(0, 97, (2, 12)), torch.cat([torch.arange(5), torch.arange(7)]).repeat(2, 1)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    first, grad_norm = alignment_step(align, opt, params, ids, pos)
    assert grad_norm > 0 and not first.loss.requires_grad
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".mamba." in n for n in changed)
    assert all(p.grad is None for p in student.parameters())
    for _ in range(20):
        last, _ = alignment_step(align, opt, params, ids, pos)
    assert float(last.loss) < 0.7 * float(first.loss)
    align.remove()


def test_substitution_kl_is_the_kl_of_a_hybrid_with_that_one_layer_converted():
    """Scores of an all-Mamba student on a packed batch == the KL of the M1 model (its own forward,
    attention included) built with only layer i as Mamba (student's mixer i), over the counted tokens."""
    teacher, student = _pair(layers=3, attn=())
    for p in mamba_parameters(student):  # trained-looking mixers: the converted ones are near-zero maps
        p.data.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 97, (2, 11))
    pos = torch.cat([torch.arange(4), torch.arange(7)]).repeat(2, 1)  # two documents per row
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, :3] = mask[1, 9:] = False
    scores = substitution_kl(teacher, student, ids, pos, mask)
    assert sorted(scores) == [0, 1, 2]

    ref = torch.log_softmax(teacher(input_ids=ids, position_ids=pos, use_cache=False).logits, -1)[mask]
    for i, score in scores.items():
        one = convert_model(teacher, attn_layers=[j for j in range(3) if j != i], d_state=4).double()
        one.model.layers[i].mamba.load_state_dict(student.model.layers[i].mamba.state_dict())
        with torch.no_grad():
            lp = torch.log_softmax(one(input_ids=ids, position_ids=pos).logits, -1)[mask]
        expected = (lp.exp() * (lp - ref)).sum(-1).mean()
        assert score > 1e-6
        assert score == pytest.approx(float(expected), rel=1e-4)
    assert not teacher.model.layers[0].self_attn._forward_hooks


def test_choose_attention_layers_keeps_the_costliest():
    assert choose_attention_layers({3: 0.2, 0: 0.9, 5: 0.4, 1: 0.1}, 2) == [0, 5]
    with pytest.raises(ValueError, match="num_attention must be in 1..4"):
        choose_attention_layers({3: 0.2, 0: 0.9, 5: 0.4, 1: 0.1}, 5)


def test_mean_substitution_kl_weights_batches_by_their_counted_tokens():
    """Two batches averaged == the two as one batch (per-token KLs); a batch with nothing counted is skipped."""
    teacher, student = _pair(layers=3, attn=())
    for p in mamba_parameters(student):
        p.data.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 97, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, :6] = False  # 3 counted tokens in the first batch, 18 in the second
    whole = substitution_kl(teacher, student, ids, None, mask)
    none = torch.zeros(1, 9, dtype=torch.bool)
    student.train()
    parts = mean_substitution_kl(
        teacher, student, [(ids[:1], None, mask[:1]), (ids[1:], None, mask[1:]), (ids[:1], None, none)]
    )
    assert student.training  # restored after scoring in eval mode
    assert parts.keys() == whole.keys()
    for i in whole:
        assert parts[i] == pytest.approx(whole[i], rel=1e-6)
    with pytest.raises(ValueError, match="no counted tokens"):
        mean_substitution_kl(teacher, student, [(ids[:1], None, none)])
