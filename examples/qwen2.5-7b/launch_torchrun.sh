#!/usr/bin/env bash
# One node of the qwen2.5-7b recipe (1 node(s) x 8 GPUs). On each node, from the repository root:
#   NNODES=1 NODE_RANK=<0..0> MASTER_ADDR=<node 0> bash examples/qwen2.5-7b/launch_torchrun.sh [overrides]
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export CONFIG=${CONFIG:-$HERE/vapo.yaml}
export NNODES=${NNODES:-1}
exec bash "$HERE/../cluster/launch_torchrun.sh" "$@"
