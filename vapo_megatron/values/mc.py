"""Monte-Carlo values from step boundaries (VinePPO-style): the value of a prefix is the mean reward of K
continuations sampled from it by the rollout engine.

For every response and every one of its step boundaries ``b`` (values/boundaries.py), the prefix is the prompt
plus the first ``b`` response tokens. All prefixes of a batch go to the engines in one call
(`generate_distributed`: each data-parallel engine takes its share, vLLM's prefix cache shares the KV blocks of a
prefix between its K continuations and of a response between its boundaries), at the training temperature with
the full distribution. Each continuation is appended to its prefix and the whole response is scored by the user's
reward (`ScoreFn`), so a value is an unbiased estimate of ``E[R | prefix]`` under the current policy, with
standard error ``sd(R | prefix) / sqrt(K)``.

Budget: a continuation from ``b`` may add ``max_response_length - b`` tokens. The call samples with the budget of
the shortest prefix and cuts each continuation to its own budget (marked truncated, as the rollout would be).
With seeded per-request generators, the kept tokens are exactly those a call with the exact budget samples.

Every rank must call these functions together (generation and scoring are collective) with the same arguments;
every rank gets the same estimates.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch

from vapo_megatron.algorithms import explained_variance, explained_variance_mc, masked_mean, monte_carlo_returns
from vapo_megatron.rollout.sampler import SamplingConfig, generate_distributed
from vapo_megatron.values.boundaries import boundary_token_values, step_boundaries

ScoreFn = Callable[[Sequence[int], Sequence[Sequence[int]], Sequence[bool]], torch.Tensor]
"""(row of each response, its full response token ids, whether it was cut at the length limit) -> [N] scores.
Collective: every rank calls it with the same arguments and gets the same scores."""


@dataclass(frozen=True)
class StepSplit:
    """How responses are cut into steps (config: `mc.*`)."""

    delimiter_ids: Collection[int] = ()
    every_tokens: int = 0
    every_step: int = 1
    max_steps: int = 16

    def boundaries(self, response_ids: Sequence[int]) -> list[int]:
        return step_boundaries(response_ids, delimiter_ids=self.delimiter_ids, every_tokens=self.every_tokens,
                               every_step=self.every_step, max_steps=self.max_steps)


@dataclass
class MCEstimate:
    """Monte-Carlo values of some responses' boundaries, and what they cost."""

    boundaries: list[list[int]]
    """Per response, its boundaries (response positions, 0 first)."""
    values: list[list[float]]
    """Per response, the mean continuation reward at each boundary."""
    tokens: int
    """Continuation tokens generated (the cost)."""
    requests: int
    """Continuations sampled: K per boundary."""
    seconds: float
    """Wall time of generation and scoring."""
    variances: list[list[float]] = field(default_factory=list)
    """Per response, the sample variance (denominator K - 1; NaN at K = 1) of the K continuation rewards at each
    boundary: the Monte-Carlo value's own noise is this / K."""
    k: int = 0
    """Continuations per boundary (0: not recorded)."""


def estimate_values(engine, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                    boundaries: Sequence[Sequence[int]], score: ScoreFn, *, k: int, max_response_length: int,
                    seed: int, temperature: float = 1.0, stop_token_ids: Sequence[int] = ()) -> MCEstimate:
    """The value of every boundary of every response: the mean `score` of `k` continuations from it.

    Continuation j of prefix i (row-major over responses, then boundaries) is request (i, j) of one
    `generate_distributed` call with `seed`, so the samples do not depend on how many engines share the call."""
    start = time.perf_counter()
    rows, prefixes, offsets = [], [], []
    for r, (prompt, response, bounds) in enumerate(zip(prompt_ids, response_ids, boundaries, strict=True)):
        for b in bounds:
            if not 0 <= b < len(response) or b >= max_response_length:
                raise ValueError(f"boundary {b} of response {r} is outside its {len(response)} tokens")
            rows.append(r)
            prefixes.append([*prompt, *response[:b]])
            offsets.append(b)
    if not prefixes:
        return MCEstimate([list(b) for b in boundaries], [[] for _ in boundaries], 0, 0,
                          time.perf_counter() - start)
    params = SamplingConfig(n=k, temperature=temperature, max_tokens=max_response_length - min(offsets), seed=seed,
                            stop_token_ids=tuple(stop_token_ids), logprobs=False)
    out = generate_distributed(engine, prefixes, params)
    full, cut, owner = [], [], []
    for i, cont in enumerate(out.response_ids):
        p = int(out.prompt_index[i])
        budget = max_response_length - offsets[p]
        prefix_resp = response_ids[rows[p]][:offsets[p]]
        full.append([*prefix_resp, *cont[:budget]])
        cut.append(len(cont) > budget or out.finish_reason[i] == "length")
        owner.append(rows[p])
    per_prefix = score(owner, full, cut).to(torch.float64).reshape(len(prefixes), k)
    means = per_prefix.mean(dim=1).tolist()
    spreads = per_prefix.var(dim=1).tolist() if k > 1 else [math.nan] * len(prefixes)
    values: list[list[float]] = [[] for _ in boundaries]
    variances: list[list[float]] = [[] for _ in boundaries]
    for r, v, s2 in zip(rows, means, spreads):
        values[r].append(v)
        variances[r].append(s2)
    return MCEstimate(boundaries=[list(b) for b in boundaries], values=values, tokens=int(out.lengths.sum()),
                      requests=len(out), seconds=time.perf_counter() - start, variances=variances, k=k)


def response_tokens(input_ids: torch.Tensor, prompt_lens: torch.Tensor, lengths: torch.Tensor,
                    rows: Sequence[int]) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, response ids) of `rows` of a padded batch (prompt + response per row)."""
    prompts, responses = [], []
    for r in rows:
        p, n = int(prompt_lens[r]), int(lengths[r])
        ids = input_ids[r].tolist()
        prompts.append(ids[:p])
        responses.append(ids[p:p + n])
    return prompts, responses


def token_values(estimate: MCEstimate, lengths: Sequence[int], finals: Sequence[float], width: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, next_values)`` ``[len(rows), width]``: every token takes its step's Monte-Carlo value and the next
    boundary's (the response's own reward for the last step); values/boundaries.py `boundary_token_values`."""
    pairs = [boundary_token_values(b, v, float(f), int(n), width)
             for b, v, f, n in zip(estimate.boundaries, estimate.values, finals, lengths, strict=True)]
    if not pairs:
        return torch.zeros(0, width), torch.zeros(0, width)
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def oracle_explained_variance(critic_values: torch.Tensor, rows: Sequence[int], estimate: MCEstimate) -> float:
    """`ev_oracle`: explained variance of the critic's values (``[n, R]``, ``values[t] = V(s_t)``) read at the
    boundaries of `rows`, against their Monte-Carlo values. NaN when the Monte-Carlo values are all equal."""
    critic = [float(critic_values[r, b]) for r, bounds in zip(rows, estimate.boundaries) for b in bounds]
    mc = [v for vals in estimate.values for v in vals]
    if not mc:
        return float("nan")
    target, pred = torch.tensor(mc, dtype=torch.float64), torch.tensor(critic, dtype=torch.float64)
    return explained_variance(target[None], pred[None], torch.ones(1, len(mc), dtype=torch.bool)).item()


def explained_variance_ceiling(estimate: MCEstimate, lengths: Sequence[int], finals: Sequence[float]) -> float:
    """`ev_ceiling`: the ev_mc that the true step values of these responses would reach, 1 - E[(G - V)^2] / Var(G)
    over their tokens (G the response's reward, V(s_t) the value of token t's step start), estimated without bias
    from K continuations per boundary. The Monte-Carlo mean V_hat carries noise of variance sigma^2 / K,
    independent of G given the prefix, so E[(G - V_hat)^2] = E[(G - V)^2] + E[sigma^2 / K], and the sample
    variance s^2 (denominator K - 1) estimates sigma^2 without bias. No critic that sees only the prefix up to
    its step start can beat it in expectation; a critic that reads tokens inside a step can, by what those
    tokens reveal (so it is a step-level ceiling). NaN at K < 2 or when every reward is equal."""
    k = estimate.k
    if k < 2 or len(estimate.variances) != len(estimate.values) or \
            any(len(v) != len(s) for v, s in zip(estimate.values, estimate.variances)):
        return float("nan")
    width = max(lengths, default=0)
    noise = MCEstimate(estimate.boundaries, estimate.variances, 0, 0, 0.0)  # s^2 spread over each step's tokens
    value, _ = token_values(estimate, lengths, finals, width)
    spread, _ = token_values(noise, lengths, finals, width)
    mask = torch.arange(width)[None] < torch.tensor(list(lengths))[:, None]
    scores = torch.tensor(list(finals), dtype=torch.float64)
    ev = explained_variance_mc(value, scores, mask).item()  # of the noisy V_hat: NaN when every reward is equal
    if math.isnan(ev) or not torch.isfinite(spread[mask]).all():
        return float("nan")
    g = monte_carlo_returns(scores, mask)
    var_g = masked_mean(g * g, mask) - masked_mean(g, mask) ** 2
    return ev + float(masked_mean(spread.to(torch.float64) / k, mask) / var_g)  # the noise E[s^2 / K] given back


def probe_rows(num_rows: int, group_size: int, count: int) -> list[int]:
    """`count` rows spread over the batch: one per group in turn (sample 0 of every group, then sample 1, ...),
    so a small probe sees many prompts."""
    groups = max(1, num_rows // max(1, group_size))
    order = [g * group_size + s for s in range(group_size) for g in range(groups) if g * group_size + s < num_rows]
    return sorted(order[:count])
