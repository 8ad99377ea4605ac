#!/usr/bin/env bash
# One node of the qwen3-32b recipe (8 node(s) x 8 GPUs). On each node, from the repository root:
#   NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0> bash examples/qwen3-32b/launch_torchrun.sh [overrides]
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export CONFIG=${CONFIG:-$HERE/vapo.yaml}
export NNODES=${NNODES:-8}
exec bash "$HERE/../cluster/launch_torchrun.sh" "$@"
