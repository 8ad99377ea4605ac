#!/usr/bin/env bash
# Start vapo-train on this node of a multi-node run; run it once per node (the recipes' launch_slurm.sbatch does).
#   CONFIG=examples/qwen2.5-32b/vapo.yaml NNODES=8 NODE_RANK=0 MASTER_ADDR=node0 bash examples/cluster/launch_torchrun.sh [overrides]
# The config is first checked for the whole world size with `--dry-run` (seconds, no GPU), so that a layout that
# cannot work fails here rather than after the model is loaded on every GPU.
set -euo pipefail
: "${CONFIG:?set CONFIG to the recipe YAML, e.g. examples/qwen2.5-32b/vapo.yaml}"
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
GPU_MEMORY_GIB=${GPU_MEMORY_GIB:-80}   # what the dry run plans memory for (e.g. 141 for H200)
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
WORLD_SIZE=$((NNODES * GPUS_PER_NODE))

# Megatron's tensor/sequence-parallel communication overlap relies on kernels being launched in order.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

if [ "$NODE_RANK" = 0 ]; then
    "$PYTHON" -m vapo_megatron.cli --config "$CONFIG" --dry-run --world-size "$WORLD_SIZE" \
        --gpus-per-node "$GPUS_PER_NODE" --gpu-memory-gib "$GPU_MEMORY_GIB" "$@"
fi
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" \
    --nproc-per-node "$GPUS_PER_NODE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m vapo_megatron.cli --config "$CONFIG" "$@"
