#!/usr/bin/env bash
# One node of the qwen3-8b recipe (2 node(s) x 8 GPUs). On each node, from the repository root:
#   NNODES=2 NODE_RANK=<0..1> MASTER_ADDR=<node 0> bash examples/qwen3-8b/launch_torchrun.sh [overrides]
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export CONFIG=${CONFIG:-$HERE/vapo.yaml}
export NNODES=${NNODES:-2}
exec bash "$HERE/../cluster/launch_torchrun.sh" "$@"
