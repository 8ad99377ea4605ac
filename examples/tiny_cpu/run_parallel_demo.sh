#!/usr/bin/env bash
# Tiny policy and critic at TP=2 (+SP) x PP=2 on 4 gloo ranks: one forward/backward through megatron-core.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bash "$ROOT/tools/setup_cpu_env.sh"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
cd "$ROOT"
exec .venv/bin/torchrun --standalone --nproc-per-node 4 examples/tiny_cpu/demo_parallel.py "$@"
