#!/usr/bin/env bash
# Run the whole test suite (lint, doctests of the public APIs, unit and integration tests) in the
# project environment. Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${M1_VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"   # Axolotl's CLI execs `accelerate` from PATH
echo "== ruff"
ruff check .
ruff format --check .
echo "== doctests of public APIs"
python -m pytest -q -p no:cacheprovider --doctest-modules m1_hybrid m1_cli m1_eval kernels/m1_kernels
echo "== pytest"
python -m pytest -rs --durations=15 "$@"
