"""Off-policy correction of asynchronous training (decoupled PPO, Hilton et al. 2022; AReaL's form), pure math.

Three policies meet in one token's loss when a sample is k versions old:
- behaviour: the weights that sampled it (vLLM, version v - k); its log-probs are `rollout_logprobs`;
- proximal: the trainer's weights before this step's update (version v); its log-probs are the recomputed
  `old_logprobs`, the anchor of the PPO ratio and its clip;
- the policy being updated.

    loss_t = w_t * max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps_low, 1 + eps_high))
    rho_t = pi(a_t) / pi_prox(a_t),   w_t = min(pi_prox(a_t) / pi_behav(a_t), cap)

`w_t` is exactly the truncated importance weight the colocated trainer already applies for vLLM's numerics
(`losses.truncated_is_weights`, `algorithm.tis_cap`): with stale samples the same ratio also carries the policy
change, so the correction is that code, not a second copy. Deviation from AReaL: the cap truncates (min), it does
not drop tokens whose weight exceeds it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vapo_megatron.algorithms.losses import policy_loss, truncated_is_weights
from vapo_megatron.algorithms.metrics import masked_max, masked_mean, masked_min


def decoupled_ppo_loss(logprobs: Tensor, proximal_logprobs: Tensor, behaviour_logprobs: Tensor, advantages: Tensor,
                       mask: Tensor, *, cap: float | None, eps_low: float, eps_high: float,
                       dual_clip: float | None = None, agg: str = "token-mean", global_tokens=None,
                       global_seqs=None) -> tuple[Tensor, dict[str, Tensor]]:
    """The decoupled PPO surrogate above (cap None: every w_t = 1, plain PPO against the proximal policy).
    Returns `policy_loss`'s (loss, metrics), plus `tis_ratio_mean` / `tis_capped_frac` with a cap."""
    weights, extra = None, {}
    if cap is not None:
        weights, extra = truncated_is_weights(proximal_logprobs, behaviour_logprobs, mask, cap=cap,
                                              global_tokens=global_tokens)
    loss, metrics = policy_loss(logprobs, proximal_logprobs, advantages, mask, eps_low=eps_low, eps_high=eps_high,
                                dual_clip=dual_clip, is_weights=weights, agg=agg, global_tokens=global_tokens,
                                global_seqs=global_seqs)
    metrics.update(extra)
    return loss, metrics


def off_policy_metrics(sample_versions: Tensor, trainer_version: int, proximal_logprobs: Tensor,
                       behaviour_logprobs: Tensor, mask: Tensor, *, cap: float | None) -> dict[str, float]:
    """One step's staleness (trainer_version - each row's sampling version) and the behaviour -> proximal weights'
    statistics over its response tokens (uncapped; `capped_frac` against `cap`, 0 without one)."""
    staleness = (trainer_version - sample_versions).to(torch.float32)
    with torch.no_grad():
        log_w = (proximal_logprobs - behaviour_logprobs).clamp(-20.0, 20.0)
        w = torch.exp(log_w)
        m = mask.bool()
        tokens = m.sum().clamp(min=1)
        capped = ((w > cap) & m).sum() / tokens if cap is not None else torch.zeros(())
        wm = w.masked_fill(~m, 0.0)
        ess = wm.sum() ** 2 / (wm.pow(2).sum() * tokens).clamp(min=1e-30)  # Kish effective sample size / tokens
    return {"staleness_mean": staleness.mean().item(), "staleness_max": staleness.max().item(),
            "behaviour_weight_mean": masked_mean(w, mask).item(), "behaviour_weight_max": masked_max(w, mask).item(),
            "behaviour_weight_min": masked_min(w, mask).item(), "behaviour_weight_capped_frac": float(capped),
            "behaviour_weight_ess": float(ess)}
