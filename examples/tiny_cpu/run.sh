#!/usr/bin/env bash
# The main job on a CPU laptop: set up .venv (first time only), prepare the synthetic task and a warm-started
# tiny model (first time only), then run VAPO on one process. Extra arguments are dotted config overrides.
# Watch runs/tiny_cpu/vapo/: metrics.jsonl, curves.png, tensorboard/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bash "$ROOT/tools/setup_cpu_env.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" PYTHONWARNINGS=ignore
cd "$ROOT"
.venv/bin/python examples/tiny_cpu/prepare.py --out runs/tiny_cpu/assets
exec .venv/bin/vapo-train --config examples/tiny_cpu/vapo.yaml "$@"
