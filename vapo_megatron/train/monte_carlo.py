"""The loop's Monte-Carlo values (values/mc.py): the "mc" value source and the critic's Monte-Carlo targets
(`algorithm.mc_critic_weight`; both: every response of the step) and the critic probe (a few responses every
`mc.probe_every` steps, `ev_oracle`)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vapo_megatron.algorithms import explained_variance_mc
from vapo_megatron.config import VapoConfig
from vapo_megatron.data.rl_batch import RLBatch
from vapo_megatron.timing import StepTimer
from vapo_megatron.values.boundaries import delimiter_token_ids
from vapo_megatron.values.mc import (
    MCEstimate,
    StepSplit,
    estimate_values,
    explained_variance_ceiling,
    oracle_explained_variance,
    probe_rows,
    response_tokens,
    token_values,
)


@dataclass
class StepMC:
    """One step's Monte-Carlo results (all None when nothing ran)."""

    values: torch.Tensor | None = None
    """[n, R] every token's step value (value_source "mc", or critic targets with mc_critic_weight > 0)."""
    next_values: torch.Tensor | None = None
    """[n, R] the next boundary's value (the response's reward for the last step)."""
    source: MCEstimate | None = None
    probe: MCEstimate | None = None
    probe_rows: list[int] | None = None
    are_old_values: bool = False
    """`values` serve as the batch's old values (value_source "mc" without a critic, Trainer.old_logprobs_and_values):
    their own ev_mc is then the step's `ev_mc`, and `mc_ev_mc` is not logged beside it."""


class MonteCarlo:
    """What the config asks of Monte-Carlo values, and running it on a step's batch."""

    def __init__(self, cfg: VapoConfig, tokenizer: Any):
        from vapo_megatron.errors import PreflightError

        self.cfg, m = cfg, cfg.mc
        self.source = cfg.algorithm.value_source == "mc"
        self.targets = cfg.algorithm.mc_critic_weight > 0  # every step, value pretraining included
        self.needed = self.source or self.targets or m.probe_every > 0
        delimiters = frozenset()
        if self.needed and m.step_delimiter:
            delimiters = delimiter_token_ids(tokenizer, m.step_delimiter)
            if not delimiters:
                raise PreflightError(f"mc.step_delimiter {m.step_delimiter!r}: no token of the tokenizer contains it; "
                                     "set another delimiter, or mc.step_delimiter=null with mc.step_tokens=K")
        self.split = StepSplit(delimiters, 0 if delimiters else m.step_tokens, m.every_step, m.max_steps)

    def run(self, engine: Any, batch: RLBatch, prompts: list, scoring: Any, step: int, next_seed: Callable[[], int],
            timer: StepTimer, *, with_critic: bool, source: bool = True) -> StepMC:
        """Collective: every row's values (for the source when `source`: PPO steps; for the critic's targets at
        every step), and the probe's when it is due (only with a critic)."""
        from vapo_megatron.train.scoring import continuation_scorer

        out, m = StepMC(), self.cfg.mc
        if not self.needed:
            return out

        def estimate(rows: list[int], k: int) -> MCEstimate:
            prompt_ids, responses = response_tokens(batch.input_ids, batch.prompt_lens, batch.lengths, rows)
            return estimate_values(engine, prompt_ids, responses, [self.split.boundaries(r) for r in responses],
                                   continuation_scorer(scoring, prompts, batch.prompt_index[rows]), k=k,
                                   max_response_length=self.cfg.rollout.max_response_length, seed=next_seed(),
                                   temperature=self.cfg.rollout.temperature)

        if (self.source and source) or self.targets:
            with timer("mc_values"):
                out.source = estimate(list(range(batch.n)), m.k)
            out.values, out.next_values = token_values(out.source, batch.lengths.tolist(), batch.scores.tolist(),
                                                       batch.resp_mask.shape[1])
            out.are_old_values = not with_critic  # no critic: the loop takes them as the old values
        if with_critic and m.probe_every and step % m.probe_every == 0:
            out.probe_rows = probe_rows(batch.n, self.cfg.rollout.n, m.probe_rows)
            with timer("mc_probe"):
                out.probe = estimate(out.probe_rows, m.probe_k)
        return out

    @staticmethod
    def metrics(mc: StepMC, batch: RLBatch) -> dict[str, float]:
        """Cost (`mc_tokens`: continuation tokens, `mc_requests`, `mc_boundaries`: per response) and `ev_oracle`."""
        out = {}
        for prefix, est in (("mc", mc.source), ("probe", mc.probe)):
            if est is not None:
                out[f"{prefix}_tokens"] = float(est.tokens)
                out[f"{prefix}_requests"] = float(est.requests)
                out[f"{prefix}_boundaries"] = sum(map(len, est.boundaries)) / max(1, len(est.boundaries))
        if mc.probe is not None and batch.has("old_values"):
            out["ev_oracle"] = oracle_explained_variance(batch.old_values, mc.probe_rows, mc.probe)
            rows = torch.tensor(mc.probe_rows)  # the ceiling of ev_mc on the probe's rows, and the critic's ev_mc there
            out["ev_ceiling"] = explained_variance_ceiling(mc.probe, batch.lengths[rows].tolist(),
                                                           batch.scores[rows].tolist())
            out["probe_ev_mc"] = explained_variance_mc(batch.old_values[rows], batch.scores[rows],
                                                       batch.resp_mask[rows]).item()
        if mc.values is not None and not mc.are_old_values:  # the Monte-Carlo values' own ev_mc, beside the critic's
            out["mc_ev_mc"] = explained_variance_mc(mc.values, batch.scores, batch.resp_mask).item()
        return out
