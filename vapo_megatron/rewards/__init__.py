"""Reward functions: a registry (``math``, ``synthetic``, ``verl_default`` built in), user functions given as
``file.py:function`` or ``module:function`` (the project's or verl's signature), a manager that scores batches
with per-call timeouts in worker processes, and DAPO's overlong penalty and group filter."""
from vapo_megatron.rewards.builtin import math_reward, synthetic_reward  # importing registers them
from vapo_megatron.rewards.manager import (
    RewardItem,
    RewardManager,
    RewardResults,
    RewardStats,
    systematic_failure,
)
from vapo_megatron.rewards.registry import (
    RewardFn,
    RewardSpec,
    available_rewards,
    get_reward,
    load_custom_reward,
    register_reward,
    resolve_reward,
    score_from_output,
)
from vapo_megatron.rewards.shaping import apply_overlong_penalty, filter_uniform_groups, overlong_penalty
from vapo_megatron.rewards.verl_default import verl_default_reward  # importing registers it

__all__ = [
    "RewardFn",
    "RewardItem",
    "RewardManager",
    "RewardResults",
    "RewardSpec",
    "RewardStats",
    "apply_overlong_penalty",
    "available_rewards",
    "filter_uniform_groups",
    "get_reward",
    "load_custom_reward",
    "math_reward",
    "overlong_penalty",
    "register_reward",
    "resolve_reward",
    "score_from_output",
    "synthetic_reward",
    "systematic_failure",
    "verl_default_reward",
]
