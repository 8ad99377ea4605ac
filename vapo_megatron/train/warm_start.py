"""Critic warm start, standing in for the paper's reward-model initialisation: sample responses of the initial
policy for the training prompts (vLLM), score them with the configured verifier, fit a critic (the policy's trunk
plus a fresh scalar ``score`` head, plain PyTorch on the HF model) on Monte-Carlo targets, and write it as a HF
directory that ``model.critic_hf_dir`` loads (train/build.py critic_hf_get reads its ``score`` head).

Departure from the paper: VAPO initialises the critic from a reward model and then pretrains it on the policy's
samples; here the warm start itself is that value pretraining, done offline on more samples than a few trainer
steps see. Same alignment as the trainer: the value of response token t is read at position prompt_len - 1 + t
(the state before the token), the target is the final reward on every response token (gamma = 1, lam = 1), the
loss 0.5 (V - G)^2 averaged over tokens. ev_mc is reported on the fitted prompts and on held-out prompts (whose
responses the fit never saw)."""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vapo_megatron.algorithms import explained_variance_mc, masked_mean, monte_carlo_returns
from vapo_megatron.data.rl_batch import RLBatch

"""An RL batch, or a dict with the fields read (`input_ids`, `seq_lens`, `resp_pos`, `resp_mask`, `scores`,
`prompt_index`)."""

WEIGHTS_FILE = "model.safetensors"
REPORT_FILE = "warm_start.json"


@dataclass(frozen=True)
class WarmStartSettings:
    """What the tool samples and how it fits."""

    samples_per_prompt: int = 8
    """Responses sampled per prompt."""
    max_prompts: int = 256
    """Training prompts used (the first ones of data.train_files)."""
    held_out_fraction: float = 0.2
    """Fraction of those prompts (with all their responses) kept out of the fit to measure ev_mc honestly."""
    steps: int = 300
    """Adam steps of the fit."""
    batch_size: int = 32
    """Responses per Adam step."""
    lr: float = 1e-3
    """Adam learning rate (trunk and head)."""
    seed: int = 0
    """Sampling, split and initialisation seed."""


class HFValueModel(torch.nn.Module):
    """A HF causal LM's trunk (``AutoModel``: embeddings, decoder, final norm) plus ``score``: Linear(hidden, 1,
    no bias), the layout of HF's ``score`` head and of the Megatron critic's value head."""

    def __init__(self, hf_dir: str | Path, seed: int = 0) -> None:
        from transformers import AutoModel

        super().__init__()
        self.trunk = AutoModel.from_pretrained(str(hf_dir), dtype=torch.float32)
        hidden, std = self.trunk.config.hidden_size, self.trunk.config.initializer_range
        self.score = torch.nn.Linear(hidden, 1, bias=False)
        with torch.no_grad():
            self.score.weight.copy_(torch.randn(1, hidden, generator=torch.Generator().manual_seed(seed)) * std)

    def forward(self, input_ids: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """Values [B, S] of right-padded rows (``seq_lens`` real tokens each)."""
        attention_mask = (torch.arange(input_ids.shape[1])[None, :] < seq_lens[:, None]).long()
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.score(hidden).squeeze(-1).float()

    def response_values(self, batch: RLBatch, rows: torch.Tensor) -> torch.Tensor:
        """V(s_t) [len(rows), R] of the response tokens of ``rows`` of an RL batch."""
        values = self(batch.input_ids[rows], batch.seq_lens[rows])
        return values.gather(1, batch.response_positions(rows, values.shape[1]))


def sample_scored_batch(cfg: Any, settings: WarmStartSettings) -> RLBatch:
    """Responses of the initial policy (cfg.model.hf_dir) for the first training prompts, scored by the
    configured reward (with DAPO's overlong penalty when configured, as in training): an RL batch with
    ``scores`` and ``prompt_index``. Single process."""
    from transformers import AutoTokenizer

    from vapo_megatron.data.datasets import PromptDataset
    from vapo_megatron.data.rl_batch import build_rl_batch
    from vapo_megatron.rewards import RewardItem, RewardManager, apply_overlong_penalty
    from vapo_megatron.rollout.sampler import SamplingConfig
    from vapo_megatron.rollout.vllm_engine import RolloutEngine

    r, alg = cfg.rollout, cfg.algorithm
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_dir)
    prompts = list(PromptDataset.from_files(cfg.data.train_files, tokenizer, r.max_prompt_length))
    prompts = prompts[:settings.max_prompts]
    engine = RolloutEngine(cfg.model.hf_dir, seed=settings.seed, max_model_len=r.max_prompt_length +
                           r.max_response_length, cpu_kv_cache_bytes=r.cpu_kv_cache_bytes)
    try:
        out = engine.generate([p.input_ids for p in prompts], SamplingConfig(
            n=settings.samples_per_prompt, max_tokens=r.max_response_length, seed=settings.seed))
    finally:
        engine.shutdown()
    texts = tokenizer.batch_decode(out.response_ids, skip_special_tokens=True)
    items = [RewardItem(response=t, ground_truth=prompts[int(p)].record.ground_truth, prompt=prompts[int(p)].text,
                        data_source=prompts[int(p)].record.data_source) for t, p in zip(texts, out.prompt_index)]
    with RewardManager(cfg.reward.name, timeout_s=cfg.reward.timeout_s, num_workers=cfg.reward.num_workers,
                       reward_kwargs=dict(correct_score=alg.reward_correct,
                                          incorrect_score=alg.reward_incorrect)) as manager:
        scores = torch.tensor(manager.score(items).scores, dtype=torch.float32)
    batch = build_rl_batch([p.input_ids for p in prompts], out.prompt_index, out.response_ids,
                           out.rollout_logprobs, pad_to_multiple=8, pad_id=tokenizer.pad_token_id or 0)
    if alg.overlong_buffer > 0:
        scores = torch.as_tensor(apply_overlong_penalty(scores, batch.lengths, max_length=r.max_response_length,
                                                        buffer=alg.overlong_buffer,
                                                        penalty_factor=alg.overlong_penalty), dtype=torch.float32)
    batch.scores = scores
    return batch


def split_rows(batch: RLBatch, held_out_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (fit, held out), split by prompt: all responses of a held-out prompt stay out of the fit."""
    prompts = batch.prompt_index.unique()
    order = prompts[torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))]
    held = order[:int(round(held_out_fraction * len(prompts)))]
    is_held = torch.isin(batch.prompt_index, held)
    return (~is_held).nonzero().squeeze(1), is_held.nonzero().squeeze(1)


@torch.no_grad()
def ev_mc_of(model: HFValueModel, batch: RLBatch, rows: torch.Tensor, chunk: int = 64) -> tuple[float, torch.Tensor]:
    """ev_mc of the model on ``rows`` and the values it gives them ([len(rows), R])."""
    if len(rows) == 0:
        return float("nan"), torch.zeros(0, batch.resp_mask.shape[1])
    values = torch.cat([model.response_values(batch, rows[i:i + chunk]) for i in range(0, len(rows), chunk)])
    ev = explained_variance_mc(values, batch.scores[rows], batch.resp_mask[rows]).item()
    return ev, values


def fit_critic(model: HFValueModel, batch: RLBatch, rows: torch.Tensor, settings: WarmStartSettings,
               log: Callable[[str], None] = print) -> list[float]:
    """Adam on 0.5 (V - G)^2 (token mean) over random mini-batches of ``rows``; returns the loss of every step
    and logs the mean loss of every 50 steps."""
    gen = torch.Generator().manual_seed(settings.seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    losses = []
    model.train()
    t0 = time.time()
    for step in range(settings.steps):
        idx = rows[torch.randint(len(rows), (min(settings.batch_size, len(rows)),), generator=gen)]
        mask = batch.resp_mask[idx]
        target = monte_carlo_returns(batch.scores[idx], mask).float()
        loss = 0.5 * masked_mean((model.response_values(batch, idx) - target) ** 2, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == settings.steps:
            recent = losses[-50:]
            log(f"[warm start critic] step {step + 1}/{settings.steps} loss {sum(recent) / len(recent):.4f} "
                f"({time.time() - t0:.0f}s)")
    model.eval()
    return losses


def save_hf_critic(model: HFValueModel, base_hf_dir: str | Path, out_dir: str | Path, report: dict) -> Path:
    """``out_dir``: the base model's config and tokenizer files, the fitted trunk under HF causal-LM names
    (``model.*``) plus ``score.weight`` [1, hidden] in one safetensors file, and ``warm_start.json``."""
    from safetensors.torch import save_file

    base, out = Path(base_hf_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path in base.iterdir():
        if path.is_file() and not path.name.endswith((".safetensors", ".bin", ".index.json", ".pt")):
            shutil.copy2(path, out / path.name)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.trunk.state_dict().items()}
    tensors["score.weight"] = model.score.weight.detach().contiguous()
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1))
    return out


@dataclass
class WarmStartResult:
    """The report (also in ``out_dir/warm_start.json``), the fitted model and the scored batch it saw."""

    report: dict
    model: HFValueModel
    batch: RLBatch


def warm_start_critic(cfg: Any, settings: WarmStartSettings, out_dir: str | Path) -> WarmStartResult:
    """Sample, score, fit and write the critic."""
    batch = sample_scored_batch(cfg, settings)
    fit_rows, held_rows = split_rows(batch, settings.held_out_fraction, settings.seed)
    model = HFValueModel(cfg.model.hf_dir, seed=settings.seed)
    before = ev_mc_of(model, batch, held_rows)[0]
    accuracy = (batch.scores >= cfg.algorithm.reward_correct).float().mean().item()
    print(f"[warm start critic] {len(batch.scores)} responses, accuracy {accuracy:.3f}; fitting on "
          f"{len(fit_rows)}, held-out ev_mc before {before:.3f}", flush=True)
    losses = fit_critic(model, batch, fit_rows, settings)
    report = {"settings": settings.__dict__, "responses": len(batch.scores), "fit_responses": len(fit_rows),
              "held_out_responses": len(held_rows), "accuracy": accuracy, "ev_mc_held_out_before": before,
              "ev_mc_fit": ev_mc_of(model, batch, fit_rows)[0], "ev_mc_held_out": ev_mc_of(model, batch, held_rows)[0],
              "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}
    save_hf_critic(model, cfg.model.hf_dir, out_dir, report)
    return WarmStartResult(report, model, batch)
