"""GRPO with KL off and an entropy bonus: VeRL's advantage estimator and actor loss, fed with log-probs
and entropy from our fused op, against a hand computation written out here."""

import math

import numpy as np
import pytest
import torch

from m1_kernels import fused_linear_logprob_entropy

N_ROLLOUTS = 4
CLIP = 0.2
ENTROPY_COEFF = 0.01


def hand_grpo(rewards, lengths, logp, old_logp, entropy, clip, coeff, eps=1e-6):
    """Scalar loops only: group mean / unbiased std advantages, clipped ratio, token-mean over all
    response tokens, minus coeff * token-mean entropy."""
    groups = {}
    for i, r in enumerate(rewards):
        groups.setdefault(i // N_ROLLOUTS, []).append(r)
    adv = []
    for i, r in enumerate(rewards):
        g = groups[i // N_ROLLOUTS]
        mean = sum(g) / len(g)
        std = math.sqrt(sum((x - mean) ** 2 for x in g) / (len(g) - 1))
        adv.append((r - mean) / (std + eps))
    pg_sum = ent_sum = 0.0
    count = 0
    for i, n in enumerate(lengths):
        for t in range(n):
            ratio = math.exp(logp[i][t] - old_logp[i][t])
            a = adv[i]
            unclipped = -a * ratio
            clipped = -a * min(max(ratio, 1 - clip), 1 + clip)
            pg = max(unclipped, clipped)
            if a < 0:
                pg = min(pg, -a * 3.0)  # VeRL's dual-clip bound (clip_ratio_c = 3), inactive for small ratios
            pg_sum += pg
            ent_sum += entropy[i][t]
            count += 1
    return pg_sum / count - coeff * ent_sum / count, adv


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    B, R, H, V = 2 * N_ROLLOUTS, 7, 24, 61
    hidden = torch.randn(B, R, H, dtype=torch.float64)
    weight = (torch.randn(V, H, dtype=torch.float64) * 0.3).requires_grad_(True)
    labels = torch.randint(0, V, (B, R))
    lengths = [7, 5, 3, 6, 1, 7, 4, 2]
    mask = torch.zeros(B, R)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    old = torch.randn(B, R, dtype=torch.float64) * 0.05  # old log-probs offset: ratios near 1, some clipped
    return hidden, weight, labels, mask, lengths, rewards, old


def test_grpo_loss_matches_hand_computation(batch):
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla
    from verl.workers.config import FSDPActorConfig
    from verl.workers.config import FSDPOptimizerConfig
    from verl.workers.utils.losses import ppo_loss

    hidden, weight, labels, mask, lengths, rewards, old_offset = batch
    B, R, H = hidden.shape
    logp, ent = fused_linear_logprob_entropy(hidden.reshape(-1, H), weight, labels.reshape(-1))
    logp, ent = logp.view(B, R).double(), ent.view(B, R).double()
    old = (logp.detach() + old_offset * 4).float()  # |log ratio| up to ~0.5: both clip sides are hit

    # VeRL: outcome reward on the last response token, group-normalised over n rollouts.
    scores = torch.zeros(B, R)
    for i, n in enumerate(lengths):
        scores[i, n - 1] = rewards[i]
    index = np.array([i // N_ROLLOUTS for i in range(B)])
    advantages, returns = compute_grpo_outcome_advantage(scores, mask, index, norm_adv_by_std_in_grpo=True)

    cfg = FSDPActorConfig(
        strategy="fsdp2",
        rollout_n=N_ROLLOUTS,
        ppo_mini_batch_size=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=CLIP,
        entropy_coeff=ENTROPY_COEFF,
        use_kl_loss=False,
        loss_agg_mode="token-mean",
        optim=FSDPOptimizerConfig(lr=1e-6),
    )
    want, adv_hand = hand_grpo(
        rewards,
        lengths,
        logp.tolist(),
        old.double().tolist(),
        ent.tolist(),
        CLIP,
        ENTROPY_COEFF,
    )
    for i in range(B):
        assert advantages[i, : lengths[i]].allclose(torch.tensor(adv_hand[i], dtype=torch.float32), atol=1e-5)
        assert (advantages[i, lengths[i] :] == 0).all()

    # 1) VeRL's building blocks: vanilla clipped policy loss (token-mean) and agg_loss of the entropy.
    from verl.trainer.ppo.core_algos import agg_loss

    pg, pg_metrics = compute_policy_loss_vanilla(old.double(), logp, advantages.double(), mask, "token-mean", cfg)
    total = pg - ENTROPY_COEFF * agg_loss(ent, mask, "token-mean")
    assert abs(total.item() - want) < 1e-6, (total.item(), want)
    assert 0 < pg_metrics["actor/pg_clipfrac"] < 1  # the test reaches the clipped branch

    # 2) VeRL's whole actor loss (``ppo_loss``, what the FSDP engine calls) on the trainer's packed layout.
    from verl.utils import tensordict_utils as tu

    prompts = torch.ones(B, 3, dtype=torch.long)
    nnz_rows, values = [], []
    for i, n in enumerate(lengths):
        # engine output is per packed token; response token t of sample i sits at prompt_len - 1 + t
        row_lp = torch.zeros(3 + n, dtype=torch.float64)
        row_ent = torch.zeros(3 + n, dtype=torch.float64)
        row_lp[2 : 2 + n] = logp[i, :n]
        row_ent[2 : 2 + n] = ent[i, :n]
        nnz_rows.append(row_lp)
        values.append(row_ent)
    log_probs_nested = torch.nested.as_nested_tensor(nnz_rows, layout=torch.jagged)
    entropy_nested = torch.nested.as_nested_tensor(values, layout=torch.jagged)
    attention_mask = torch.cat([torch.ones(B, 3, dtype=torch.long), mask.long()], 1)
    data = tu.get_tensordict(
        {
            "prompts": prompts,
            "responses": torch.ones(B, R, dtype=torch.long),
            "attention_mask": attention_mask,
            "response_mask": mask,
            "old_log_probs": old.double(),
            "advantages": advantages.double(),
        },
        non_tensor_dict={"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": B},
    )
    loss, metrics = ppo_loss(cfg, {"log_probs": log_probs_nested, "entropy": entropy_nested}, data)
    assert abs(loss.item() - want) < 1e-6, (loss.item(), want)

    # Gradients flow back through the fused op into the lm_head weight.
    loss.backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


def test_kl_off_means_no_reference_worker():
    """With use_kl_loss=False and use_kl_in_reward=False VeRL builds no reference policy."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo.utils import need_reference_policy

    cfg = OmegaConf.create(
        {
            "algorithm": {"use_kl_in_reward": False},
            "actor_rollout_ref": {"actor": {"use_kl_loss": False}},
        }
    )
    assert need_reference_policy(cfg) is False
