#!/usr/bin/env bash
# The main job on a CPU laptop: set up .venv (first time only), write the bounded-walk task and warm-start a tiny
# model on imperfect demonstrations (first time only), then run VAPO on one process: value pretraining until the
# critic explains the Monte-Carlo return (ev_mc), then PPO. Extra arguments are dotted config overrides.
# Watch runs/credit/demo/: metrics.jsonl (ev_mc, credit_first_error_adv, val_accuracy), curves.png, credit/*.png.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bash "$ROOT/tools/setup_cpu_env.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" PYTHONWARNINGS=ignore
cd "$ROOT"
.venv/bin/python examples/credit/prepare.py --out runs/credit/demo_assets --min-steps 3 --max-steps 12 \
  --sft-steps 400
exec .venv/bin/vapo-train --config examples/credit/demo.yaml "$@"
