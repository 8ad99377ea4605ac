#!/usr/bin/env bash
# README's test command: set up .venv (first time only), then run the default test suite (slow tests excluded;
# pass `-m slow` or `-m ""` to include them). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_cpu_env.sh"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
cd "$ROOT"
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout 900 "$@"
