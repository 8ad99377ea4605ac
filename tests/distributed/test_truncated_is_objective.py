"""Truncated importance sampling (`algorithm.tis_cap`) through the path the trainer uses: an `RLBatch` with vLLM's
`rollout_logprobs` -> its micro-batch -> `actor_objective` on vocabulary-parallel logits (TP=2 over 2 gloo ranks,
one spawned run for every case). The loss and its gradient on the logits are checked against a per-token loop
written from the formulas (clip-higher PPO term weighted by min(p_old / p_rollout, cap), unweighted NLL), on a
batch where vLLM's log-probs differ from the trainer's. A failure pinpoints the plumbing: the switch ignored, the
rollout log-probs not carried by the micro-batch, or the weight applied to the wrong term."""
from __future__ import annotations

import math

import pytest
import torch

from vapo_megatron.config import AlgorithmConfig
from vapo_megatron.data.rl_batch import build_rl_batch
from vapo_megatron.testing.dist import run_distributed

pytestmark = pytest.mark.distributed
VOCAB, TP = 11, 2  # odd vocabulary: the last shard carries a padding entry
CAPS = (None, 1.0, 1.5, 4.0)  # None: the paper's loss


def _batch(seed: int):
    """Four responses of lengths 3, 1, 5, 2 to two prompts, trainer and vLLM log-probs that disagree."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [[1, 2, 3], [4, 5]]
    lengths = [3, 1, 5, 2]
    responses = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    rollout = [(-torch.rand(n, generator=gen) * 2).tolist() for n in lengths]
    batch = build_rl_batch(prompts, torch.tensor([0, 0, 1, 1]), responses, rollout, pad_to_multiple=4)
    mask = batch.resp_mask
    batch.old_logprobs = (batch.rollout_logprobs + 0.6 * torch.randn(mask.shape, generator=gen)) * mask
    batch.advantages = torch.randn(mask.shape, generator=gen) * mask
    batch.is_correct = torch.tensor([True, False, True, False])
    logits = torch.randn(batch.n, batch.input_ids.shape[1], VOCAB, generator=gen, dtype=torch.float32)
    return batch, logits.requires_grad_()


def _reference(batch, logits, alg: AlgorithmConfig) -> torch.Tensor:
    """sum over tokens of w * PPO(token) / tokens + mu * (-sum over correct tokens of log p) / correct tokens."""
    pg, nll, n_tok, n_correct = 0.0, 0.0, 0, 0
    for i in range(batch.n):
        p = int(batch.prompt_lens[i])
        for j in range(int(batch.lengths[i])):
            logp = torch.log_softmax(logits[i, p - 1 + j].double(), -1)[batch.input_ids[i, p + j]]
            old, rollout = float(batch.old_logprobs[i, j]), float(batch.rollout_logprobs[i, j])
            adv = float(batch.advantages[i, j])
            rho = torch.exp(logp - old)
            surrogate = -torch.minimum(rho * adv, rho.clamp(1 - alg.eps_low, 1 + alg.eps_high) * adv)
            weight = 1.0 if alg.tis_cap is None else min(math.exp(old - rollout), alg.tis_cap)
            pg, n_tok = pg + weight * surrogate, n_tok + 1
            if batch.is_correct[i]:
                nll, n_correct = nll - logp, n_correct + 1
    return pg / n_tok + alg.positive_lm_coef * nll / n_correct


def _actor_loss_body():
    """Each rank: the actor loss of the whole batch on its vocabulary shard of the logits, for every cap."""
    import torch.distributed as dist

    from vapo_megatron.engine.objectives import actor_objective, minibatch_counts

    rank, out = dist.get_rank(), []
    batch, logits = _batch(seed=0)
    per = -(-VOCAB // TP)
    padded = torch.nn.functional.pad(logits.detach(), (0, per * TP - VOCAB))
    mb = batch.micro_batch(slice(None)).replace(tp_group=dist.group.WORLD)
    for cap in CAPS:
        shard = padded[..., rank * per:(rank + 1) * per].clone().requires_grad_(True)
        loss, metrics = actor_objective(AlgorithmConfig(tis_cap=cap), minibatch_counts(batch), VOCAB)(shard, mb)
        loss.backward()
        out.append((loss.detach(), shard.grad, {k: v.item() for k, v in metrics.items()}))
    return out


def test_actor_loss_applies_truncated_is_from_rollout_logprobs():
    """Failure: `algorithm.tis_cap` does not weight the PPO term by min(p_old / p_rollout, cap) as the reference
    does (loss or gradient), the micro-batch does not carry vLLM's log-probs, or with the switch off (the paper's
    loss) the rollout log-probs still change anything."""
    results = run_distributed(_actor_loss_body, TP)
    batch, logits = _batch(seed=0)
    ratio = torch.exp(batch.old_logprobs - batch.rollout_logprobs)[batch.resp_mask.bool()]
    per = -(-VOCAB // TP)
    (plain_grad,) = torch.autograd.grad(_reference(batch, logits, AlgorithmConfig()), logits)
    for i, cap in enumerate(CAPS):
        ref = _reference(batch, logits, AlgorithmConfig(tis_cap=cap))
        (ref_grad,) = torch.autograd.grad(ref, logits)
        # The batch is one where the switch matters: ignoring it gives the unweighted gradient, which differs.
        assert cap is None or (ref_grad - plain_grad).abs().max() > 0.05 * plain_grad.abs().max()
        ref_grad = torch.nn.functional.pad(ref_grad.double(), (0, per * TP - VOCAB))
        for rank, per_cap in enumerate(results):
            loss, grad, metrics = per_cap[i]
            torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grad.double(), ref_grad[..., rank * per:(rank + 1) * per], rtol=1e-4,
                                       atol=1e-6)
            if cap is None:
                assert not any(k.startswith("tis_") for k in metrics)
                continue
            assert metrics["tis_ratio_mean"] == pytest.approx(ratio.mean().item(), rel=1e-5)
            assert metrics["tis_capped_frac"] == pytest.approx((ratio > cap).float().mean().item())
