#!/usr/bin/env bash
# The main job on a CPU laptop: set up .venv (first time only), then run the tiny demo on 4 gloo ranks.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bash "$ROOT/tools/setup_cpu_env.sh"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
cd "$ROOT"
exec .venv/bin/torchrun --standalone --nproc-per-node 4 examples/tiny_cpu/demo_parallel.py "$@"
