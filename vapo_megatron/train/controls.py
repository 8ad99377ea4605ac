"""The loop's controls: which rows each mini-batch takes, and when value pretraining ends."""
from __future__ import annotations

import torch

from vapo_megatron.data.rl_batch import RLBatch


def minibatch_order(n: int, seed: int, step: int, epoch: int) -> torch.Tensor:
    """The mini-batch permutation of one epoch of one step: different at every step and epoch, and a function of
    (seed, step, epoch) alone, so a resumed run draws the same one."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + epoch)
    return torch.randperm(n, generator=gen)


def value_pretrain_stop(step: int, cap: int, ev_mc: float | None, threshold: float | None) -> str | None:
    """Why value pretraining ends after this step, or None to go on: "ev_threshold" once the step's ev_mc
    (values before the step's update, on its fresh rollouts of the initial policy: a held-out measure) reaches
    ``threshold``; "step_cap" at ``cap`` steps (algorithm.value_pretrain_steps). NaN ev_mc never stops it."""
    if threshold is not None and ev_mc is not None and ev_mc >= threshold:
        return "ev_threshold"
    return "step_cap" if step >= cap else None


def actor_rows_masked(mb: RLBatch, keep: torch.Tensor) -> RLBatch:
    """The actor's view of a mini-batch under DAPO's filter (`keep` [n] bool): every row stays, so the row count
    still splits over the data-parallel ranks, but the filtered rows' response mask is zero, so no loss term, no
    metric and no global count (tokens, sequences, correct tokens) sees them: the same maths as leaving them out.
    (Leaving them out made the count uneven, which the engines refuse at DP > 1.) They still cost a forward."""
    out = mb.rows(slice(None))
    out.resp_mask = mb.resp_mask * keep.to(mb.resp_mask.dtype)[:, None]
    return out
