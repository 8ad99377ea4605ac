"""Losses and the aggregation registry against per-token loops written from docs/VAPO.md.

The references loop over sequences and tokens with 0-dim tensors and Python ``min``/``max``, so autograd gives
reference gradients too, with none of the vectorised masking or normalisation code.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vapo_megatron.algorithms import (
    aggregate_loss,
    entropy_loss,
    get_loss_agg,
    loss_agg_names,
    policy_loss,
    positive_lm_loss,
    register_loss_agg,
    truncated_is_weights,
    value_loss,
)
from vapo_megatron.algorithms import losses as losses_module

FAST = settings(max_examples=30, deadline=None)
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
NORM_LEN = 50


# ----------------------------------------------------------------------------------------------- references
def ref_aggregate(per_token: list[list[torch.Tensor]], agg: str, norm_len: float) -> torch.Tensor:
    """per_token[b] holds the loss of each valid token of sequence b (possibly empty)."""
    zero = torch.zeros((), dtype=torch.float64)
    non_empty = [seq for seq in per_token if seq]
    n_tokens = sum(len(seq) for seq in per_token)
    if agg == "token-mean":
        return sum((x for seq in per_token for x in seq), zero) / max(n_tokens, 1)
    if agg == "seq-mean-token-mean":
        return sum((sum(seq, zero) / len(seq) for seq in non_empty), zero) / max(len(non_empty), 1)
    if agg == "seq-mean-token-sum":
        return sum((sum(seq, zero) for seq in non_empty), zero) / max(len(non_empty), 1)
    if agg == "seq-mean-token-sum-norm":
        return sum((sum(seq, zero) / norm_len for seq in non_empty), zero) / max(len(non_empty), 1)
    raise AssertionError(agg)


def ref_policy_token(lp, old, adv, eps_low, eps_high, dual_clip):
    """-min(rho A, clip(rho, 1-eps_low, 1+eps_high) A), then for A < 0 capped at -c A (dual clip)."""
    rho = torch.exp(lp - old)
    clipped_rho = min(max(rho, torch.tensor(1 - eps_low, dtype=rho.dtype)), torch.tensor(1 + eps_high, dtype=rho.dtype))
    loss = -min(rho * adv, clipped_rho * adv)
    if dual_clip is not None and adv < 0:
        loss = min(loss, -dual_clip * adv)
    return loss, rho, clipped_rho


def random_inputs(seed: int, batch: int, length: int):
    """float64 log-probs (requiring grad), old log-probs near them, advantages, right-padded mask with 0/1/T lengths."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, length + 1, (batch,), generator=gen)
    lengths[0] = length
    if batch > 1:
        lengths[1] = min(1, length)
    if batch > 2:
        lengths[2] = 0
    mask = torch.arange(length)[None, :] < lengths[:, None]
    old = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    logprobs = (old + 0.4 * torch.randn(batch, length, generator=gen, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    return logprobs, old, adv, mask, lengths.tolist()


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=1e-5, atol=1e-7)


RAGGED_BATCH = dict(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 5), length=st.integers(0, 12),
                    agg=st.sampled_from(AGGS))
"""The random ragged batches (and aggregation mode) every reference test draws."""


# ----------------------------------------------------------------------------------------------- policy
@FAST
@given(
    **RAGGED_BATCH,
    dual_clip=st.sampled_from([None, 3.0]),
)
def test_policy_loss_matches_reference(seed, batch, length, agg, dual_clip):
    """Failure: clip-higher surrogate, dual clip, aggregation or their gradients differ from the formula."""
    logprobs, old, adv, mask, lengths = random_inputs(seed, batch, length)
    loss, metrics = policy_loss(
        logprobs, old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=dual_clip, agg=agg, norm_len=NORM_LEN
    )
    (grad,) = torch.autograd.grad(loss, logprobs)

    per_token, low, high, kl, ratio_sum = [], 0, 0, 0.0, 0.0
    for b, n in enumerate(lengths):
        row = []
        for t in range(n):
            tok, rho, clipped_rho = ref_policy_token(logprobs[b, t], old[b, t], adv[b, t], 0.2, 0.28, dual_clip)
            row.append(tok)
            clip_chosen = -clipped_rho * adv[b, t] > -rho * adv[b, t]
            low += int(bool(clip_chosen and rho < 0.8))
            high += int(bool(clip_chosen and rho > 1.28))
            kl += float((rho - 1 - torch.log(rho)).detach())
            ratio_sum += float(rho.detach())
        per_token.append(row)
    ref_loss = ref_aggregate(per_token, agg, NORM_LEN)
    n_tok = max(sum(lengths), 1)
    assert_close(loss, ref_loss)
    if ref_loss.requires_grad:
        (ref_grad,) = torch.autograd.grad(ref_loss, logprobs)
        assert_close(grad, ref_grad)
    else:
        assert (grad == 0).all()
    assert_close(metrics["clip_frac_low"], torch.tensor(low / n_tok))
    assert_close(metrics["clip_frac_high"], torch.tensor(high / n_tok))
    assert_close(metrics["approx_kl"], torch.tensor(kl / n_tok))
    assert_close(metrics["ratio_mean"], torch.tensor(ratio_sum / n_tok))
    assert_close(metrics["pg_loss"], ref_loss)
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


def test_policy_clip_fractions_on_hand_cases():
    """Failure: clip_frac_low/high count the wrong side, count inactive clips, or use the wrong epsilon."""
    ratios = torch.tensor([[0.7, 0.7, 1.25, 1.35, 1.35, 1.0]], dtype=torch.float64)
    adv = torch.tensor([[-1.0, 1.0, 1.0, 1.0, -1.0, 1.0]], dtype=torch.float64)
    # lower clip active only for (0.7, A<0); upper clip only for (1.35, A>0); 1.25 is inside [0.8, 1.28].
    mask = torch.ones_like(adv, dtype=torch.bool)
    _, m = policy_loss(ratios.log(), torch.zeros_like(adv), adv, mask)
    assert m["clip_frac_low"].item() == pytest.approx(1 / 6)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 6)


def test_policy_loss_tolerates_garbage_padding_and_rejects_bad_dual_clip():
    """Failure: non-finite values at padding leak into loss/metrics, or dual_clip <= 1 is accepted."""
    logprobs, old, adv, mask, _ = random_inputs(1, 4, 6)
    with torch.no_grad():
        old[~mask] = -1e9
        adv[~mask] = math.inf
    loss, metrics = policy_loss(logprobs, old, adv, mask)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logprobs, old, adv, mask, dual_clip=1.0)


# ----------------------------------------------------------------------------------------------- TIS
@FAST
@given(
    **RAGGED_BATCH,
    cap=st.sampled_from([1.0, 1.5, 3.0]),
)
def test_truncated_is_weighted_policy_loss_matches_reference(seed, batch, length, agg, cap):
    """Failure: the TIS weight min(p_old / p_rollout, cap) is computed, capped, applied (after clipping, as a
    constant) or counted in its metrics differently from the per-token formula."""
    logprobs, old, adv, mask, lengths = random_inputs(seed, batch, length)
    gen = torch.Generator().manual_seed(seed + 1)
    rollout = old + 0.5 * torch.randn(old.shape, generator=gen, dtype=torch.float64)  # some ratios above cap
    weights, tis = truncated_is_weights(old, rollout, mask, cap=cap)
    loss, metrics = policy_loss(logprobs, old, adv, mask, is_weights=weights, agg=agg, norm_len=NORM_LEN)
    (grad,) = torch.autograd.grad(loss, logprobs)

    per_token, ratio_sum, capped = [], 0.0, 0
    for b, n in enumerate(lengths):
        row = []
        for t in range(n):
            is_ratio = math.exp(float(old[b, t]) - float(rollout[b, t]))
            ratio_sum += is_ratio
            capped += int(is_ratio > cap)
            tok, _, _ = ref_policy_token(logprobs[b, t], old[b, t], adv[b, t], 0.2, 0.28, None)
            row.append(tok * min(is_ratio, cap))
        per_token.append(row)
    ref_loss = ref_aggregate(per_token, agg, NORM_LEN)
    n_tok = max(sum(lengths), 1)
    assert_close(loss, ref_loss)
    if ref_loss.requires_grad:
        (ref_grad,) = torch.autograd.grad(ref_loss, logprobs)
        assert_close(grad, ref_grad)
    assert_close(tis["tis_ratio_mean"], torch.tensor(ratio_sum / n_tok))
    assert_close(tis["tis_capped_frac"], torch.tensor(capped / n_tok))
    assert not weights.requires_grad and (weights[~mask] == 1).all()


def test_truncated_is_weights_are_constants_and_cap_is_checked():
    """Failure: gradient flows into the weights through old/rollout log-probs, garbage padding makes them
    non-finite, or a cap below 1 (which would down-weight on-policy tokens) is accepted."""
    old = torch.tensor([[-1.0, -2.0, 5.0]], requires_grad=True)
    rollout = torch.tensor([[-1.5, -1.0, -1e9]])
    mask = torch.tensor([[1, 1, 0]])
    weights, m = truncated_is_weights(old, rollout, mask, cap=1.2)
    torch.testing.assert_close(weights, torch.tensor([[1.2, math.exp(-1.0), 1.0]]))
    assert not weights.requires_grad and m["tis_capped_frac"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="TIS cap must be >= 1, got 0.5"):
        truncated_is_weights(old, rollout, mask, cap=0.5)


# ----------------------------------------------------------------------------------------------- value
@FAST
@given(
    **RAGGED_BATCH,
    clip=st.sampled_from([None, 0.2]),
)
def test_value_loss_matches_reference(seed, batch, length, agg, clip):
    """Failure: 0.5 (V - G)^2, value clipping (max of clipped/unclipped), its gradient or metrics are wrong."""
    _, old, returns, mask, lengths = random_inputs(seed, batch, length)
    values = old + 0.3 * torch.randn(old.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    values.requires_grad_()
    loss, metrics = value_loss(values, old, returns, mask, clip=clip, agg=agg, norm_len=NORM_LEN)
    (grad,) = torch.autograd.grad(loss, values)
    per_token, clipped, v_sum = [], 0, 0.0
    for b, n in enumerate(lengths):
        row = []
        for t in range(n):
            v, g = values[b, t], returns[b, t]
            tok = 0.5 * (v - g) ** 2
            if clip is not None:
                v_clip = old[b, t] + min(max(v - old[b, t], torch.tensor(-clip)), torch.tensor(clip))
                tok_clip = 0.5 * (v_clip - g) ** 2
                clipped += int(bool(tok_clip > tok))
                tok = max(tok, tok_clip)
            row.append(tok)
            v_sum += float(v.detach())
        per_token.append(row)
    ref_loss = ref_aggregate(per_token, agg, NORM_LEN)
    n_tok = max(sum(lengths), 1)
    assert_close(loss, ref_loss)
    if ref_loss.requires_grad:
        assert_close(grad, torch.autograd.grad(ref_loss, values)[0])
    assert_close(metrics["value_loss"], ref_loss)
    assert_close(metrics["value_clip_frac"], torch.tensor(clipped / n_tok))
    assert_close(metrics["value_mean"], torch.tensor(v_sum / n_tok))


def test_value_clip_needs_old_values():
    """Failure: clipping without old values silently falls back to an unclipped loss."""
    v = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="old_values"):
        value_loss(v, None, v, torch.ones(1, 2), clip=0.2)


# ----------------------------------------------------------------------------------------------- NLL, entropy
@FAST
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 5), length=st.integers(0, 12))
def test_positive_lm_loss_matches_reference(seed, batch, length):
    """Failure: NLL includes incorrect responses, uses the wrong normaliser, or breaks with no correct tokens."""
    logprobs, _, _, mask, lengths = random_inputs(seed, batch, length)
    is_correct = torch.rand(batch, generator=torch.Generator().manual_seed(seed + 1)) < 0.5
    loss, metrics = positive_lm_loss(logprobs, mask, is_correct)
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b, n in enumerate(lengths):
        if bool(is_correct[b]):
            for t in range(n):
                total = total - logprobs[b, t]
                count += 1
    ref = total / count if count else total
    assert_close(loss, ref)
    assert_close(metrics["nll_loss"], ref)
    assert loss.requires_grad  # zero loss stays in the graph (every rank must run the same backward)
    if count:
        assert_close(torch.autograd.grad(loss, logprobs)[0], torch.autograd.grad(ref, logprobs)[0])


def test_positive_lm_loss_global_normaliser_and_empty():
    """Failure: an explicit global_correct_tokens is ignored, or no correct tokens gives NaN."""
    logprobs = torch.full((2, 3), -2.0)
    mask = torch.ones(2, 3)
    loss, _ = positive_lm_loss(logprobs, mask, torch.tensor([True, False]), global_correct_tokens=12)
    assert loss.item() == pytest.approx(6.0 / 12)
    loss, _ = positive_lm_loss(logprobs, mask, torch.tensor([False, False]), global_correct_tokens=0)
    assert loss.item() == 0.0


@pytest.mark.parametrize("agg", AGGS)
def test_entropy_loss_is_aggregated_entropy(agg):
    """Failure: entropy aggregation differs from the reference or the metric is not the aggregated entropy."""
    ent, _, _, mask, lengths = random_inputs(7, 5, 9)
    loss, metrics = entropy_loss(ent, mask, agg=agg, norm_len=NORM_LEN)
    ref = ref_aggregate([[ent[b, t] for t in range(n)] for b, n in enumerate(lengths)], agg, NORM_LEN)
    assert_close(loss, ref)
    assert_close(metrics["entropy"], ref)


# ----------------------------------------------------------------------------------------------- registry
def test_registry_lists_modes_and_rejects_typos():
    """Failure: a required aggregation mode is missing, or a typo gives an error without the valid names."""
    assert set(AGGS) <= set(loss_agg_names())
    with pytest.raises(ValueError) as info:
        get_loss_agg("token_mean")
    assert "token_mean" in str(info.value)
    for name in AGGS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), agg="seq-mean")


def test_registry_duplicate_raises_and_new_mode_is_usable(monkeypatch):
    """Failure: a duplicate name silently replaces a mode, or a newly registered mode is not reachable by name."""
    monkeypatch.setattr(losses_module, "_LOSS_AGGS", dict(losses_module._LOSS_AGGS))
    with pytest.raises(ValueError, match="already registered"):
        register_loss_agg("token-mean")(lambda loss, mask, **_: loss.sum())

    @register_loss_agg("token-max")
    def _token_max(loss, mask, *, global_tokens, global_seqs, norm_len):
        return torch.where(mask.bool(), loss, -math.inf).max()

    x = torch.tensor([[1.0, 5.0, 9.0]])
    assert aggregate_loss(x, torch.tensor([[1, 1, 0]]), "token-max").item() == 5.0
    assert "token-max" in loss_agg_names()


def test_seq_mean_token_sum_norm_requires_positive_length():
    """Failure: a zero norm_len divides by zero instead of raising."""
    with pytest.raises(ValueError, match="norm_len"):
        aggregate_loss(torch.ones(1, 2), torch.ones(1, 2), "seq-mean-token-sum-norm", norm_len=0)
