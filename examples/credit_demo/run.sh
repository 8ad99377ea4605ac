#!/usr/bin/env bash
# README's main job on a CPU laptop: set up .venv (first time only), make the small bounded-walk task and a
# warm-started 0.3M-parameter model (first time only, a few minutes), then run VAPO on one process: the critic's
# value pretraining (ev_mc rising from about 0) and PPO (accuracy rising). Extra arguments are dotted config
# overrides. Watch runs/credit_demo/vapo/: metrics.jsonl, curves.png, credit/step_*.png.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bash "$ROOT/tools/setup_cpu_env.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" PYTHONWARNINGS=ignore
cd "$ROOT"
.venv/bin/python examples/credit/prepare.py --out runs/credit_demo/assets --min-steps 3 --max-steps 9 \
    --num-train 192 --sft-steps 500 --hidden 128 --layers 2
exec .venv/bin/vapo-train --config examples/credit_demo/vapo.yaml "$@"
