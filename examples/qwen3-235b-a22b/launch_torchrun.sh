#!/usr/bin/env bash
# One node of the qwen3-235b-a22b recipe (32 node(s) x 8 GPUs). On each node, from the repository root:
#   NNODES=32 NODE_RANK=<0..31> MASTER_ADDR=<node 0> bash examples/qwen3-235b-a22b/launch_torchrun.sh [overrides]
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export CONFIG=${CONFIG:-$HERE/vapo.yaml}
export NNODES=${NNODES:-32}
export GPU_MEMORY_GIB=${GPU_MEMORY_GIB:-141}   # planned for H200 (141 GB) GPUs
exec bash "$HERE/../cluster/launch_torchrun.sh" "$@"
