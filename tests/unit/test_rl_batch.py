"""The typed RL batch (data/rl_batch.py) and the step timer (timing.py): row slicing keeps every per-row field and
only those, a field read before its phase raises naming the phase, micro-batches derive `targets` / `resp_pos` equal
to the whole-batch ones, GRPO batches carry no lam_policy and their metrics work, and the timer's t_* metrics."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from vapo_megatron.data.rl_batch import ROW_FIELDS, FieldNotSetError, RLBatch, build_rl_batch
from vapo_megatron.engine.microbatch import split_micro_batches
from vapo_megatron.testing.engines import synthetic_rl_batch
from vapo_megatron.timing import StepTimer


def _scored(n: int = 6, seed: int = 0) -> RLBatch:
    batch = synthetic_rl_batch(n, 64, seed=seed)
    batch.scores = torch.arange(n, dtype=torch.float32)
    batch.truncated = torch.zeros(n, dtype=torch.bool)
    batch.reward_stats = {"reward_errors": 0, "reward_timeouts": 0}
    batch.first_error_tokens = [None if i % 2 else (0, 1) for i in range(n)]
    batch.lam_policy = torch.full((n,), 0.9)
    return batch


def test_rows_keep_every_per_row_field_and_only_those():
    """Failure: a per-row field is lost or not cut to the rows (the old length heuristic's risk), or the batch-level
    reward_stats is sliced as if it had rows."""
    batch, idx = _scored(), torch.tensor([4, 1, 3])
    part = batch.rows(idx)
    set_rows = {name for name in ROW_FIELDS if batch.has(name)}
    assert set_rows == {name for name in ROW_FIELDS if part.has(name)}
    assert not part.has("reward_stats") and "reward_stats" not in ROW_FIELDS
    for name in set_rows:
        value, got = getattr(batch, name), getattr(part, name)
        want = value[idx] if isinstance(value, torch.Tensor) else [value[i] for i in idx.tolist()]
        assert (torch.equal(got, want) if isinstance(got, torch.Tensor) else got == want), name
    assert part.n == 3 and torch.equal(part.resp_pos, batch.resp_pos[idx])
    assert torch.equal(batch.rows(slice(1, 3)).input_ids, batch.input_ids[1:3])


def test_unset_rows_stay_unset():
    batch = build_rl_batch([[5, 6]], torch.tensor([0, 0]), [[7], [8, 9]], [[-1.0], [-1.0, -2.0]])
    assert not batch.rows([1]).has("old_values") and batch.rows([1]).lengths.tolist() == [2]


@pytest.mark.parametrize("name, phase", [("scores", "rewards"), ("old_logprobs", "engine forwards"),
                                         ("advantages", "advantages"), ("lam_policy", "advantages")])
def test_field_read_before_its_phase_raises_naming_it(name, phase):
    """Failure: a later phase's field reads as None (or a placeholder) before its phase has run."""
    batch = build_rl_batch([[5, 6, 7]], torch.tensor([0]), [[8, 9]], [[-1.0, -2.0]])
    with pytest.raises(FieldNotSetError, match=f"RLBatch.{name} is set by the {phase} "):
        getattr(batch, name)
    assert not batch.has(name)
    with pytest.raises(TypeError):  # one batch contract: no mapping access by name (issue 22)
        batch[name]


def test_from_tensors_derives_the_rollout_fields_and_refuses_bad_shapes():
    """Failure: a batch built from tensors gets other lengths / positions than build_rl_batch gives the same rows,
    or a row longer than input_ids, or a mismatched row count, is accepted."""
    ref = build_rl_batch([[5, 6, 7], [4]], torch.tensor([0, 1]), [[8, 9], [3, 2, 1]], [[0.0, 0.0], [0.0] * 3])
    batch = RLBatch.from_tensors(ref.input_ids, ref.prompt_lens, ref.resp_mask, scores=torch.tensor([1.0, 0.0]))
    for name in ("lengths", "seq_lens", "prompt_index", "rollout_logprobs"):
        assert torch.equal(getattr(batch, name), getattr(ref, name)), name
    assert torch.equal(batch.resp_pos, ref.resp_pos) and batch.scores.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="longer than input_ids"):
        RLBatch.from_tensors(ref.input_ids[:, :4], ref.prompt_lens, ref.resp_mask)
    with pytest.raises(ValueError, match="rows"):
        RLBatch.from_tensors(ref.input_ids, [3], ref.resp_mask)
    with pytest.raises(TypeError):
        RLBatch.from_tensors(ref.input_ids, ref.prompt_lens, ref.resp_mask, not_a_field=1)


def test_micro_batches_derive_targets_and_resp_pos_of_their_rows():
    """Failure: the per-micro-batch targets / resp_pos differ from the whole-batch ones (the equality the engines'
    numbers rest on), in fixed and in token-budget micro-batches."""
    batch = synthetic_rl_batch(12, 64, seed=1)
    targets, resp_pos = torch.roll(batch.input_ids, -1, dims=1), batch.resp_pos
    for tokens in (0, 48):
        micro, rows = split_micro_batches(batch, micro_batch_size=4, micro_batch_tokens=tokens, pad_multiple=8)
        for mb, r in zip(micro, rows):
            width = mb.input_ids.shape[1]
            assert torch.equal(mb.targets, targets[r, :width]) and torch.equal(mb.input_ids, batch.input_ids[r, :width])
            assert torch.equal(mb.resp_pos, resp_pos[r].clamp(max=width - 1))
            for name in ("resp_mask", "old_logprobs", "advantages", "returns", "old_values", "is_correct"):
                assert torch.equal(getattr(mb, name), getattr(batch, name)[r]), name
    assert "targets" not in {f.name for f in dataclasses.fields(RLBatch)}  # never stored for the whole batch


def test_grpo_batch_has_no_lam_policy_and_metrics_work():
    """Failure: the metrics need a placeholder lam_policy (GRPO sets none), or report one."""
    from vapo_megatron.train.metrics import batch_metrics

    batch = _scored()
    batch.lam_policy = None  # as GRPO leaves it: never set
    batch.is_correct = batch.scores > 2
    batch.advantages = torch.randn(batch.resp_mask.shape) * batch.resp_mask
    assert not batch.has("lam_policy")
    metrics = batch_metrics(batch)
    assert "lam_policy_mean" not in metrics and metrics["accuracy"] == pytest.approx(0.5)
    assert {"reward_mean", "rollout_logprob_diff", "reward_errors", "ev_mc"} <= set(metrics)
    batch.lam_policy = torch.full((batch.n,), 0.9)
    assert batch_metrics(batch)["lam_policy_mean"] == pytest.approx(0.9)


def test_step_timer_accumulates_zeroes_and_reports_the_rest():
    """Failure: repeated blocks overwrite instead of adding, a zeroed name is missing, or t_step / t_other do not
    add up."""
    now = [0.0]
    timer = StepTimer(clock=lambda: now[0])
    timer.start()
    timer.zero("actor_update")
    for seconds in (1.0, 2.0):
        with timer("critic_update"):
            now[0] += seconds
    now[0] += 0.5
    with pytest.raises(RuntimeError), timer("weight_sync"):
        now[0] += 0.25
        raise RuntimeError
    assert timer.as_metrics() == {"t_actor_update": 0.0, "t_critic_update": 3.0, "t_weight_sync": 0.25,
                                  "t_step": 3.75, "t_other": 0.5}
    timer.start()
    assert timer.as_metrics() == {"t_step": 0.0, "t_other": 0.0}
