"""Split invariance: one batch as 4 micro-batches with global normalisers equals the full batch (loss and grads).

Each micro-batch is trimmed to its own longest response, as a token-budget micro-batcher would do, so the check
also catches normalisers that depend on the padded length. Gradient accumulation sums micro-batch gradients, so the
sum of micro-batch losses (and of their gradients) must equal the full-batch loss (and its gradient).
"""

from __future__ import annotations

import pytest
import torch

from vapo_megatron.algorithms import (
    count_correct_tokens,
    count_seqs,
    count_tokens,
    explained_variance_from_stats,
    explained_variance_stats,
    policy_loss,
    positive_lm_loss,
    value_loss,
)

N_MICRO = 4
MAX_LEN = 40


def make_batch(seed: int = 0, batch: int = 16):
    """Random float64 batch whose micro-batches differ in token counts and correct-response counts."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, MAX_LEN + 1, (batch,), generator=gen)
    lengths[:4] = torch.tensor([3, 1, 0, 2])  # a short micro-batch, with one empty row
    mask = torch.arange(MAX_LEN)[None, :] < lengths[:, None]
    old = -torch.rand(batch, MAX_LEN, generator=gen, dtype=torch.float64) * 3
    logprobs = old + 0.4 * torch.randn(batch, MAX_LEN, generator=gen, dtype=torch.float64)
    adv = torch.randn(batch, MAX_LEN, generator=gen, dtype=torch.float64)
    is_correct = torch.tensor([True, False, False, True] + [bool(i % 3) for i in range(batch - 4)])
    return logprobs, old, adv, mask, is_correct


def micro_slices(mask: torch.Tensor):
    """Row ranges of N_MICRO micro-batches, each with its own trimmed length (>= 1)."""
    size = mask.shape[0] // N_MICRO
    for i in range(N_MICRO):
        rows = slice(i * size, (i + 1) * size)
        yield rows, max(int(mask[rows].sum(-1).max()), 1)


def split_sum(loss_fn, leaf: torch.Tensor, mask: torch.Tensor, *others: torch.Tensor, row_args=()):
    """Sum of loss_fn over micro-batches (loss and metrics) and the accumulated gradient on ``leaf``."""
    leaf = leaf.detach().clone().requires_grad_()
    total, metrics = torch.zeros((), dtype=torch.float64), {}
    for rows, length in micro_slices(mask):
        cut = [x[rows, :length] for x in (leaf, mask, *others)]
        loss, m = loss_fn(*cut, *[r[rows] for r in row_args])
        loss.backward()
        total = total + loss.detach()
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0) + v
    return total, metrics, leaf.grad


def full(loss_fn, leaf: torch.Tensor, mask: torch.Tensor, *others: torch.Tensor, row_args=()):
    leaf = leaf.detach().clone().requires_grad_()
    loss, metrics = loss_fn(leaf, mask, *others, *row_args)
    loss.backward()
    return loss.detach(), metrics, leaf.grad


def assert_same(a, b) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a[2], b[2], rtol=1e-10, atol=1e-12)
    for k, v in b[1].items():
        torch.testing.assert_close(a[1][k], v, rtol=1e-10, atol=1e-12, msg=f"metric {k}")


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_policy_loss_split_invariant(agg):
    """Failure: policy loss, gradient or a metric changes when the batch is split into micro-batches (normaliser
    not global, or padded length leaking into the aggregation)."""
    logprobs, old, adv, mask, _ = make_batch()
    norms = dict(global_tokens=count_tokens(mask), global_seqs=count_seqs(mask), norm_len=MAX_LEN)

    def fn(lp, m, o, a):
        return policy_loss(lp, o, a, m, agg=agg, dual_clip=3.0, **norms)

    assert_same(split_sum(fn, logprobs, mask, old, adv), full(fn, logprobs, mask, old, adv))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_value_loss_split_invariant(agg):
    """Failure: value loss, gradient, clip fraction or value mean depend on the micro-batch split."""
    values, old, returns, mask, _ = make_batch(1)
    norms = dict(global_tokens=count_tokens(mask), global_seqs=count_seqs(mask))

    def fn(v, m, o, g):
        return value_loss(v, o, g, m, clip=0.2, agg=agg, **norms)

    assert_same(split_sum(fn, values, mask, old, returns), full(fn, values, mask, old, returns))


def test_positive_lm_loss_split_invariant():
    """Failure: positive-example NLL is not normalised by the global count of correct-response tokens."""
    logprobs, _, _, mask, is_correct = make_batch(2)
    n = count_correct_tokens(mask, is_correct)

    def fn(lp, m, c):
        return positive_lm_loss(lp, m, c, global_correct_tokens=n)

    assert_same(split_sum(fn, logprobs, mask, row_args=(is_correct,)), full(fn, logprobs, mask, row_args=(is_correct,)))


@pytest.mark.parametrize("which", ["positive_lm", "token-mean"])
def test_per_micro_batch_normaliser_gives_a_different_answer(which):
    """Failure (of this test): per-micro-batch normalisation happens to agree, so the invariance tests above would
    not detect a missing global normaliser. With unequal counts per micro-batch the local-count loss (averaged over
    micro-batches, as gradient accumulation does) must differ from the full-batch loss: the global one is necessary."""
    logprobs, old, adv, mask, is_correct = make_batch(3)
    if which == "positive_lm":
        full_loss = positive_lm_loss(logprobs, mask, is_correct)[0]
        local = [positive_lm_loss(logprobs[r, :n], mask[r, :n], is_correct[r])[0] for r, n in micro_slices(mask)]
    else:
        full_loss = policy_loss(logprobs, old, adv, mask)[0]
        local = [policy_loss(logprobs[r, :n], old[r, :n], adv[r, :n], mask[r, :n])[0] for r, n in micro_slices(mask)]
    per_micro = torch.stack(local).mean()
    assert abs(per_micro.item() - full_loss.item()) > 1e-3 * max(1.0, abs(full_loss.item()))


def test_explained_variance_stats_sum_over_micro_batches():
    """Failure: explained variance is not computable from summed statistics (per-micro-batch averaging differs)."""
    values, _, returns, mask, _ = make_batch(4)
    stats = sum(explained_variance_stats(returns[r, :n], values[r, :n], mask[r, :n]) for r, n in micro_slices(mask))
    full_ev = explained_variance_from_stats(explained_variance_stats(returns, values, mask))
    torch.testing.assert_close(explained_variance_from_stats(stats), full_ev, rtol=1e-12, atol=1e-12)
