"""Pure math of VAPO: advantages, losses and metrics (tensors in, tensors out; no torch.distributed, no Megatron).

See docs/VAPO.md for the formulas. Global normalisers are passed explicitly; the engine layer all-reduces them.
"""

from vapo_megatron.algorithms.advantages import (
    DecoupledGAE,
    decoupled_gae,
    gae,
    gae_deltas,
    group_normalized_advantages,
    length_adaptive_lambda,
    reverse_discounted_cumsum,
    token_rewards_from_scores,
    uniform_group_mask,
    whiten_advantages,
)
from vapo_megatron.algorithms.losses import (
    LossAgg,
    aggregate_loss,
    entropy_loss,
    get_loss_agg,
    loss_agg_names,
    policy_loss,
    positive_lm_loss,
    register_loss_agg,
    value_loss,
)
from vapo_megatron.algorithms.metrics import (
    count_correct_tokens,
    count_seqs,
    count_tokens,
    explained_variance,
    explained_variance_from_stats,
    explained_variance_stats,
    masked_max,
    masked_mean,
    masked_min,
    masked_sum,
)

__all__ = [
    "DecoupledGAE",
    "LossAgg",
    "aggregate_loss",
    "count_correct_tokens",
    "count_seqs",
    "count_tokens",
    "decoupled_gae",
    "entropy_loss",
    "explained_variance",
    "explained_variance_from_stats",
    "explained_variance_stats",
    "gae",
    "gae_deltas",
    "get_loss_agg",
    "group_normalized_advantages",
    "length_adaptive_lambda",
    "loss_agg_names",
    "masked_max",
    "masked_mean",
    "masked_min",
    "masked_sum",
    "policy_loss",
    "positive_lm_loss",
    "register_loss_agg",
    "reverse_discounted_cumsum",
    "token_rewards_from_scores",
    "uniform_group_mask",
    "value_loss",
    "whiten_advantages",
]
