"""Building what the loop runs on: the rollout engine, the policy and critic engines, data and rewards."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from vapo_megatron.config import VapoConfig, critic_vocab_problem

if TYPE_CHECKING:  # imported where used: megatron-core and vLLM load only after the platform shims
    from vapo_megatron.data.datasets import PromptDataset, PromptLoader
    from vapo_megatron.engine.model_engine import ModelEngine
    from vapo_megatron.models.hf_config import ModelArch
    from vapo_megatron.parallel.layout import RoleLayouts
    from vapo_megatron.rewards import RewardManager
    from vapo_megatron.rollout.vllm_engine import RolloutEngine


@dataclass
class Parts:
    """What `build_parts` gives the loop."""

    rollout_engine: RolloutEngine | None  # None with separate placement (the rollout pool has the engines)
    actor: ModelEngine
    critic: ModelEngine | None       # None without a critic (GRPO / DAPO-style runs)
    arch: ModelArch
    tokenizer: Any                   # a Hugging Face tokenizer
    loader: PromptLoader
    val: PromptDataset | None
    rewards: RewardManager | None    # rank 0 only
    layouts: RoleLayouts


def critic_hf_get(cfg: VapoConfig, arch: ModelArch) -> Callable[[str], torch.Tensor]:
    """Critic init, as an HF tensor getter: trunk from critic_hf_dir (or the policy's); value head from its HF
    `score` head when present, else N(0, initializer_range) from the run seed (the paper starts from a reward
    model instead)."""
    from vapo_megatron.convert.hf_io import HFCheckpointReader

    reader = HFCheckpointReader(cfg.model.critic_hf_dir or cfg.model.hf_dir)

    def get(name: str) -> torch.Tensor:
        if name == "score.weight" and name not in reader:
            gen = torch.Generator().manual_seed(cfg.train.seed + 17)
            return torch.randn(1, arch.hidden_size, generator=gen) * arch.init_std
        return reader.get(name)

    return get


def critic_architecture(cfg: VapoConfig, arch: ModelArch) -> ModelArch:
    """The critic's shape: `model.critic_hf_dir`'s own (a critic of another size, e.g. larger than the policy), or
    the policy's. It reads the policy's tokens, so its vocabulary must be the policy's (ValueError otherwise)."""
    from vapo_megatron.models.hf_config import load_arch

    if cfg.model.critic_hf_dir in (None, cfg.model.hf_dir):
        return arch
    critic = load_arch(cfg.model.critic_hf_dir)
    if problem := critic_vocab_problem(arch, critic):
        raise ValueError(problem)
    return critic


def _seed_like_vllm(seed: int) -> None:
    """What building a vLLM engine does to this process's global generators (it seeds random, numpy, torch)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_engines(cfg: VapoConfig) -> tuple[ModelArch, RoleLayouts, ModelEngine, ModelEngine | None]:
    """(arch, layouts, policy engine, critic engine or None) from the config, with the initial weights: the
    engines of `build_parts` without vLLM, data or rewards (tests load and save checkpoints with them)."""
    from vapo_megatron.convert.hf_io import HFCheckpointReader
    from vapo_megatron.engine.model_engine import Execution, ModelEngine
    from vapo_megatron.models.hf_config import load_arch
    from vapo_megatron.parallel.layout import RoleLayouts

    arch = load_arch(cfg.model.hf_dir)
    critic_arch = critic_architecture(cfg, arch)
    layouts = RoleLayouts(cfg.policy_parallel, cfg.critic_parallel, seed=1234 + cfg.train.seed)
    execution = Execution.from_config(cfg)
    # weights stream into each rank's own shard, one parameter at a time: no rank holds the whole model
    actor = ModelEngine("policy", arch, layouts, cfg.actor_optim, execution, HFCheckpointReader(cfg.model.hf_dir).get,
                        routing_replay=cfg.algorithm.routing_replay)
    critic = ModelEngine("critic", critic_arch, layouts, cfg.critic_optim, execution,
                         critic_hf_get(cfg, critic_arch)) \
        if cfg.algorithm.use_critic else None
    return arch, layouts, actor, critic


def build_parts(cfg: VapoConfig, *, with_engine: bool = True) -> Parts:
    """Everything the loop runs on, built in the order the collectives need (vLLM first). `with_engine=False`:
    the trainer pool of separate placement, whose vLLM engines live on the rollout ranks."""
    from transformers import AutoTokenizer

    from vapo_megatron.data.datasets import PromptDataset, PromptLoader
    from vapo_megatron.rewards import RewardManager
    from vapo_megatron.rollout.vllm_engine import RolloutEngine

    r, alg, seed = cfg.rollout, cfg.algorithm, cfg.train.seed
    # vLLM first: building it is collective over all ranks and re-seeds the global generators.
    engine = RolloutEngine(cfg.model.hf_dir, tensor_parallel_size=r.vllm_tensor_parallel, seed=seed,
                           max_model_len=r.max_prompt_length + r.max_response_length,
                           cpu_kv_cache_bytes=r.cpu_kv_cache_bytes) if with_engine else None
    if not with_engine:
        _seed_like_vllm(seed)  # the generators as the engine would leave them: same critic head init either way
    torch.manual_seed(seed)
    arch, layouts, actor, critic = build_engines(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_dir)
    fmt = cfg.data.prompt_format
    train_set = PromptDataset.from_files(cfg.data.train_files, tokenizer, r.max_prompt_length, prompt_format=fmt)
    val_set = PromptDataset.from_files(cfg.data.val_files, tokenizer, r.max_prompt_length, prompt_format=fmt) \
        if cfg.data.val_files else None
    loader = PromptLoader(train_set, r.num_prompts, seed=seed, shuffle=cfg.data.shuffle)
    rewards = None
    if dist.get_rank() == 0:
        rewards = RewardManager(cfg.reward.name, timeout_s=cfg.reward.timeout_s, num_workers=cfg.reward.num_workers,
                                reward_kwargs=dict(correct_score=alg.reward_correct,
                                                   incorrect_score=alg.reward_incorrect))
    return Parts(engine, actor, critic, arch, tokenizer, loader, val_set, rewards, layouts)
