#!/usr/bin/env bash
# GRPO of an M1 hybrid at the paper's RL settings (arXiv 2504.10449, section 4 of
# /work/shared/docs/m1-reference.md): batch 128 prompts x n=8 rollouts, PPO mini-batch 64, prompt 1024,
# response 32768, Adam lr 1e-6 constant (wd 0.01, grad clip 1), PPO clip 0.2, token-mean, entropy bonus
# 0.01, KL off, rollout T 0.9, validation T 0.6 x 32, 50 steps, 1 node x 8 GPUs.
#
# Differences from the released fork, on purpose:
# - KL is off with no reference worker (the fork sets kl coefs to 0 but still runs a ref model);
# - rollouts come from vLLM (through the vllm_m1 plugin) with CUDA graphs, not the fork's HF generator;
# - ppo_max_token_len_per_gpu is 33792 (prompt + response), so one full-length sample fits a micro-batch.
#
# UNVERIFIED on GPU: written against verl 0.9.1's config schema and exercised on CPU only up to the
# FSDP engine (see verl_m1/README.md).
#
# Usage:  MODEL=/path/to/m1_hybrid_ckpt DATA=data/m1_rl bash examples/verl/grpo_m1_3b.sh [extra hydra overrides]
#   DATA must hold train.parquet / test.parquet from:
#   python -m verl_m1.data --input train.jsonl --test-input aime.jsonl --out "$DATA" --require-think
set -euo pipefail

MODEL=${MODEL:?set MODEL to an m1_hybrid checkpoint folder}
DATA=${DATA:-data/m1_rl}
NGPUS=${NGPUS:-8}
export VLLM_USE_V1=1

python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=grpo \
    algorithm.norm_adv_by_std_in_grpo=True \
    algorithm.use_kl_in_reward=False \
    data.train_files="$DATA/train.parquet" \
    data.val_files="$DATA/test.parquet" \
    data.train_batch_size=128 \
    data.max_prompt_length=1024 \
    data.max_response_length=32768 \
    data.filter_overlong_prompts=True \
    data.truncation=error \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.model.external_lib=verl_m1 \
    +actor_rollout_ref.model.override_config.attn_implementation=eager \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.use_fused_kernels=True \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    actor_rollout_ref.actor.strategy=fsdp2 \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.optim.lr_scheduler_type=constant \
    actor_rollout_ref.actor.optim.weight_decay=0.01 \
    actor_rollout_ref.actor.optim.clip_grad=1.0 \
    actor_rollout_ref.actor.ppo_mini_batch_size=64 \
    actor_rollout_ref.actor.ppo_epochs=1 \
    actor_rollout_ref.actor.use_dynamic_bsz=True \
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=33792 \
    actor_rollout_ref.actor.clip_ratio=0.2 \
    actor_rollout_ref.actor.loss_agg_mode=token-mean \
    actor_rollout_ref.actor.entropy_coeff=0.01 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.actor.ulysses_sequence_parallel_size=1 \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.mode=async \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.temperature=0.9 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.enforce_eager=False \
    actor_rollout_ref.rollout.free_cache_engine=True \
    actor_rollout_ref.rollout.enable_prefix_caching=False \
    actor_rollout_ref.rollout.max_num_batched_tokens=33792 \
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True \
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=33792 \
    actor_rollout_ref.rollout.val_kwargs.do_sample=True \
    actor_rollout_ref.rollout.val_kwargs.temperature=0.6 \
    actor_rollout_ref.rollout.val_kwargs.n=32 \
    reward.custom_reward_function.path=pkg://verl_m1.reward \
    reward.custom_reward_function.name=compute_score_m1 \
    trainer.total_training_steps=50 \
    trainer.nnodes=1 \
    trainer.n_gpus_per_node="$NGPUS" \
    trainer.project_name=m1 \
    trainer.experiment_name=m1_grpo_paper \
    trainer.logger='["console"]' \
    trainer.val_before_train=True \
    trainer.test_freq=10 \
    trainer.save_freq=10 \
    "$@"
