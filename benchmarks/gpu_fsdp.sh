#!/usr/bin/env bash
# axolotl_m1 distillation under Axolotl's FSDP2 on 2 GPUs (offline machine), in one call:
#
#   carry .gpu_axolotl .gpu_tok      (build .gpu_axolotl first, here: bash scripts/gpu_axolotl_wheels.sh)
#   OUT=$OUT bash benchmarks/gpu_fsdp.sh
#
# Installs the carried Axolotl wheels (.gpu_axolotl/setup.sh), builds a tiny random GQA Llama teacher with
# SmolLM2's tokenizer and local arithmetic chats (benchmarks/gpu_fsdp_prepare.py), writes a YAML derived from
# examples/axolotl/tiny_cpu_distill.yml with the FSDP2 section of examples/axolotl/fsdp_2gpu_distill.yml
# (fsdp_version 2, FULL_SHARD per M1DecoderLayer, teacher replicated; no alignment: refused under FSDP),
# bf16, $STEPS steps logged every step, and trains it with Axolotl's launcher on $NPROC processes. The full
# log goes to $OUT/fsdp_2gpu.log. If that run fails, a second one without FSDP activation checkpointing
# follows ($OUT/fsdp_2gpu_noac.log), so one call also says whether checkpointing was the cause.
# Ends with a summary: ranks seen, first/last loss, whether it fell, the saved model.
#
# Knobs (env): OUT (default runs/fsdp), NPROC (2), STEPS (40), FSDP (1; 0 = no FSDP section), BF16 (1; 0 =
# fp32, for a CPU check), CPU=1 (torchrun instead of accelerate: gloo, several processes on CPU), PORT, WORK (teacher/data/outputs, default $HOME/m1_fsdp), NO_SETUP=1 (use the current
# Python environment instead of .gpu_axolotl), RUN_TIMEOUT (seconds per training run, default 250: two runs fit one 600 s call).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/fsdp}
NPROC=${NPROC:-2}
STEPS=${STEPS:-40}
WORK=${WORK:-$HOME/m1_fsdp}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
[ -n "${NO_SETUP:-}" ] || source .gpu_axolotl/setup.sh
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5 AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_DISABLED=true
PY=${PYTHON:-python3}
{
  echo "== $(date -u) host $(hostname)"
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader 2>/dev/null
  "$PY" -c "import sys, torch, transformers, accelerate, peft, axolotl; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count(), 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__, 'axolotl', axolotl.__version__)"
} 2>&1 | tee "$OUT/env.txt"
[ -f .gpu_tok/tokenizer.json ] || gunzip -kf .gpu_tok/tokenizer.json.gz

flags=(--steps "$STEPS")
[ "${FSDP:-1}" = 1 ] || flags+=(--no-fsdp)
[ "${BF16:-1}" = 1 ] || flags+=(--fp32)

train() {  # $1 = log name, rest = extra prepare flags
  local name=$1
  shift
  local cfg
  cfg=$("$PY" benchmarks/gpu_fsdp_prepare.py "$WORK" "${flags[@]}" "$@" 2>>"$OUT/prepare.log" | tail -1)
  [ -f "$cfg" ] || { echo "prepare failed:"; tail -20 "$OUT/prepare.log"; return 3; }
  cp "$cfg" "$OUT/$name.yml"
  rm -rf "$WORK/out"
  # = `axolotl train CFG --launcher accelerate -- --num_processes N` (which runs `accelerate launch ... -m
  # axolotl.cli.train CFG`), through gpu_fsdp_rank.py: it prints a [m1-rank] line per process, then runs
  # axolotl.cli.train unchanged. `python3 -m accelerate.commands.launch` needs no `accelerate` on PATH.
  local launch=("$PY" -m accelerate.commands.launch --num_processes "$NPROC" --num_machines 1 --mixed_precision no
    --dynamo_backend no --main_process_port "${PORT:-29517}")
  [ "$NPROC" -gt 1 ] && launch+=(--multi_gpu)
  # CPU check with several processes: accelerate's CPU launcher wants MPI, so use torchrun (gloo) there, the
  # equivalent of `axolotl train CFG --launcher torchrun -- --nproc_per_node N`.
  [ "${CPU:-0}" = 1 ] && launch=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "${PORT:-29517}")
  echo "== $name: ${launch[*]} benchmarks/gpu_fsdp_rank.py $cfg" | tee "$OUT/$name.log"
  timeout "${RUN_TIMEOUT:-250}" "${launch[@]}" benchmarks/gpu_fsdp_rank.py "$cfg" 2>&1 | tee -a "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc" | tee -a "$OUT/$name.log"
  return "$rc"
}

summary() {  # $1 = log name
  "$PY" - "$OUT/$1.log" "$NPROC" <<'PY'
import re, sys
text = open(sys.argv[1], errors="replace").read()
nproc = int(sys.argv[2])
losses = [float(x) for x in re.findall(r"'loss': '?([-0-9.e+]+)'?", text)]
kls = [float(x) for x in re.findall(r"'kl': '?([-0-9.e+]+)'?", text)]
top1 = [float(x) for x in re.findall(r"'top1_agreement': '?([-0-9.e+]+)'?", text)]
started = sorted(set(re.findall(r"\[m1-rank\] rank (\d+) of world", text)))
stepped = sorted(set(re.findall(r"\[m1-rank\] rank (\d+) first step", text)))
print(f"logged steps: {len(losses)}")
if losses:
    k = max(1, min(5, len(losses) // 4))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"loss first {losses[0]:.4g} last {losses[-1]:.4g} (mean of first/last {k}: {first:.4g} -> {last:.4g})")
    print("LOSS FELL" if last < first else "LOSS DID NOT FALL")
if kls:
    print(f"kl {kls[0]:.4g} -> {kls[-1]:.4g}; top1_agreement {top1[0] if top1 else float('nan'):.3g} -> {top1[-1] if top1 else float('nan'):.3g}")
print(f"ranks started: {started}; ranks that ran a distillation step: {stepped}")
print(f"{len(stepped)} RANKS RAN" if len(stepped) == nproc else f"EXPECTED {nproc} RANKS, {len(stepped)} RAN")
for line in re.findall(r"\[m1-rank\] rank \d+ first step: .*", text):
    print(line[:300])
print("TRAINING COMPLETED" if "Training completed" in text else "training did not complete")
for line in text.splitlines():
    if re.search(r"Error|Traceback|CUDA out of memory", line) and "Warning" not in line:
        print("first error:", line.strip()[:300])
        break
PY
}

train fsdp_2gpu
rc=$?
if [ "$rc" != 0 ] && [ "${FSDP:-1}" = 1 ]; then
  echo "== first run failed (exit $rc): retrying without FSDP activation checkpointing"
  train fsdp_2gpu_noac --no-activation-checkpointing
  echo "== summary of the retry (fsdp_2gpu_noac.log)"
  summary fsdp_2gpu_noac
fi
echo "== summary (fsdp_2gpu.log)"
summary fsdp_2gpu
ls -la "$WORK/out" 2>/dev/null | head -20 | tee "$OUT/saved_model.txt"
exit "$rc"
