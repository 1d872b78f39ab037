#!/usr/bin/env bash
# Download (here, with registry access) the wheels an offline GPU machine needs to IMPORT the parts of
# VeRL that verl_m1.inprocess_grpo uses (FSDP engine, losses, GRPO advantages), into .gpu_verl/, plus a
# setup.sh that installs them there with --no-deps --no-index into $HOME/site_verl.
#
# The list was found by running the in-process GRPO path with a meta-path finder that hides every package
# absent on the GPU machine (verl, ray, tensordict, omegaconf, antlr4, hydra, codetiming, datasets, dill,
# multiprocess, orjson, zstandard) and allowing them back one at a time until it ran:
#   verl 0.9.1, tensordict (imported by verl.protocol), omegaconf + antlr4 (verl configs), codetiming
#   (verl.utils.profiler), datasets + dill + multiprocess (verl.utils.dataset.rl_dataset is imported by the
#   FSDP engine), orjson (tensordict on Python < 3.13).
# The reward (m1_eval's grader) needs math-verify + latex2sympy2_extended (sympy comes with torch).
# Not needed: hydra-core (only verl.trainer.main_ppo), zstandard (torch probes it optionally), and Ray:
# verl_m1.ray_absent registers a placeholder when Ray is missing (its wheel is ~70 MB).
# tensordict 0.8.3 = the version tested on CPU; its _C extension links only libstdc++ (no libtorch), so it
# works with any torch (2.11 on the GPU machine). verl 0.9.1 pins tensordict >=0.8,<=0.10,!=0.9.0.
# Versions = the CPU .venv where this path is tested.
# Usage: bash scripts/gpu_verl_wheels.sh   (then carry .gpu_verl; on the GPU: source .gpu_verl/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.gpu_verl
mkdir -p "$DEST"
"$PY" -m pip download -d "$DEST" --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  verl==0.9.1 tensordict==0.8.3 omegaconf==2.3.1 codetiming==1.4.0 \
  datasets==4.8.4 dill==0.4.1 multiprocess==0.70.19 orjson==3.13.0 \
  math-verify==0.9.0 latex2sympy2_extended==1.11.0
# omegaconf 2.3 pins antlr4-python3-runtime 4.9.*, published as an sdist only: build its (pure-Python,
# py3-none-any) wheel here.
"$PY" -m pip wheel -w "$DEST" --no-deps antlr4-python3-runtime==4.9.3
cat > "$DEST/setup.sh" <<'SH'
# source .gpu_verl/setup.sh : install the carried wheels (no network) and put them on PYTHONPATH.
_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export M1_SITE_VERL=${M1_SITE_VERL:-$HOME/site_verl}
python3 -m pip install -q --no-deps --no-index --target "$M1_SITE_VERL" "$_here"/*.whl
export PYTHONPATH="$M1_SITE_VERL${PYTHONPATH:+:$PYTHONPATH}"
SH
ls -la "$DEST"
du -ch "$DEST"/*.whl | tail -1
