"""VeRL's remove-padding layout feeds document boundaries to the M1 model; our VeRL patches are wired.

The padded batch goes through the trainer's own conversion (``left_right_2_no_padding``: nested rows,
flattened to one ``(1, total_nnz)`` row with ``position_ids`` restarting per sample, exactly what the
FSDP engine hands the model); log-probs on it must equal per-sample log-probs, so no SSM, conv or
attention state leaks between samples."""

import pytest
import torch

from tests.testing import assert_close

SAMPLES = [  # (prompt, response) token ids; a response of one token and very different lengths
    ([5, 17, 230, 4012], [61, 62, 63, 64, 65, 66]),
    ([900], [77]),
    ([11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [1000, 2000, 3000]),
]


def per_sample_logprobs(model, samples):
    out = []
    with torch.no_grad():
        for p, r in samples:
            logits = model(torch.tensor([p + r])).logits[0].float().log_softmax(-1)
            out.append(torch.stack([logits[len(p) - 1 + j, t] for j, t in enumerate(r)]))
    return out


@pytest.fixture(scope="module")
def packed(m1_model):
    from verl_m1.inprocess_grpo import padded_batch
    from verl_m1.inprocess_grpo import to_engine_batch

    batch = padded_batch([p for p, _ in SAMPLES], [r for _, r in SAMPLES], pad_id=2)
    td = to_engine_batch(batch)
    input_ids = td["input_ids"]
    flat_ids = input_ids.values().unsqueeze(0)  # what FSDPEngineWithLMHead.prepare_model_inputs sends
    flat_pos = td["position_ids"].values().unsqueeze(0)
    return td, flat_ids, flat_pos


def test_layout_is_one_row_with_restarting_positions(packed):
    td, ids, pos = packed
    lengths = [len(p) + len(r) for p, r in SAMPLES]
    assert ids.shape == (1, sum(lengths))
    starts = (pos[0] == 0).nonzero().flatten().tolist()
    assert starts == [0, lengths[0], lengths[0] + lengths[1]]
    from m1_hybrid.packing import packed_layout

    assert packed_layout(pos, None, tuple(pos.shape)).cu_seqlens.tolist() == [
        0,
        *torch.tensor(lengths).cumsum(0).tolist(),
    ]


def test_packed_logprobs_equal_per_sample(m1_model, packed):
    from verl.utils.torch_functional import logprobs_from_logits
    from verl.workers.utils.padding import no_padding_2_padding

    td, ids, pos = packed
    with torch.no_grad():
        logits = m1_model(input_ids=ids, attention_mask=None, position_ids=pos, use_cache=False).logits[0]
    rolled = torch.roll(ids[0], -1)
    lp = logprobs_from_logits(logits.float(), rolled)  # VeRL's own log-prob path (non-fused)
    lp = no_padding_2_padding(torch.nested.nested_tensor_from_jagged(lp, td["input_ids"].offsets()), td)
    for i, ref in enumerate(per_sample_logprobs(m1_model, SAMPLES)):
        assert_close(f"sample {i}", ref, lp[i, : len(ref)], atol=2e-4, rtol=1e-4)


def test_fused_forward_on_packed_row(m1_model, packed):
    """The use_fused_kernels forward (m1_kernels) on the packed row: log-probs and entropy per sample."""
    from verl.utils.torch_functional import entropy_from_logits
    from verl.workers.utils.padding import no_padding_2_padding

    from verl_m1.fused import m1_forward_for_ppo

    td, ids, pos = packed
    rolled = torch.roll(ids, -1, dims=1)
    with torch.no_grad():
        out = m1_forward_for_ppo(m1_model, input_ids=ids, position_ids=pos, shift_labels=rolled, temperature=0.7)
        logits = m1_model(input_ids=ids, position_ids=pos).logits[0].float() / 0.7
    offsets = td["input_ids"].offsets()
    lp = no_padding_2_padding(torch.nested.nested_tensor_from_jagged(out.log_probs[0], offsets), td)
    ent = no_padding_2_padding(torch.nested.nested_tensor_from_jagged(out.entropy[0], offsets), td)
    ref_lp = logits.log_softmax(-1).gather(1, rolled[0, :, None])[:, 0]
    ref_ent = entropy_from_logits(logits)
    ref_lp = no_padding_2_padding(torch.nested.nested_tensor_from_jagged(ref_lp, offsets), td)
    ref_ent = no_padding_2_padding(torch.nested.nested_tensor_from_jagged(ref_ent, offsets), td)
    mask = td["response_mask"].bool()
    assert_close("fused log-probs", ref_lp[mask], lp[mask], atol=2e-4, rtol=1e-4)
    assert_close("fused entropy", ref_ent[mask], ent[mask], atol=2e-4, rtol=1e-4)


def test_verl_monkey_patch_installs_fused_forward_and_refuses_ulysses(m1_ckpt):
    from verl.models.transformers.monkey_patch import apply_monkey_patch

    import verl_m1
    from m1_hybrid import M1HybridForCausalLM
    from verl_m1.fused import m1_forward_for_ppo

    assert verl_m1.apply_patches()
    model = M1HybridForCausalLM.from_pretrained(m1_ckpt, dtype=torch.float32)
    other = M1HybridForCausalLM.from_pretrained(m1_ckpt, dtype=torch.float32)
    apply_monkey_patch(model, use_remove_padding=True, use_fused_kernels=True, fused_kernels_backend="torch")
    assert model.forward.__func__ is m1_forward_for_ppo
    assert other.forward.__func__ is M1HybridForCausalLM.forward  # only the engine's instance is patched
    plain = M1HybridForCausalLM.from_pretrained(m1_ckpt, dtype=torch.float32)
    apply_monkey_patch(plain, use_remove_padding=True, use_fused_kernels=False)
    assert plain.forward.__func__ is M1HybridForCausalLM.forward
    with pytest.raises(ValueError, match="Ulysses"):
        apply_monkey_patch(plain, ulysses_sp_size=2)


def test_fused_forward_gathers_sharded_lm_head(m1_model, packed):
    """Under FSDP2 the lm_head weight can be a sharded DTensor inside our forward (seen on CUDA, where VeRL
    wraps the head as its own unit): the fused forward gathers it, same outputs, gradient on the DTensor."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor import distribute_tensor

    from verl_m1.cpu import init_single_process_group
    from verl_m1.fused import m1_forward_for_ppo

    init_single_process_group()
    _, ids, pos = packed
    rolled = torch.roll(ids, -1, dims=1)
    with torch.no_grad():
        want = m1_forward_for_ppo(m1_model, input_ids=ids, position_ids=pos, shift_labels=rolled)
    model = copy.deepcopy(m1_model)
    mesh = init_device_mesh("cpu", (1,))
    head = model.lm_head
    if head.weight is model.model.embed_tokens.weight:  # tied: give the head its own (sharded) copy
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    head.weight = torch.nn.Parameter(distribute_tensor(head.weight.detach(), mesh, [Shard(0)]))
    got = m1_forward_for_ppo(model, input_ids=ids, position_ids=pos, shift_labels=rolled)
    assert_close("log-probs", want.log_probs, got.log_probs, atol=1e-5, rtol=1e-5)
    assert_close("entropy", want.entropy, got.entropy, atol=1e-5, rtol=1e-5)
    (got.log_probs.sum() + got.entropy.sum()).backward()
    assert isinstance(head.weight.grad, DTensor) and torch.isfinite(head.weight.grad.full_tensor()).all()
    assert head.weight.grad.full_tensor().abs().sum() > 0
