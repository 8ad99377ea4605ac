"""Errors a user can fix. The CLI prints their message alone, once, without a traceback (``--debug`` or
``VAPO_DEBUG=1`` shows it); any other exception is an internal error and keeps its full traceback."""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's inputs (config, data, tokenizer, reward, run directory, checkpoint)."""


class PreflightError(UserError):
    """An input found unusable before any model or vLLM engine is built."""


class RunDirError(UserError):
    """A run directory that would be silently reused, or cannot be resumed."""


class RewardFailureError(UserError):
    """The reward function fails systematically (every call, or more than reward.max_failed_fraction)."""


class DivergenceError(UserError):
    """A training step out of range (train.divergence_* thresholds) with no way to skip it; the state after it
    is not checkpointed."""


class UnsafeCheckpointError(UserError):
    """A checkpoint file that would run code when loaded, refused unless checkpoint.trust_checkpoints is set."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used: incomplete, damaged (its manifest's checksums), or not matching the engines
    it is loaded into; also a save that could not be written (e.g. the disk is full)."""


class RolloutRankError(RuntimeError):
    """Separate placement: a rollout rank (or the trainer, seen from a rollout rank) died, hung past
    rollout.rollout_timeout_s, or broke the protocol; the run stops instead of waiting forever."""


class StalenessError(RuntimeError):
    """Separate placement: a batch older than rollout.max_staleness policy versions reached the trainer."""


class CriticNotReadyError(UserError):
    """Value pretraining ended at its step cap with the critic explaining less than the threshold, and
    algorithm.critic_unready is "stop"."""
