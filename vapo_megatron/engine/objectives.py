"""Micro-batch losses of the actor and critic: model outputs -> response-token tensors -> the pure VAPO math.

A micro-batch (`data.rl_batch.MicroBatch`, made by the engine for each micro-batch's rows) carries, for m sequences
of padded length S and responses padded to R:
`input_ids [m, S]`, `targets [m, S]` (input_ids shifted left), `resp_pos [m, R]` (position in S whose output
scores response token j, i.e. prompt_len - 1 + j), `resp_mask [m, R]`, and the per-token tensors of the step
(`old_logprobs`, `advantages`, `returns`, `old_values`, vLLM's `rollout_logprobs`) plus `is_correct [m]`.
Every token mean uses the global counts of the whole mini-batch (`minibatch_counts`). A packed micro-batch
(data/packing.py) has `input_ids` / `targets` [1, T] and `resp_pos` pointing into that stream; the per-row tensors
are the same, so the losses do not change.

An `Objective` is a micro-batch loss together with the names of the metrics it returns. The names are fixed by
the config before any forward runs, so every rank knows them (a pipeline stage that never computes the loss too)
and the engine reduces them without asking the other ranks (engine/model_engine.py: `train_step`). They are the
names the pure losses give (algorithms/losses.py); the engine prefixes them with its role (`policy/pg_loss`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vapo_megatron.algorithms import (
    count_correct_tokens,
    count_seqs,
    count_tokens,
    entropy_loss,
    positive_lm_loss,
    value_loss,
)
from vapo_megatron.algorithms.off_policy import decoupled_ppo_loss
from vapo_megatron.config import AlgorithmConfig
from vapo_megatron.data.rl_batch import MicroBatch, RLBatch
from vapo_megatron.parallel.context import gather_sequence_of
from vapo_megatron.parallel.vocab_parallel import megatron_vocab_logprobs_entropy

LossOut = tuple[torch.Tensor, dict[str, torch.Tensor]]
MicroLoss = Callable[[torch.Tensor, MicroBatch], LossOut]


@dataclass(frozen=True)
class Objective:
    """A micro-batch loss `fn(model_output, micro_batch) -> (loss, metrics)` and the names of its metrics (the
    same on every rank and at every step: a schema, not a discovery). Calling it checks the returned names."""

    fn: MicroLoss
    metric_names: tuple[str, ...]

    def __call__(self, output: torch.Tensor, mb: MicroBatch) -> LossOut:
        loss, metrics = self.fn(output, mb)
        if set(metrics) != set(self.metric_names):
            raise ValueError(f"objective returned metrics {sorted(metrics)}, declared {sorted(self.metric_names)}")
        return loss, metrics


def positive_examples(is_correct: torch.Tensor, truncated: torch.Tensor | None) -> torch.Tensor:
    """[n] bool: the responses the positive-example NLL trains on: correct and not cut off at the length limit.
    A correct answer followed by re-checking until the limit scores as correct, but imitating it teaches the
    policy not to stop, against DAPO's overlong penalty (issue 25); the paper's NLL is over correct samples and
    is silent on truncation. `truncated` None (a batch without it): every correct response."""
    positive = is_correct.bool()
    return positive if truncated is None else positive & ~truncated.bool().to(positive.device)


def minibatch_counts(mb: RLBatch) -> dict[str, torch.Tensor]:
    """Global normalisers of one optimizer step. Every rank holds the whole mini-batch, so these are global
    without communication (each engine computes only its DP slice with them)."""
    mask = mb.resp_mask
    positive = positive_examples(mb.is_correct, mb.truncated if mb.has("truncated") else None)
    return {"tokens": count_tokens(mask).double(), "seqs": count_seqs(mask).double(),
            "correct_tokens": count_correct_tokens(mask, positive).double()}


def at_response(t: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """[m, R] the per-token values `t` ([m, S], or [1, T] of a packed stream) read at the response positions."""
    return t[0][mb.resp_pos] if mb.packed else t.gather(1, mb.resp_pos)


def response_logprobs(logits: torch.Tensor, mb: MicroBatch, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies [m, R] of the response tokens from vocab-parallel logits [m, S, V/tp]."""
    lp, ent = megatron_vocab_logprobs_entropy(logits, mb.targets, vocab_size, tp_group=mb.tp_group)
    lp, ent = gather_sequence_of(lp, mb), gather_sequence_of(ent, mb)  # whole sequences under CP
    return at_response(lp, mb), at_response(ent, mb)


def response_values(values: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """Critic values [m, R]: V(s_t) read at the position before response token t."""
    return at_response(gather_sequence_of(values, mb), mb)


def actor_objective(alg: AlgorithmConfig, counts: dict[str, torch.Tensor], vocab_size: int) -> Objective:
    """Token-level clip-higher PPO + mu * positive-example NLL (+ optional entropy bonus). Its metrics:
    policy_loss's (`pg_loss`, clip fractions, `approx_kl`, `ratio_mean`, `dual_clip_frac` with a dual clip),
    `tis_ratio_mean` / `tis_capped_frac` with TIS, `nll_loss` (0 when mu is 0) and `entropy`.

    Departure from the paper, only with `algorithm.tis_cap` set: the PPO term of each token is weighted by the
    truncated importance ratio of the trainer's old probability to vLLM's (`truncated_is_weights`); the NLL and
    entropy terms are not weighted."""

    def loss_fn(logits: torch.Tensor, mb: MicroBatch) -> LossOut:
        lp, ent = response_logprobs(logits, mb, vocab_size)
        mask = mb.resp_mask
        # decoupled PPO (algorithms/off_policy.py): ratio against the trainer's old log-probs (proximal), each token
        # weighted by min(p_old / p_vllm, tis_cap) (behaviour -> proximal); without a cap, plain PPO
        loss, metrics = decoupled_ppo_loss(lp, mb.old_logprobs, mb.rollout_logprobs, mb.advantages, mask,
                                           cap=alg.tis_cap, eps_low=alg.eps_low, eps_high=alg.eps_high,
                                           dual_clip=alg.dual_clip, agg=alg.loss_agg, global_tokens=counts["tokens"],
                                           global_seqs=counts["seqs"])
        if alg.positive_lm_coef > 0:
            nll, nll_metrics = positive_lm_loss(lp, mask, positive_examples(mb.is_correct, mb.truncated),
                                                global_correct_tokens=counts["correct_tokens"])
            loss = loss + alg.positive_lm_coef * nll
            metrics.update(nll_metrics)
        else:
            metrics["nll_loss"] = torch.zeros((), device=lp.device)
        ent_loss, ent_metrics = entropy_loss(ent, mask, agg="token-mean", global_tokens=counts["tokens"])
        if alg.entropy_coef > 0:
            loss = loss - alg.entropy_coef * ent_loss
        metrics.update(ent_metrics)
        return loss, metrics

    names = ("pg_loss", "clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean",
             *(("dual_clip_frac",) if alg.dual_clip is not None else ()),
             *(("tis_ratio_mean", "tis_capped_frac") if alg.tis_cap is not None else ()), "nll_loss", "entropy")
    return Objective(loss_fn, names)


def critic_objective(alg: AlgorithmConfig, counts: dict[str, torch.Tensor]) -> Objective:
    """0.5 * (V - G)^2 over all response tokens of the mini-batch (token mean, global count). Its metrics:
    `value_loss`, `value_clip_frac`, `value_mean` (value_loss's)."""

    def loss_fn(values: torch.Tensor, mb: MicroBatch) -> LossOut:
        v = response_values(values, mb)
        return value_loss(v, mb.old_values, mb.returns, mb.resp_mask, clip=alg.value_clip,
                          agg="token-mean", global_tokens=counts["tokens"])

    return Objective(loss_fn, ("value_loss", "value_clip_frac", "value_mean"))
