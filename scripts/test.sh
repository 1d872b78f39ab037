#!/usr/bin/env bash
# Run the whole test suite (lint, doctests of the public APIs, unit and integration tests) in the
# project environment. Usage: bash scripts/test.sh [extra pytest args]
#
# Each framework's suite runs in its own pytest process: Axolotl, VeRL and vLLM keep process-wide
# state (vLLM 0.32's Triton dispatcher scans every loaded module and trips over objects other
# frameworks leave in sys.modules), so sharing one interpreter would test the mix, not our code.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${M1_VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"   # Axolotl's CLI execs `accelerate` from PATH
status=0
echo "== ruff"
ruff check . || status=1
ruff format --check . || status=1
echo "== doctests of public APIs"
python -m pytest -q -p no:cacheprovider --doctest-modules m1_hybrid m1_cli m1_eval kernels/m1_kernels || status=1
for suite in model kernels eval vllm axolotl verl; do
  echo "== pytest tests/$suite"
  python -m pytest -p no:cacheprovider -rs --durations=10 "tests/$suite" "$@" || status=1
done
[ "$status" = 0 ] && echo "== all suites passed" || echo "== FAILED (see above)"
exit $status
