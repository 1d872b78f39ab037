"""VeRL's real FSDP training engine with the M1 actor, on CPU (see verl_m1/cpu.py for the CPU platform).

One module-scoped engine (FSDP2 over a one-process gloo group, remove-padding, use_fused_kernels served
by m1_kernels): the engine's log-probs on the packed batch equal per-sample HF log-probs; one full GRPO
step (HF rollouts, grader reward, VeRL GRPO advantages, VeRL ppo_loss with the entropy bonus, AdamW)
moves the weights; the engine's weight stream (the names VeRL sends to vLLM's ``load_weights``) loads
into a fresh M1 model by name and reproduces the engine's log-probs.
"""

import pytest
import torch

from tests.testing import assert_close

SAMPLES = [([5, 17, 230, 4012], [61, 62, 63, 64, 65]), ([900], [77]), ([11, 12, 13], [1000, 2000, 3000])]


@pytest.fixture(scope="module")
def trainer(m1_ckpt):
    from verl_m1.inprocess_grpo import CPUGRPO

    return CPUGRPO(str(m1_ckpt), lr=1e-4, entropy_coeff=0.01, fused=True, micro_batch_size=2)


def test_engine_logprobs_equal_per_sample(trainer, m1_model):
    from verl_m1.inprocess_grpo import padded_batch

    batch = padded_batch([p for p, _ in SAMPLES], [r for _, r in SAMPLES], pad_id=2)
    lp, ent = trainer.log_probs(batch, entropy=True)
    assert trainer.engine.module.forward.__func__.__name__ == "m1_forward_for_ppo"
    with torch.no_grad():
        for i, (p, r) in enumerate(SAMPLES):
            logits = m1_model(torch.tensor([p + r])).logits[0].float()
            ref = logits.log_softmax(-1)[torch.arange(len(p) - 1, len(p) + len(r) - 1), torch.tensor(r)]
            assert_close(f"sample {i}", ref, lp[i, : len(r)], atol=2e-4, rtol=1e-4)
            assert (ent[i, : len(r)] > 0).all()


def test_grpo_step_updates_and_syncs(trainer):
    from verl_m1.inprocess_grpo import padded_batch

    before = {n: t.detach().clone() for n, t in trainer.engine.get_per_tensor_param()[0]}
    res = trainer.step(["What is 2+3?"], ["5"], n=2, max_new_tokens=6)
    assert len(res["rewards"]) == 2 and set(res["rewards"]) <= {0.0, 1.0}
    m = res["metrics"]
    for key in ("actor/pg_loss", "actor/entropy_loss", "actor/ppo_kl", "grad_norm"):
        assert key in m and m[key] == m[key], key  # present and not NaN
    assert m["actor/entropy_loss"] > 0
    after = dict(trainer.engine.get_per_tensor_param()[0])
    assert set(after) == set(before)
    assert any(not torch.equal(before[n], after[n].detach()) for n in before)  # AdamW moved something
    # The synced rollout model (loaded by name from the engine's stream) scores like the engine.
    batch = padded_batch([p for p, _ in SAMPLES], [r for _, r in SAMPLES], pad_id=2)
    lp, _ = trainer.log_probs(batch)
    with torch.no_grad():
        for i, (p, r) in enumerate(SAMPLES):
            logits = trainer.rollout_model(torch.tensor([p + r])).logits[0].float()
            ref = logits.log_softmax(-1)[torch.arange(len(p) - 1, len(p) + len(r) - 1), torch.tensor(r)]
            assert_close(f"synced sample {i}", ref, lp[i, : len(r)], atol=2e-4, rtol=1e-4)
