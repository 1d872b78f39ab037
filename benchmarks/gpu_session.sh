#!/usr/bin/env bash
# The single-GPU runs of the training stages (issues #6 and #7), as four calls to one warm machine:
#
#   smoke  carry .gpu .gpu_tok .gpu_verl   install vLLM + VeRL wheels; GPU smoke of distill_gpu.py and
#                                          grpo_gpu.py on tiny random models (catch bugs before the real run)
#   stash  carry .gpu_teacher_a            keep the first part of the teacher GGUF
#   teacher carry .gpu_teacher_b           join the teacher (exported to an HF folder)
#   (any stage that carries .gpu_data keeps it in $HOME/data first: with the teacher's part b it no longer fits
#   the 64 MiB a call carries, so it travels with a later call, e.g. samples or final)
#   sample carry .gpu                      sample solutions to the training problems from the teacher through vLLM
#                                          (sample_teacher.py; SAMPLE_ARGS) into $HOME/samples; the parts come back
#                                          joined in $OUT/samples/samples_{0,1,2}.jsonl.xz. To finish on a new machine
#                                          a sampling that ran out of time, also carry .gpu_parts (its part_NNN.json
#                                          counts) and add --resume to SAMPLE_ARGS
#   samples carry .gpu_samples             keep samples that came back from an earlier machine in $HOME/samples
#   final  (no carry)                      distil SmolLM2-135M into a 25%-attention hybrid (distill_gpu.py;
#                                          DISTILL_ARGS adds e.g. --align-minutes, --samples $HOME/samples),
#                                          keeping the training state in $HOME/state
#   more   (no carry)                      continue for DISTILL_MINUTES more (repeatable; DISTILL_ARGS): the same
#                                          run from $HOME/state (optimizer, step, schedule; give final and every
#                                          more the same --schedule-minutes), else a fresh one from the saved
#                                          student (--init-student)
#   (final, more and profile run DISTILL_RANKS data-parallel ranks through torchrun when it is set above 1: one per
#   GPU; with DISTILL_ARGS="--dist-backend gloo" several may share one GPU, a smoke test of that path)
#   grpo   carry .gpu_data                 GRPO the distilled hybrid with vLLM rollouts (grpo_gpu.py; GRPO_ARGS)
#   profile carry .gpu_data .gpu_shape     where a distillation step's time goes, without the real teacher: random
#                                          weights in SmolLM2-135M's shapes (.gpu_shape: its config and tokenizer,
#                                          copied from m1_hybrid.teacher.smollm2_path(), see below); DISTILL_ARGS
#                                          adds flags. Here, once: mkdir -p .gpu_shape && cp "$(.venv/bin/python -c
#                                          'from m1_hybrid.teacher import smollm2_path; print(smollm2_path())')"/{*.json,*.jinja} .gpu_shape/
#
# The calls must follow each other within the machine's idle window (files live only while it is
# warm). Results (CSV, PNG, JSON, logs) are written under $HOME and packed into $OUT/results_<stage>.tgz
# (a call returns at most 8 files).
set -uo pipefail
stage=${1:?usage: gpu_session.sh smoke|stash|teacher|sample|samples|final|more|grpo|profile}
DEST=${OUT:-runs/gpu_session}
OUT=$HOME/gpu_session/$stage
mkdir -p "$OUT" "$DEST"
if [ -d .gpu_data ]; then rm -rf "$HOME/data" && cp -r .gpu_data "$HOME/data"; fi  # the training data, kept
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10 M1_CACHE_DIR=$HOME/m1cache
quiet() { grep -v -E "register_constant|warnings.warn|UserWarning|FutureWarning" ; }
teacher_dir() {  # the HF folder the teacher stage exported (m1_hybrid.teacher.smollm2_path, cached in M1_CACHE_DIR)
  python3 -c "from m1_hybrid.teacher import smollm2_path; print(smollm2_path())" 2>/dev/null | tail -1
}
distill() {  # benchmarks/distill_gpu.py as one process, or as DISTILL_RANKS data-parallel ranks (torchrun)
  if [ "${DISTILL_RANKS:-1}" -gt 1 ]; then
    python3 -m torch.distributed.run --standalone --nproc-per-node "$DISTILL_RANKS" benchmarks/distill_gpu.py "$@"
  else
    python3 benchmarks/distill_gpu.py "$@"
  fi
}
vllm_env() {  # vLLM installed by the smoke call; VeRL wheels next to it
  [ -f "$HOME/gpu_setup.sh" ] && source "$HOME/gpu_setup.sh" "${1:-.gpu}"  # vLLM only after the smoke stage
  export PYTHONPATH="$PWD:$PWD/kernels:$HOME/site_verl:${PYTHONPATH:-}"
}
case $stage in
  smoke)
    cp .gpu/setup.sh "$HOME/gpu_setup.sh"
    source .gpu_verl/setup.sh
    vllm_env .gpu
    gunzip -kf .gpu_tok/tokenizer.json.gz
    python3 - <<'PY'
import json, pathlib, sys
import tests.vllm.conftest as c
c.smollm2_dir = lambda n: pathlib.Path(".gpu_tok")
c.build_tiny("/tmp/m1_tiny")
sys.path.insert(0, "benchmarks")
from gpu_fsdp_prepare import build_teacher  # a tiny random GQA Llama teacher with SmolLM2's tokenizer
build_teacher(pathlib.Path("/tmp/llama_tiny"))
d = pathlib.Path("/tmp/tiny_data"); d.mkdir(exist_ok=True)
rows = [("What is 2+3?", "We add: $2+3=5$. So the answer is $\\boxed{5}$.", "5"),
        ("What is 7*6?", "Multiply: $7\\cdot 6=42$, so $\\boxed{42}$.", "42"),
        ("Compute 10-4.", "Subtract to get $\\boxed{6}$.", "6"), ("What is 9+9?", "Doubling 9 gives $\\boxed{18}$.", "18")]
for name in ("train.jsonl", "test.jsonl"):
    (d / name).write_text("".join(json.dumps({"problem": p, "solution": s, "answer": a}) + "\n" for p, s, a in rows * 8))
PY
    [ -n "${SKIP_DISTILL_SMOKE:-}" ] || timeout 150 python3 benchmarks/distill_gpu.py --teacher /tmp/llama_tiny --data-dir /tmp/tiny_data --seq-len 256 \
      --batch-rows 2 --max-steps 3 --align-minutes 0.05 --eval-docs 4 --out "$OUT/distill_smoke" --save /tmp/student_tiny 2>&1 | quiet | tail -25
    [ -n "${SKIP_GRPO_SMOKE:-}" ] || timeout 330 python3 benchmarks/grpo_gpu.py --model /tmp/m1_tiny --data /tmp/tiny_data/test.jsonl --steps 2 \
      --prompts-per-step 4 --n 4 --max-tokens 64 --bench-prompts 32 --repeats 1 --out "$OUT/grpo_smoke" 2>&1 | quiet | tail -30 ;;
  stash)
    bash benchmarks/gpu_teacher.sh stash ;;
  teacher)
    tp=$(bash benchmarks/gpu_teacher.sh assemble) || exit 3
    export PYTHONPATH="$PWD:$PWD/kernels:$tp"
    python3 -c "from m1_hybrid.teacher import smollm2_path; print('teacher:', smollm2_path())" 2>&1 | quiet | tail -1 ;;
  sample)
    [ -d "$HOME/data" ] || { echo "no data on this machine: carry .gpu_data in this call or an earlier one" >&2; exit 3; }
    source .gpu/setup.sh .gpu
    export PYTHONPATH="$PWD:$PWD/kernels:$HOME/teacher:$HOME/site_gguf:${PYTHONPATH:-}"
    if [ -d .gpu_parts ]; then  # parts done on an earlier machine (their part_NNN.json): --resume skips them
      mkdir -p "$HOME/samples" && cp .gpu_parts/part_*.json "$HOME/samples/"
    fi
    python3 benchmarks/sample_teacher.py --teacher "$(teacher_dir)" --data-dir "$HOME/data" --out "$HOME/samples" \
      ${SAMPLE_ARGS:-} 2>&1 | quiet > "$OUT/sample.log"
    status=$?
    tail -15 "$OUT/sample.log"; mkdir -p "$DEST/samples"; cp "$HOME/samples/summary.json" "$DEST/" 2>/dev/null
    # xz streams concatenate: three files come back however many parts (a call returns at most 8, 16 MiB each)
    i=0; for f in "$HOME"/samples/part_*.jsonl.xz; do cat "$f" >> "$DEST/samples/samples_$((i % 3)).jsonl.xz"; i=$((i + 1)); done
    [ $status -eq 0 ] || exit $status ;;
  samples)
    rm -rf "$HOME/samples" && cp -r .gpu_samples "$HOME/samples" && ls -la "$HOME/samples" ;;
  final)
    [ -d "$HOME/data" ] || { echo "no teacher/data on this machine: run the stash and teacher stages first, and carry .gpu_data" >&2; exit 3; }
    vllm_env "$HOME/none"
    export PYTHONPATH="$PYTHONPATH:$HOME/teacher:$HOME/site_gguf"
    distill --teacher "$(teacher_dir)" --data-dir "$HOME/data" --minutes "${DISTILL_MINUTES:-3.5}" \
      --eval-every 100 --eval-docs 200 --out "$OUT/distill" --save "$HOME/distilled" --state "$HOME/state" \
      ${DISTILL_ARGS:-} 2>&1 | quiet > "$OUT/distill.log"
    tail -25 "$OUT/distill.log" ;;
  more)
    [ -f "$HOME/distilled/config.json" ] || { echo "no distilled model: run the final stage first" >&2; exit 3; }
    vllm_env "$HOME/none"
    export PYTHONPATH="$PYTHONPATH:$HOME/teacher:$HOME/site_gguf"  # the teacher the teacher stage assembled
    from="--init-student $HOME/distilled"
    [ -f "$HOME/state/training_state.pt" ] && from="--state $HOME/state"
    distill --teacher "$(teacher_dir)" --data-dir "$HOME/data" $from \
      --minutes "${DISTILL_MINUTES:-8}" --eval-every 100 --eval-docs 200 --no-memory --out "$OUT/distill" \
      --save "$HOME/distilled" ${DISTILL_ARGS:-} 2>&1 | quiet > "$OUT/distill.log"
    tail -25 "$OUT/distill.log" ;;
  grpo)
    vllm_env "$HOME/none"
    [ -f "$HOME/distilled/config.json" ] || { echo "no distilled model: run the final stage first" >&2; exit 3; }
    timeout "${GRPO_TIMEOUT:-420}" python3 benchmarks/grpo_gpu.py --model "$HOME/distilled" --steps 4 --repeats 2 \
      --out "$OUT/grpo" ${GRPO_ARGS:-} 2>&1 | quiet > "$OUT/grpo.log"
    tail -25 "$OUT/grpo.log" ;;
  profile)
    vllm_env "$HOME/none"
    python3 -c "
import sys, torch, transformers
cfg = transformers.AutoConfig.from_pretrained('.gpu_shape')
torch.manual_seed(0)
transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(sys.argv[1])
" "$HOME/shape_teacher" && cp .gpu_shape/*.json .gpu_shape/*.jinja "$HOME/shape_teacher/"
    distill --teacher "$HOME/shape_teacher" --data-dir .gpu_data --max-steps 40 \
      --profile-steps 3 --eval-every 1000 --eval-docs 16 --no-memory --out "$OUT/distill" ${DISTILL_ARGS:-} \
      2>&1 | quiet > "$OUT/distill.log"
    grep -E "tok_per_s_median|train_seconds" "$OUT/distill/summary.json"; head -30 "$OUT/distill/profile.txt" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
tar czf "$DEST/results_$stage.tgz" -C "$OUT" . && ls -la "$DEST"
