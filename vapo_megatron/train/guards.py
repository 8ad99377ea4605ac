"""Divergence guard: a step whose update is wildly out of range stops the run before that state is synced to vLLM
or checkpointed, so that the newest checkpoint is always the last good state (resume from it, e.g. with a lower
lr). The non-finite guard (engine train_step skips a step with a NaN/inf loss or gradient norm) only catches the
late symptom; these checks catch the first finite but destructive update.

Checked after every step's updates (thresholds in ``train.*``, 0 disables one):

* ``max_weight_norm_ratio``: a role's parameter L2 norm changed by more than this factor in one step (an absurd
  lr: Adam moves every weight by about lr, so the norm explodes on the first update);
* ``grad_norm_spike``: a role's gradient norm above this multiple of the median of its last 20 steps (after 5);
* ``max_approx_kl``: the policy's mean approx-KL to the rollout policy over the step's mini-batches;
* ``max_rollout_logprob_diff``: mean |log p_megatron - log p_vllm| of the step's rollout (weights out of sync or
  numerically broken).

Departure from "roll back in place": the run stops with DivergenceError instead; rolling back would need a copy
of every weight and optimizer state each step, and replaying the same step from the same state would diverge the
same way.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

from vapo_megatron.errors import DivergenceError

_WINDOW, _MIN_HISTORY = 20, 5


class DivergenceGuard:
    """Holds the thresholds and each role's recent gradient norms; see the module docstring."""

    def __init__(self, train_cfg: Any, run_dir: str) -> None:
        self.cfg, self.run_dir = train_cfg, run_dir
        self._norms_before: dict[str, float] = {}
        self._grad_history: dict[str, deque[float]] = {}

    def before_update(self, engines: Mapping[str, Any]) -> None:
        """Record each role's parameter norm (collective)."""
        if self.cfg.max_weight_norm_ratio > 0:
            self._norms_before = {role: engine.param_norm() for role, engine in engines.items()}

    def after_update(self, step: int, metrics: Mapping[str, float], engines: Mapping[str, Any],
                     rollout_logprob_diff: float | None = None) -> None:
        """Raise DivergenceError naming every check the step failed (collective; same result on every rank)."""
        problems = self._weight_problems(engines) + self._grad_problems(metrics)
        c = self.cfg
        kl = metrics.get("policy/approx_kl")
        if c.max_approx_kl > 0 and kl is not None and kl > c.max_approx_kl:
            problems.append(f"policy approx_kl {kl:.3g} > train.max_approx_kl={c.max_approx_kl}")
        diff = rollout_logprob_diff
        if c.max_rollout_logprob_diff > 0 and diff is not None and diff > c.max_rollout_logprob_diff:
            problems.append(f"rollout_logprob_diff {diff:.3g} > train.max_rollout_logprob_diff="
                            f"{c.max_rollout_logprob_diff}")
        if problems:
            raise DivergenceError(
                f"step {step} diverged: " + "; ".join(problems) + ". Stopped before syncing or saving this state: "
                f"the newest checkpoint in {self.run_dir}/checkpoints is the last good one (continue with --resume, "
                "e.g. with a lower learning rate); thresholds: train.max_weight_norm_ratio, train.grad_norm_spike, "
                "train.max_approx_kl, train.max_rollout_logprob_diff (0 disables one)")

    def _weight_problems(self, engines: Mapping[str, Any]) -> list[str]:
        limit, problems = self.cfg.max_weight_norm_ratio, []
        if limit <= 0:
            return problems
        for role, before in self._norms_before.items():
            after = engines[role].param_norm()
            ratio = after / before if before > 0 else math.inf
            if not math.isfinite(ratio) or ratio > limit or ratio < 1 / limit:
                problems.append(f"{role} weight norm {before:.4g} -> {after:.4g} in one step (factor > "
                                f"train.max_weight_norm_ratio={limit})")
        return problems

    def _grad_problems(self, metrics: Mapping[str, float]) -> list[str]:
        factor, problems = self.cfg.grad_norm_spike, []
        for role in ("policy", "critic"):
            norm = metrics.get(f"{role}/grad_norm")
            if norm is None or not math.isfinite(norm):
                continue  # a non-finite norm is the engine's skipped step
            history = self._grad_history.setdefault(role, deque(maxlen=_WINDOW))
            if factor > 0 and len(history) >= _MIN_HISTORY and norm > factor * statistics.median(history):
                problems.append(f"{role} grad norm {norm:.4g} > train.grad_norm_spike={factor} x the median "
                                f"{statistics.median(history):.4g} of its last {len(history)} steps")
            else:
                history.append(norm)
        return problems
