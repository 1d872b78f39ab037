#!/usr/bin/env bash
# Run the kernel tests on the GPU and the kernel benchmarks, writing results under $OUT (or
# benchmarks/results). Usage on the GPU machine, from the repo root:
#   bash benchmarks/gpu_kernels.sh [smoke|scan|decode|conv|losses|tests|all]
# Nothing is installed: the packages are put on PYTHONPATH (the GPU machine has no network).
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
  all) for w in tests scan decode conv losses; do bash "$0" "$w"; done ;;
esac
