"""Issue 25 item 2: the critic's targets blended with Monte-Carlo step values (`algorithm.mc_critic_weight`),
against a per-token loop, in value pretraining (lambda = 1 returns) and PPO (lam_critic returns); the config's
refusals are in test_config.py. A failure pinpoints Trainer.advantages' target blend or the config validation."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vapo_megatron.config import load_config
from vapo_megatron.testing.engines import synthetic_rl_batch
from vapo_megatron.train.monte_carlo import StepMC


def _reference_targets(scores, mask, mc_values, w, lam, values):
    """Per token: w * V_mc(token's step) + (1 - w) * the lambda-return (gamma 1, reward at the last token)."""
    n, width = mask.shape
    out = torch.zeros(n, width, dtype=torch.float64)
    for i in range(n):
        length = int(mask[i].sum())
        g = 0.0
        for t in reversed(range(length)):  # G_t = r_t + (1 - lam) V_{t+1} + lam G_{t+1}, V_T = 0
            r = float(scores[i]) if t == length - 1 else 0.0
            v_next = float(values[i, t + 1]) if t + 1 < length else 0.0
            g = r + (1 - lam) * v_next + lam * (g if t + 1 < length else 0.0)
            out[i, t] = w * float(mc_values[i, t]) + (1 - w) * g
    return out


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_critic_targets_blend_monte_carlo_values(weight):
    cfg = load_config(None, [f"algorithm.mc_critic_weight={weight}", "algorithm.lam_critic=0.9",
                             "mc.step_delimiter=null", "mc.step_tokens=4"])
    batch = synthetic_rl_batch(6, 64, seed=3)
    batch.scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    g = torch.Generator().manual_seed(1)
    batch.old_values = torch.rand(batch.resp_mask.shape, generator=g) * batch.resp_mask
    mc = torch.rand(batch.resp_mask.shape, generator=g) * batch.resp_mask
    trainer = SimpleNamespace(cfg=cfg, critic_ready=True, _mc_step=StepMC(values=mc, next_values=mc))
    mask = batch.resp_mask
    for phase, lam in (("value_pretrain", 1.0), ("ppo", 0.9)):
        from vapo_megatron.train.loop import Trainer

        Trainer.advantages(trainer, batch, phase)
        want = _reference_targets(batch.scores, mask, mc, weight, lam, batch.old_values)
        torch.testing.assert_close((batch.returns * mask).double(), want, atol=1e-5, rtol=1e-5)
