"""Rollout: grouped sampling with a vLLM engine in the trainer's processes, and weight pushes into it.

- `sampler`: `SamplingConfig`, `RolloutOutput`, per-response seeds, `generate_distributed` (data-parallel spread).
- `vllm_engine`: `RolloutEngine` (vLLM in-process; external launcher under torchrun).
- `weight_sync`: buckets and `push_weights`, which drives a transport for one policy version.
- `transports`: one file per way of moving weights (`colocated`: in-process vLLM, used by
  `RolloutEngine.update_weights`; `broadcast`: from a trainer export rank over a process group; `memory`).
- `generate`: the generation-only entry point (`generate_main`).
- `reference`: Hugging Face forward log-probs, to check the engine against.

Importing this package does not import vLLM; building a `RolloutEngine` does.
"""
from vapo_megatron.rollout.sampler import RolloutOutput, SamplingConfig, generate_distributed, sample_seed
from vapo_megatron.rollout.vllm_engine import RolloutEngine, RolloutEngineConfig
from vapo_megatron.rollout.weight_sync import WeightUpdateStats

__all__ = ["RolloutEngine", "RolloutEngineConfig", "RolloutOutput", "SamplingConfig", "WeightUpdateStats",
           "generate_distributed", "sample_seed"]
