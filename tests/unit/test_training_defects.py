"""Three defects that issue 25's review found, each pinned by a test that failed on the code before the fix:
the positive-example NLL trained on correct responses cut off at the length limit; `couple_gae` also changed the
value-pretraining targets; DAPO's filter left a mini-batch whose row count need not split over DP ranks."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from vapo_megatron.config import load_config
from vapo_megatron.engine.objectives import minibatch_counts, positive_examples
from vapo_megatron.testing.engines import synthetic_rl_batch
from vapo_megatron.train.controls import actor_rows_masked


def test_truncated_correct_responses_are_no_positive_examples():
    """Failure: a correct response that stopped at max_response_length counts in the NLL's tokens."""
    batch = synthetic_rl_batch(4, 64, seed=0)
    batch.is_correct = torch.tensor([True, True, False, True])
    batch.truncated = torch.tensor([False, True, False, False])
    assert positive_examples(batch.is_correct, batch.truncated).tolist() == [True, False, False, True]
    want = batch.resp_mask[[0, 3]].sum()
    assert minibatch_counts(batch)["correct_tokens"].item() == want.item()


def test_value_pretraining_fits_monte_carlo_returns_whatever_couple_gae_says():
    """Failure: with algorithm.couple_gae=true (the "without decoupled GAE" ablation) the value-pretraining
    targets use the policy's lambda instead of lambda = 1, so that ablation changes two things at once."""
    from vapo_megatron.train.loop import Trainer

    cfg = load_config(None, ["algorithm.couple_gae=true", "algorithm.length_adaptive=false",
                             "algorithm.lam_policy=0.9", "algorithm.whiten_advantages=false"])
    batch = synthetic_rl_batch(4, 64, seed=1)
    batch.scores = torch.tensor([1.0, 0.0, 1.0, 0.0])
    batch.old_values = torch.rand(batch.resp_mask.shape, generator=torch.Generator().manual_seed(0))
    trainer = SimpleNamespace(cfg=cfg, critic_ready=True)
    Trainer.advantages(trainer, batch, "value_pretrain")
    monte_carlo = batch.scores[:, None] * batch.resp_mask  # gamma = lambda = 1: the final reward on every token
    torch.testing.assert_close(batch.returns * batch.resp_mask, monte_carlo)
    Trainer.advantages(trainer, batch, "ppo")  # the ablation itself still couples in PPO
    assert (batch.returns * batch.resp_mask - monte_carlo).abs().max() > 1e-3


def test_dapo_filter_keeps_the_row_count_and_the_maths_of_dropping_rows():
    """Failure: the filtered actor mini-batch changes its row count (3 of 4 rows do not split over DP = 2), or
    its global counts differ from those of the kept rows alone (the loss normalisers would change)."""
    mb = synthetic_rl_batch(4, 64, seed=2)
    keep = torch.tensor([True, False, True, True])
    masked = actor_rows_masked(mb, keep)
    assert masked.n == 4 and masked.resp_mask[1].sum() == 0 and mb.resp_mask[1].sum() > 0  # original untouched
    dropped = mb.rows(keep.nonzero().squeeze(1))
    for name, value in minibatch_counts(dropped).items():
        assert minibatch_counts(masked)[name].item() == value.item(), name
