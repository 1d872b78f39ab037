#!/usr/bin/env bash
# Run the kernel tests on the GPU and the kernel benchmarks, writing results under $OUT (or
# benchmarks/results). Usage on the GPU machine, from the repo root:
#   bash benchmarks/gpu_kernels.sh [smoke|scan|decode|conv|losses|tests|baselines|all]
# Nothing is installed: the packages are put on PYTHONPATH (the GPU machine has no network).
# `baselines` first builds mamba-ssm's and causal-conv1d's CUDA kernels from the sdists carried in
# .gpu_baselines/ (scripts/fetch_cuda_baseline_sdists.sh), then runs scan, decode and conv against them.
set -uo pipefail
what=${1:-all}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/kernels:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
run() { echo "== $*"; timeout "${STEP_TIMEOUT:-280}" "$@" 2>&1 | grep -v -i "register_constant\|warn(" | tail -40; }
case $what in
  smoke)
    for b in selective_scan decode conv1d fused_kl logprob_entropy; do run python benchmarks/bench_$b.py --smoke --out "$OUT/smoke"; done ;;
  tests)
    run python -m pytest tests/kernels -q -x -p no:cacheprovider -k "cuda" ;;
  scan) run python benchmarks/bench_selective_scan.py --out "$OUT" ;;
  decode) run python benchmarks/bench_decode.py --out "$OUT" ;;
  conv) run python benchmarks/bench_conv1d.py --out "$OUT" ;;
  losses)
    run python benchmarks/bench_fused_kl.py --out "$OUT"
    run python benchmarks/bench_logprob_entropy.py --out "$OUT" ;;
  baselines)
    build=$HOME/cuda_baselines
    timeout "${BUILD_TIMEOUT:-420}" python benchmarks/build_cuda_baselines.py --sdists .gpu_baselines --build "$build" 2>&1 | tail -5
    export PYTHONPATH="$(python benchmarks/build_cuda_baselines.py --build "$build" --print-path):$PYTHONPATH"
    for w in decode conv scan; do bash "$0" "$w"; done ;;
  all) for w in tests scan decode conv losses; do bash "$0" "$w"; done ;;
esac
