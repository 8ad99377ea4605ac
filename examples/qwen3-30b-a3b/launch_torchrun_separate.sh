#!/usr/bin/env bash
# One node of the qwen3-30b-a3b separate-placement recipe (vapo_separate.yaml: 12 node(s) x 8 GPUs; node ranks 0-7 train,
# 8-11 run only vLLM). On each node, from the repository root:
#   NNODES=12 NODE_RANK=<0..11> MASTER_ADDR=<node 0> bash examples/qwen3-30b-a3b/launch_torchrun_separate.sh [overrides]
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export CONFIG=${CONFIG:-$HERE/vapo_separate.yaml}
export NNODES=${NNODES:-12}
exec bash "$HERE/../cluster/launch_torchrun.sh" "$@"
