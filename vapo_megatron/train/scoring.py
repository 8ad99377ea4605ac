"""Scoring: rewards on rank 0 broadcast to every rank, the step's `RLBatch` from a rollout, validation."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vapo_megatron.config import AlgorithmConfig, EvalConfig, RewardConfig
from vapo_megatron.data.rl_batch import RLBatch, build_rl_batch
from vapo_megatron.timing import StepTimer


def score_responses(tokenizer: Any, rewards: Any, max_failed_fraction: float, prompts: Sequence[Any], out: Any,
                    *, with_spans: bool = True) -> tuple[torch.Tensor, dict[str, int], list | None]:
    """Rewards on rank 0 (its reward workers, `rewards`; None elsewhere), broadcast to every rank, with each
    response's first-wrong-step token span when `with_spans` (None where the reward gives none; validation skips
    the mapping); every rank raises RewardFailureError when more than `max_failed_fraction` of the rewards
    failed."""
    from vapo_megatron.errors import RewardFailureError
    from vapo_megatron.report.credit import error_token_spans
    from vapo_megatron.rewards import RewardItem, systematic_failure

    payload = [None]
    if dist.get_rank() == 0:
        texts = tokenizer.batch_decode(out.response_ids, skip_special_tokens=True)
        items = [RewardItem(response=txt, ground_truth=prompts[int(p)].record.ground_truth,
                            prompt=prompts[int(p)].text, data_source=prompts[int(p)].record.data_source,
                            extra=prompts[int(p)].record.metadata)
                 for txt, p in zip(texts, out.prompt_index)]
        res = rewards.score(items, max_failed=int(max_failed_fraction * len(items)))  # stop once the limit is crossed
        fatal = systematic_failure(res.stats, max_failed_fraction)
        spans = error_token_spans(tokenizer, out.response_ids, texts, res.extras) if with_spans and not fatal \
            else None
        payload = [(res.scores, res.stats.num_errors, res.stats.num_timeouts, fatal, spans)]
    dist.broadcast_object_list(payload, src=0)
    scores, errors, timeouts, fatal, spans = payload[0]
    if fatal:  # every rank stops, with the same message
        raise RewardFailureError(fatal)
    return torch.tensor(scores, dtype=torch.float32), {"reward_errors": errors, "reward_timeouts": timeouts}, spans


@dataclass(frozen=True)
class Scoring:
    """What scoring a rollout needs besides the engine and the prompts: the tokenizer, rank 0's reward manager
    (None on other ranks) and the config pieces it reads."""

    tokenizer: Any
    rewards: Any
    reward: RewardConfig
    algorithm: AlgorithmConfig
    max_response_length: int


def _generate(rollout_engine: Any, prompt_ids: list[list[int]], params: Any) -> Any:
    """Colocated: every trainer rank's engine takes its share; separate placement: the rollout pool
    (`RemoteRollout.generate_all`)."""
    from vapo_megatron.rollout.sampler import generate_distributed

    if hasattr(rollout_engine, "generate_all"):
        return rollout_engine.generate_all(prompt_ids, params)
    return generate_distributed(rollout_engine, prompt_ids, params)


def score_rollout(rollout_engine: Any, prompts: Sequence[Any], params: Any, scoring: Scoring, *,
                  pad_multiple: int, timer: StepTimer) -> RLBatch:
    """Generate (every rank its own prompts), score (rank 0, broadcast) and build the step's `RLBatch` with its
    rollout and rewards fields; `scores` carry DAPO's overlong penalty when configured."""
    with timer("generation"):
        out = _generate(rollout_engine, [p.input_ids for p in prompts], params)
    return score_output(prompts, out, scoring, pad_multiple=pad_multiple, timer=timer,
                        version=rollout_engine.weight_version)


def score_output(prompts: Sequence[Any], out: Any, scoring: Scoring, *, pad_multiple: int, timer: StepTimer,
                 version: int) -> RLBatch:
    """Score a generated `RolloutOutput` (rank 0, broadcast) and build the step's `RLBatch`; every row records
    the policy `version` that sampled it."""
    alg = scoring.algorithm
    ids = [p.input_ids for p in prompts]
    with timer("reward"):
        scores, reward_stats, error_spans = score_responses(scoring.tokenizer, scoring.rewards,
                                                   scoring.reward.max_failed_fraction, prompts, out)
    batch = build_rl_batch(ids, out.prompt_index, out.response_ids, out.rollout_logprobs, pad_to_multiple=pad_multiple)
    batch.policy_version = torch.full((batch.n,), version, dtype=torch.long)
    batch.is_correct = scores >= alg.reward_correct
    batch.truncated = torch.tensor([f == "length" for f in out.finish_reason])
    batch.scores, batch.reward_stats = shaped(scores, batch.lengths, scoring), reward_stats
    batch.first_error_tokens = error_spans  # a list, not a tensor: never sent to the engines
    return batch


def shaped(scores: torch.Tensor, lengths: torch.Tensor, scoring: Scoring) -> torch.Tensor:
    """The training scores: DAPO's soft overlong penalty applied when configured."""
    from vapo_megatron.rewards.shaping import apply_overlong_penalty

    alg = scoring.algorithm
    if alg.overlong_buffer <= 0:
        return scores
    return torch.as_tensor(apply_overlong_penalty(scores, lengths, max_length=scoring.max_response_length,
                                                  buffer=alg.overlong_buffer, penalty_factor=alg.overlong_penalty),
                           dtype=torch.float32)


def continuation_scorer(scoring: Scoring, prompts: Sequence[Any], prompt_index: torch.Tensor):
    """values/mc.py's `ScoreFn` for Monte-Carlo continuations of this step's responses: the user's reward on each
    whole response (prefix + continuation; rank 0 scores, every rank gets the scores), shaped as the rollout's."""
    from vapo_megatron.rollout.sampler import RolloutOutput

    def score(rows, responses, cut) -> torch.Tensor:
        none = torch.zeros(len(rows), dtype=torch.long)
        out = RolloutOutput(prompt_index=prompt_index[list(rows)], sample_index=none,
                            response_ids=[list(r) for r in responses], rollout_logprobs=[[] for _ in rows],
                            finish_reason=["length" if c else "stop" for c in cut])
        scores, _, _ = score_responses(scoring.tokenizer, scoring.rewards, scoring.reward.max_failed_fraction, prompts,
                                       out, with_spans=False)
        return shaped(scores, out.lengths, scoring)

    return score


def validation_accuracy(rollout_engine: Any, val_prompts: Sequence[Any], scoring: Scoring, eval_cfg: EvalConfig,
                        seed: int) -> float:
    """avg@k accuracy on the held-out prompts (the paper's avg@32 at top_p 0.7, temperature 1.0)."""
    from vapo_megatron.rollout.sampler import SamplingConfig

    e = eval_cfg
    prompts = list(val_prompts)[: e.max_prompts] if e.max_prompts else list(val_prompts)
    params = SamplingConfig(n=e.n, temperature=e.temperature, top_p=e.top_p,
                            max_tokens=scoring.max_response_length, seed=seed + 99991)
    out = _generate(rollout_engine, [p.input_ids for p in prompts], params)
    scores, _, _ = score_responses(scoring.tokenizer, scoring.rewards, scoring.reward.max_failed_fraction, prompts, out,
                          with_spans=False)
    return (scores >= scoring.algorithm.reward_correct).float().mean().item()
