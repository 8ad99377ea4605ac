"""The critic warm start's fitting part (no vLLM): Monte-Carlo targets, alignment and the prompt-level split;
and the tool's command line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from vapo_megatron.data.rl_batch import RLBatch
from vapo_megatron.models.tiny import save_tiny_hf_model
from vapo_megatron.train.warm_start import HFValueModel, WarmStartSettings, ev_mc_of, fit_critic, split_rows

ROOT = Path(__file__).resolve().parents[2]


def test_fit_learns_a_visible_signal(tmp_path):
    """Failure: the fit does not learn Monte-Carlo targets that the prompt determines (ev_mc on the fitted rows
    must rise from ~0 to clearly positive), i.e. the loss, targets or alignment of fit_critic are wrong."""
    save_tiny_hf_model(tmp_path / "model", "qwen2", seed=0)
    gen = torch.Generator().manual_seed(0)
    n, p, r = 32, 4, 6
    input_ids = torch.randint(3, 100, (n, p + r), generator=gen)
    scores = (input_ids[:, 0] % 2).float()  # the reward is visible in the first prompt token
    batch = RLBatch.from_tensors(input_ids, [p] * n, torch.ones(n, r), scores=scores)
    fit, held = split_rows(batch, 0.25, seed=0)
    assert len(held) == 8 and not set(fit.tolist()) & set(held.tolist())
    torch.manual_seed(0)
    model = HFValueModel(tmp_path / "model", seed=0)
    before = ev_mc_of(model, batch, fit)[0]
    losses = fit_critic(model, batch, fit, WarmStartSettings(steps=60, batch_size=16, lr=3e-3))
    after = ev_mc_of(model, batch, fit)[0]
    assert after > 0.5 and after > before + 0.3 and losses[-1] < losses[0], (before, after, losses[::10])


def test_cli_help():
    text = subprocess.run([sys.executable, str(ROOT / "tools" / "warm_start_critic.py"), "--help"],
                          capture_output=True, text=True, check=True, env={"PYTHONPATH": str(ROOT)}).stdout
    assert "--samples-per-prompt" in text and "--out" in text
