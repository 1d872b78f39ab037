#!/usr/bin/env bash
# Download (here, with registry access) what an offline GPU machine needs to run `axolotl train` with the
# axolotl_m1 plugin (benchmarks/gpu_fsdp.sh), into .gpu_axolotl/, plus a setup.sh that installs it there
# with --no-deps --no-index into $HOME/site_axolotl. Self-contained: .gpu_verl is not needed.
#
# The list was found with scripts/hide_absent_venv.py: a venv that sees only the GPU machine's packages
# (/work/.device/9/gpu_pip_list.txt) plus an allow-list, running the real entry point on the tiny
# distillation config of gpu_fsdp_prepare.py (`python -m accelerate.commands.launch --num_processes 1
# -m axolotl.cli.train distill.yml`, CPU), adding the distribution of each missing module until it trained:
#   axolotl 0.19.0 + axolotl-contribs-lgpl (axolotl.train imports axolotl.contribs.lgpl; sdist only: built
#   here), pydantic + pydantic_core + typing-inspection + annotated-types (config schema), python-dotenv,
#   fire, termcolor (cli), addict, posthog + backoff + distro (telemetry, off via AXOLOTL_DO_NOT_TRACK),
#   trl, fastcore, evaluate (axolotl.utils.callbacks), datasets + dill + multiprocess (data loading).
# Not needed: axolotl-contribs-mit (muon/dion optimisers only), orjson, the rest of .gpu_verl.
# Replaced by stand-ins (scripts/gpu_axolotl_stubs, copied to .gpu_axolotl/stubs): bitsandbytes (imported
# at module level by axolotl.loaders.adapter for LoRA/QLoRA; its CUDA wheel is ~60 MB) and wandb (imported
# at module level by axolotl.utils.callbacks; ~20 MB + opentelemetry, and it would need protobuf < 7).
# Versions = the CPU .venv where this was tested. Axolotl 0.19 pins transformers 5.16.1 / accelerate 1.13 /
# peft 0.20; the GPU machine has 5.17.0 / 1.15.0 / 0.21.0 (installed with --no-deps: not enforced).
# Usage: bash scripts/gpu_axolotl_wheels.sh   (then carry .gpu_axolotl; on the GPU: source .gpu_axolotl/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.gpu_axolotl
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download -q -d "$DEST" --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  axolotl==0.19.0 trl==1.9.0 evaluate==0.4.1 fastcore==2.2.39 \
  pydantic==2.12.5 pydantic_core==2.41.5 typing-inspection==0.4.5 annotated-types==0.8.0 \
  python-dotenv==1.0.1 fire==0.7.1 termcolor==3.3.0 addict==2.4.0 posthog==6.7.11 backoff==2.2.1 distro==1.9.0 \
  datasets==4.8.4 dill==0.4.1 multiprocess==0.70.19
# published as an sdist only: build its (pure-Python, py3-none-any) wheel here.
"$PY" -m pip wheel -q -w "$DEST" --no-deps axolotl-contribs-lgpl==0.0.7
cp -r scripts/gpu_axolotl_stubs "$DEST/stubs"
find "$DEST/stubs" -name __pycache__ -prune -exec rm -rf {} +
cat > "$DEST/setup.sh" <<'SH'
# source .gpu_axolotl/setup.sh : install the carried wheels (no network) and put them, then the
# bitsandbytes/wandb stand-ins, on PYTHONPATH; Axolotl's telemetry off.
_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export M1_SITE_AXOLOTL=${M1_SITE_AXOLOTL:-$HOME/site_axolotl}
python3 -m pip install -q --upgrade --no-deps --no-index --target "$M1_SITE_AXOLOTL" "$_here"/*.whl
export PYTHONPATH="$M1_SITE_AXOLOTL:$_here/stubs${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$M1_SITE_AXOLOTL/bin:$PATH"
export AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_DISABLED=true
SH
ls -la "$DEST"
du -ch "$DEST"/*.whl | tail -1
du -sh "$DEST" .gpu_tok
du -ch "$DEST" .gpu_tok | tail -1
