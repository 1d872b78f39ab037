#!/usr/bin/env bash
# `vllm serve` of an M1 checkpoint on the GPU machine through the installed plugin entry point (no
# in-process registration): pip install -e ., show the vllm.general_plugins entry points Python sees,
# build a tiny random M1 hybrid (SmolLM2 tokenizer files carried in .gpu_tok/), serve it with CUDA graphs,
# and ask the OpenAI completions and chat endpoints. Run after `source .gpu/setup.sh`.
set -uo pipefail
OUT=${OUT:-runs/serve_check}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
gunzip -kf .gpu_tok/tokenizer.json.gz
python3 - <<'PY'
import importlib.metadata as md
print("vllm.general_plugins entry points:", [(e.name, e.value) for e in md.entry_points(group="vllm.general_plugins")])
import pathlib, tests.vllm.conftest as c
c.smollm2_dir = lambda n: pathlib.Path(".gpu_tok")
print("tiny M1 checkpoint:", c.build_tiny("/tmp/m1_tiny"))
PY
python3 -m vllm.entrypoints.cli.main serve /tmp/m1_tiny --port 8011 --max-model-len 512 \
  --gpu-memory-utilization 0.3 > "$OUT/serve.log" 2>&1 &
pid=$!
for i in $(seq 240); do curl -sf localhost:8011/health >/dev/null && break; sleep 1; done
echo "server up after ${i}s"
curl -s localhost:8011/v1/completions -H 'Content-Type: application/json' \
  -d '{"model":"/tmp/m1_tiny","prompt":"The capital of France is","max_tokens":16,"temperature":0}' | tee "$OUT/completion.json"; echo
curl -s localhost:8011/v1/chat/completions -H 'Content-Type: application/json' \
  -d '{"model":"/tmp/m1_tiny","messages":[{"role":"user","content":"Hi"}],"max_tokens":16,"temperature":0}' | tee "$OUT/chat.json"; echo
kill $pid; wait $pid 2>/dev/null
grep -iE "plugin|m1|cuda graph|capturing|error" "$OUT/serve.log" | head -20
