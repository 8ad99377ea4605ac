"""Advantage estimators against slow per-token Python loops written straight from docs/VAPO.md.

The references use Python floats (float64) and walk one response at a time over its ``L`` tokens, so they share no
code or layout tricks with the vectorised implementation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vapo_megatron.algorithms import (
    decoupled_gae,
    ev_lengthened_lambda,
    gae,
    group_normalized_advantages,
    length_adaptive_lambda,
    reverse_discounted_cumsum,
    token_rewards_from_scores,
    uniform_group_mask,
)

FAST = settings(max_examples=40, deadline=None)


# ----------------------------------------------------------------------------------------------- references
def ref_gae_row(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list, list]:
    """VAPO.md: delta_t = r_t + gamma V(s_{t+1}) - V(s_t), V(s_{L+1}) = 0; A_t = sum_k (gamma lam)^k delta_{t+k}."""
    length = len(rewards)
    adv = [0.0] * length
    for t in range(length):
        total = 0.0
        for k in range(length - t):
            next_v = values[t + k + 1] if t + k + 1 < length else 0.0
            delta = rewards[t + k] + gamma * next_v - values[t + k]
            total += (gamma * lam) ** k * delta
        adv[t] = total
    return adv, [a + v for a, v in zip(adv, values)]


def ref_gae(rewards, values, lengths, gamma, lams) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch of :func:`ref_gae_row` on right-padded rows, zeros on padding, float64."""
    adv = torch.zeros(rewards.shape, dtype=torch.float64)
    ret = torch.zeros(rewards.shape, dtype=torch.float64)
    for b, length in enumerate(lengths):
        a, g = ref_gae_row(rewards[b, :length].tolist(), values[b, :length].tolist(), gamma, float(lams[b]))
        adv[b, :length] = torch.tensor(a, dtype=torch.float64)
        ret[b, :length] = torch.tensor(g, dtype=torch.float64)
    return adv, ret


def ref_group_adv(scores: list[float], groups: list[int], eps: float, norm_by_std: bool) -> list[float]:
    """(score - mean of its group) / (unbiased std of its group + eps)."""
    out = []
    for i, s in enumerate(scores):
        members = [scores[j] for j in range(len(scores)) if groups[j] == groups[i]]
        mean = sum(members) / len(members)
        var = sum((m - mean) ** 2 for m in members) / max(len(members) - 1, 1)
        out.append((s - mean) / (math.sqrt(var) + eps) if norm_by_std else s - mean)
    return out


# ----------------------------------------------------------------------------------------------- inputs
def random_batch(seed: int, batch: int, length: int, garbage_padding: bool = True):
    """Random rewards/values, right-padded mask with lengths covering 0, 1 and T, per-sequence lambdas."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, length + 1, (batch,), generator=gen)
    lengths[0] = length
    if batch > 1:
        lengths[1] = min(1, length)
    if batch > 2:
        lengths[2] = 0
    mask = torch.arange(length)[None, :] < lengths[:, None]
    rewards = torch.randn(batch, length, generator=gen)
    values = torch.randn(batch, length, generator=gen)
    if garbage_padding:  # padding content must not leak into outputs
        rewards = torch.where(mask, rewards, 1e3)
        values = torch.where(mask, values, -1e3)
    lams = torch.rand(batch, generator=gen)
    lams[0] = 1.0
    return rewards, values, mask, lengths.tolist(), lams


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Element-wise ``|a - e| <= rtol * (|e| + scale)`` with ``scale = max(1, max |e|)`` (absolute floor)."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=rtol, atol=rtol * scale)


# ----------------------------------------------------------------------------------------------- gae
@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 6),
    length=st.integers(0, 80),
    gamma=st.sampled_from([1.0, 0.99, 0.5]),
)
def test_gae_matches_reference_per_sequence_lambda(seed, batch, length, gamma):
    """Failure: vectorised GAE (deltas, chunked scan, carry between chunks, masking) disagrees with the formula."""
    rewards, values, mask, lengths, lams = random_batch(seed, batch, length)
    adv, ret = gae(rewards, values, mask, gamma, lams, chunk_size=8)  # small chunks: several recursion levels
    ref_adv, ref_ret = ref_gae(rewards, values, lengths, gamma, lams.tolist())
    assert adv.shape == ret.shape == rewards.shape and adv.dtype == torch.float32
    assert_close_rel(adv, ref_adv)
    assert_close_rel(ret, ref_ret)


@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
def test_gae_scalar_lambda_and_mask_dtypes(lam):
    """Failure: a float lambda or a float/int mask is handled differently from a [B] lambda / bool mask."""
    rewards, values, mask, lengths, _ = random_batch(3, 5, 37)
    ref_adv, ref_ret = ref_gae(rewards, values, lengths, 1.0, [lam] * 5)
    for m in (mask, mask.float(), mask.long()):
        adv, ret = gae(rewards, values, m, 1.0, lam)
        assert_close_rel(adv, ref_adv)
        assert_close_rel(ret, ref_ret)
    adv_vec, _ = gae(rewards, values, mask, 1.0, torch.full((5,), lam))
    torch.testing.assert_close(adv_vec, adv)


def test_gae_outputs_zero_on_padding_and_returns_identity():
    """Failure: padding positions get nonzero outputs, or returns != advantages + values on response tokens."""
    rewards, values, mask, _, lams = random_batch(11, 6, 50)
    adv, ret = gae(rewards, values, mask, 1.0, lams)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    torch.testing.assert_close(ret[mask], adv[mask] + values[mask])


def test_gae_sparse_reward_lambda_one_is_monte_carlo():
    """Failure: with lam = gamma = 1 and a final reward R, A_t must telescope to R - V_t (lam_critic = 1 targets)."""
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    rewards = token_rewards_from_scores(torch.tensor([1.0, -1.0]), mask)
    values = torch.randn(2, 6)
    _, ret = gae(rewards, values, mask, 1.0, 1.0)
    expected = torch.tensor([[1.0] * 4 + [0.0] * 2, [-1.0] * 6])
    torch.testing.assert_close(ret, expected)


def sequential_adv(rewards: list, values: list, lam: float, dtype) -> np.ndarray:
    """A_t = r_t + V_{t+1} - V_t + lam * A_{t+1} (gamma = 1), a plain recurrence in numpy scalar ``dtype``."""
    r = np.asarray(rewards, dtype=dtype)
    v = np.append(np.asarray(values, dtype=dtype), dtype(0))
    lam_d, acc, out = dtype(lam), dtype(0), np.zeros(len(r), dtype=dtype)
    for t in reversed(range(len(r))):
        acc = (r[t] + v[t + 1] - v[t]) + lam_d * acc
        out[t] = acc
    return out.astype(np.float64)


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.99, 0.9999, 1.0])
def test_gae_long_sequence_precision(decay):
    """Failure: the scan loses precision on T = 32768 (e.g. dividing by small powers of gamma*lam, or float32 powers).

    Reference: the recurrence in float64. "Rounding level" is measured against the same recurrence run in float32:
    float32 TD residuals alone carry ~eps * sqrt(1 / (1 - lam)) noise, so the vectorised error must be within 2x of
    the sequential float32 loop's (plus a few ulps). Decays are exactly representable in float32 so that the check
    measures the algorithm, not the rounding of the input lambda.
    """
    length = 32768
    lam = float(torch.tensor(decay, dtype=torch.float32))
    gen = torch.Generator().manual_seed(0)
    rewards = torch.zeros(2, length)
    rewards[:, -1] = 1.0
    values = torch.rand(2, length, generator=gen)
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, length // 2 + 3 :] = False
    adv, _ = gae(rewards, values, mask, 1.0, torch.tensor([lam, lam]))
    for b in range(2):
        r, v = rewards[b, mask[b]].tolist(), values[b, mask[b]].tolist()
        ref = sequential_adv(r, v, lam, np.float64)
        loop32_err = np.abs(sequential_adv(r, v, lam, np.float32) - ref).max()
        err = np.abs(adv[b, mask[b]].double().numpy() - ref).max()
        bound = 2 * loop32_err + 4 * np.finfo(np.float32).eps * max(1.0, np.abs(ref).max())
        assert err <= bound, f"decay {decay}: max abs error {err}, float32 loop {loop32_err}"


@FAST
@given(seed=st.integers(0, 2**31 - 1), length=st.integers(1, 300), chunk=st.sampled_from([2, 4, 32, 512]))
def test_reverse_discounted_cumsum_any_chunk_size(seed, length, chunk):
    """Failure: the scan result depends on the chunk size (padding to whole chunks or recursion is wrong)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, length, generator=gen)
    decay = torch.rand(3, generator=gen)
    y = reverse_discounted_cumsum(x, decay, chunk_size=chunk)
    ref = torch.zeros(3, length, dtype=torch.float64)
    for b in range(3):
        acc = 0.0
        for t in reversed(range(length)):
            acc = float(x[b, t]) + float(decay[b]) * acc
            ref[b, t] = acc
    assert_close_rel(y, ref)
    assert y.is_contiguous()


def test_gae_rejects_bad_inputs():
    """Failure: out-of-range lambdas, wrong lambda shapes or mismatched shapes are silently accepted."""
    r = torch.zeros(2, 4)
    m = torch.ones(2, 4)
    with pytest.raises(ValueError, match="decay"):
        gae(r, r, m, 1.0, 1.5)
    with pytest.raises(ValueError, match=r"\[B\]=2"):
        gae(r, r, m, 1.0, torch.ones(3))
    with pytest.raises(ValueError, match="share one"):
        gae(r, r, m[:, :3], 1.0, 0.9)
    with pytest.raises(ValueError, match="power of two"):
        gae(r, r, m, 1.0, 0.9, chunk_size=12)
    with pytest.raises(ValueError, match="power of two >= 2"):
        gae(r, r, m, 1.0, 0.9, chunk_size=1)


# ----------------------------------------------------------------------------------------------- lambdas
def test_length_adaptive_lambda_formula_and_clamp():
    """Failure: lam != 1 - 1/(alpha l), or short/empty/huge responses escape [0, 1)."""
    lengths = torch.tensor([0, 1, 10, 20, 21, 100, 20480, 10**9])
    lam = length_adaptive_lambda(lengths, 0.05)
    expected = [0.0, 0.0, 0.0, 0.0, 1 - 1 / 1.05, 1 - 1 / 5, 1 - 1 / 1024]
    torch.testing.assert_close(lam[:7].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    assert lam.dtype == torch.float32 and (lam >= 0).all() and (lam < 1).all()
    assert (1 / (1 - lam[5].double())).item() == pytest.approx(0.05 * 100, rel=1e-5)  # sum of GAE weights = alpha L
    with pytest.raises(ValueError, match="alpha"):
        length_adaptive_lambda(lengths, 0.0)


def test_ev_lengthened_lambda_by_hand():
    """Failure: the horizon does not reach 1 for a critic that explains nothing, moves for a trusted one, or is
    not the linear blend in between (reference: the values worked out by hand)."""
    lam = torch.tensor([0.0, 0.5, 0.9])
    for ev, expected in [(0.6, [0.0, 0.5, 0.9]), (0.5, [0.0, 0.5, 0.9]), (-0.3, [1.0, 1.0, 1.0]), (0.0, [1.0] * 3),
                         (0.25, [0.5, 0.75, 0.95]), (0.4, [0.2, 0.6, 0.92]), (math.nan, [0.0, 0.5, 0.9])]:
        torch.testing.assert_close(ev_lengthened_lambda(lam, ev, 0.5), torch.tensor(expected), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="threshold"):
        ev_lengthened_lambda(lam, 0.1, 0.0)


@FAST
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 5), length=st.integers(0, 60))
def test_decoupled_gae_two_lambdas(seed, batch, length):
    """Failure: decoupled GAE mixes up the policy and critic lambdas or the length-adaptive lambda per sequence."""
    rewards, values, mask, lengths, _ = random_batch(seed, batch, length)
    out = decoupled_gae(rewards, values, mask, gamma=1.0, alpha=0.05, lam_critic=1.0)
    lam_ref = [max(0.0, 1 - 1 / (0.05 * n)) if n > 0 else 0.0 for n in lengths]
    torch.testing.assert_close(out.lam_policy.double(), torch.tensor(lam_ref, dtype=torch.float64), atol=1e-7, rtol=0)
    ref_adv, _ = ref_gae(rewards, values, lengths, 1.0, out.lam_policy.tolist())
    _, ref_ret = ref_gae(rewards, values, lengths, 1.0, [1.0] * batch)
    assert_close_rel(out.advantages, ref_adv)
    assert_close_rel(out.returns, ref_ret)


def test_decoupled_gae_fixed_lambda_and_argument_check():
    """Failure: a fixed lam_policy is not used for advantages, or conflicting lambda arguments are accepted."""
    rewards, values, mask, lengths, _ = random_batch(5, 4, 30)
    out = decoupled_gae(rewards, values, mask, lam_policy=0.95, lam_critic=0.9)
    ref_adv, _ = ref_gae(rewards, values, lengths, 1.0, [0.95] * 4)
    _, ref_ret = ref_gae(rewards, values, lengths, 1.0, [0.9] * 4)
    assert_close_rel(out.advantages, ref_adv)
    assert_close_rel(out.returns, ref_ret)
    assert out.lam_policy.shape == (4,) and torch.allclose(out.lam_policy, torch.tensor(0.95))
    with pytest.raises(ValueError, match="exactly one"):
        decoupled_gae(rewards, values, mask, lam_policy=0.95, alpha=0.05)
    with pytest.raises(ValueError, match="exactly one"):
        decoupled_gae(rewards, values, mask)


@FAST
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 5), length=st.integers(0, 60))
def test_coupled_gae_critic_uses_the_policy_lambda(seed, batch, length):
    """Failure: the "without decoupled GAE" ablation (coupled=True) does not give the critic the policy's
    per-sequence length-adaptive lambda, or lam_critic still leaks into the returns."""
    rewards, values, mask, lengths, _ = random_batch(seed, batch, length)
    out = decoupled_gae(rewards, values, mask, gamma=1.0, alpha=0.05, lam_critic=1.0, coupled=True)
    ref_adv, ref_ret = ref_gae(rewards, values, lengths, 1.0, out.lam_policy.tolist())
    assert_close_rel(out.advantages, ref_adv)
    assert_close_rel(out.returns, ref_ret)
    fixed = decoupled_gae(rewards, values, mask, lam_policy=0.9, lam_critic=1.0, coupled=True)
    assert_close_rel(fixed.returns, ref_gae(rewards, values, lengths, 1.0, [0.9] * batch)[1])


# ----------------------------------------------------------------------------------------------- group baselines
@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    groups=st.integers(1, 5),
    size=st.integers(1, 6),
    norm_by_std=st.booleans(),
    binary=st.booleans(),
)
def test_group_normalized_advantages_matches_reference(seed, groups, size, norm_by_std, binary):
    """Failure: group mean/std (unbiased), eps, broadcasting over tokens or group_ids handling is wrong."""
    gen = torch.Generator().manual_seed(seed)
    n = groups * size
    scores = torch.randint(0, 2, (n,), generator=gen).float() if binary else torch.randn(n, generator=gen)
    mask = torch.arange(7)[None, :] < torch.randint(0, 8, (n, 1), generator=gen)
    ids = [i // size for i in range(n)]
    ref = torch.tensor(ref_group_adv(scores.tolist(), ids, 1e-6, norm_by_std), dtype=torch.float64)
    expected = ref[:, None] * mask
    got = group_normalized_advantages(scores, mask, group_size=size, norm_by_std=norm_by_std)
    assert_close_rel(got, expected)
    perm = torch.randperm(n, generator=gen)  # arbitrary, non-consecutive ids give the same per-response result
    got_ids = group_normalized_advantages(
        scores[perm], mask[perm], group_ids=torch.tensor(ids)[perm] * 7 + 3, norm_by_std=norm_by_std
    )
    assert_close_rel(got_ids, expected[perm])


def test_uniform_group_mask_flags_all_equal_groups():
    """Failure: DAPO dynamic-sampling filter flags a group with signal or misses an all-equal group."""
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.5])
    got = uniform_group_mask(scores, group_ids=torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3]))
    assert got.tolist() == [True, True, True, False, False, True, True, True, True]
    four = torch.tensor([1.0, 0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    assert uniform_group_mask(four, group_size=4).tolist() == [False] * 4 + [True] * 4
    with pytest.raises(ValueError, match="groups of 4"):
        uniform_group_mask(scores, group_size=4)


def test_token_rewards_on_last_response_token():
    """Failure: the score is not placed on token L (index L-1), or empty responses get a reward."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    rewards = token_rewards_from_scores(torch.tensor([2.0, 3.0, 4.0, 5.0]), mask)
    expected = torch.tensor([[0, 0, 2.0, 0], [3.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 5.0]])
    torch.testing.assert_close(rewards, expected)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_advantages_matches_token_loop(shift_mean):
    """Failure: whitening uses padded positions, a per-row (not batch) statistic, or the biased variance."""
    from vapo_megatron.algorithms import whiten_advantages

    gen = torch.Generator().manual_seed(3)
    adv = torch.randn(5, 9, generator=gen, dtype=torch.float64) * 3 + 1
    mask = torch.arange(9)[None, :] < torch.tensor([[9], [1], [0], [4], [7]])
    vals = [adv[i, t].item() for i in range(5) for t in range(9) if mask[i, t]]
    mean = sum(vals) / len(vals)
    std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    expected = torch.zeros_like(adv)
    for i in range(5):
        for t in range(9):
            if mask[i, t]:
                expected[i, t] = ((adv[i, t] - mean) if shift_mean else adv[i, t]) / std
    torch.testing.assert_close(whiten_advantages(adv, mask, eps=0.0, shift_mean=shift_mean), expected)
    assert whiten_advantages(adv, torch.zeros_like(mask)).abs().sum() == 0
