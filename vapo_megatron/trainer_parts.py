"""The pieces the training loop calls: building the engines, scoring rollouts, metrics and logging."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vapo_megatron.algorithms import (
    count_correct_tokens,
    count_seqs,
    count_tokens,
    explained_variance,
    explained_variance_mc,
    masked_mean,
)
from vapo_megatron.config import (
    AlgorithmConfig,
    EvalConfig,
    OptimConfig,
    RewardConfig,
    VapoConfig,
    dump_yaml,
    save_config,
)
from vapo_megatron.credit import credit_metrics
from vapo_megatron.data.rl_batch import RLBatch, build_rl_batch
from vapo_megatron.timing import StepTimer


@dataclass
class Parts:
    rollout_engine: Any
    actor: Any
    critic: Any
    arch: Any
    tokenizer: Any
    loader: Any
    val: Any
    rewards: Any
    layouts: Any


def _critic_hf_get(cfg: VapoConfig, arch) -> Callable[[str], torch.Tensor]:
    """Critic init, as an HF tensor getter: trunk from critic_hf_dir (or the policy's); value head from its HF
    `score` head when present, else N(0, initializer_range) from the run seed (the paper starts from a reward
    model instead)."""
    from vapo_megatron.convert.hf_io import HFCheckpointReader

    reader = HFCheckpointReader(cfg.model.critic_hf_dir or cfg.model.hf_dir)

    def get(name: str) -> torch.Tensor:
        if name == "score.weight" and name not in reader:
            gen = torch.Generator().manual_seed(cfg.train.seed + 17)
            return torch.randn(1, arch.hidden_size, generator=gen) * arch.init_std
        return reader.get(name)

    return get


def engine_kwargs(cfg: VapoConfig, optim: OptimConfig) -> dict[str, Any]:
    """ModelEngine's optimizer and batching arguments for one role (every OptimConfig field is used)."""
    return dict(lr=optim.lr, weight_decay=optim.weight_decay, clip_grad=optim.clip_grad,
                adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, warmup_steps=optim.warmup_steps,
                use_distributed_optimizer=optim.use_distributed_optimizer,
                params_dtype=torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32,
                micro_batch_size=cfg.train.micro_batch_size, micro_batch_tokens=cfg.train.micro_batch_tokens,
                pack_sequences=cfg.train.pack_sequences, recompute=cfg.train.recompute,
                recompute_num_layers=cfg.train.recompute_num_layers)


def build_engines(cfg: VapoConfig) -> Parts:
    from transformers import AutoTokenizer

    from vapo_megatron.convert.hf_io import HFCheckpointReader
    from vapo_megatron.data.datasets import PromptDataset, PromptLoader
    from vapo_megatron.engine.model_engine import ModelEngine
    from vapo_megatron.models.hf_config import load_arch
    from vapo_megatron.parallel.layout import RoleLayouts
    from vapo_megatron.rewards import RewardManager
    from vapo_megatron.rollout.vllm_engine import RolloutEngine

    r, alg, seed = cfg.rollout, cfg.algorithm, cfg.train.seed
    # vLLM first: building it is collective over all ranks and re-seeds the global generators.
    engine = RolloutEngine(cfg.model.hf_dir, tensor_parallel_size=r.vllm_tensor_parallel, seed=seed,
                           max_model_len=r.max_prompt_length + r.max_response_length,
                           cpu_kv_cache_bytes=r.cpu_kv_cache_bytes)
    torch.manual_seed(seed)
    arch = load_arch(cfg.model.hf_dir)
    layouts = RoleLayouts(cfg.policy_parallel, cfg.critic_parallel, seed=1234 + seed)

    def make(role, parallel, hf_get, optim, **extra):
        # weights stream into each rank's own shard, one parameter at a time: no rank holds the whole model
        return ModelEngine(role, arch, parallel, layouts, hf_get=hf_get, **engine_kwargs(cfg, optim), **extra)

    actor = make("policy", cfg.policy_parallel, HFCheckpointReader(cfg.model.hf_dir).get, cfg.actor_optim,
                 routing_replay=alg.routing_replay)
    critic = make("critic", cfg.critic_parallel, _critic_hf_get(cfg, arch), cfg.critic_optim) \
        if alg.use_critic else None
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_dir)
    fmt = cfg.data.prompt_format
    train_set = PromptDataset.from_files(cfg.data.train_files, tokenizer, r.max_prompt_length, prompt_format=fmt)
    val_set = PromptDataset.from_files(cfg.data.val_files, tokenizer, r.max_prompt_length, prompt_format=fmt) \
        if cfg.data.val_files else None
    loader = PromptLoader(train_set, r.num_prompts, seed=seed, shuffle=cfg.data.shuffle)
    rewards = None
    if dist.get_rank() == 0:
        rewards = RewardManager(cfg.reward.name, timeout_s=cfg.reward.timeout_s, num_workers=cfg.reward.num_workers,
                                reward_kwargs=dict(correct_score=alg.reward_correct,
                                                   incorrect_score=alg.reward_incorrect))
    return Parts(engine, actor, critic, arch, tokenizer, loader, val_set, rewards, layouts)


def _score(tokenizer: Any, rewards: Any, max_failed_fraction: float, prompts: Sequence[Any], out: Any, *,
           with_spans: bool = True) -> tuple[torch.Tensor, dict[str, int], list | None]:
    """Rewards on rank 0 (its reward workers, `rewards`; None elsewhere), broadcast to every rank, with each
    response's first-wrong-step token span when `with_spans` (None where the reward gives none; validation skips
    the mapping); every rank raises RewardFailureError when more than `max_failed_fraction` of the rewards
    failed."""
    from vapo_megatron.credit import error_token_spans
    from vapo_megatron.errors import RewardFailureError
    from vapo_megatron.rewards import RewardItem, systematic_failure

    payload = [None]
    if dist.get_rank() == 0:
        texts = tokenizer.batch_decode(out.response_ids, skip_special_tokens=True)
        items = [RewardItem(response=txt, ground_truth=prompts[int(p)].record.ground_truth,
                            prompt=prompts[int(p)].text, data_source=prompts[int(p)].record.data_source,
                            extra=prompts[int(p)].record.metadata)
                 for txt, p in zip(texts, out.prompt_index)]
        res = rewards.score(items, max_failed=int(max_failed_fraction * len(items)))  # issue 23: stop at the limit
        fatal = systematic_failure(res.stats, max_failed_fraction)
        spans = error_token_spans(tokenizer, out.response_ids, texts, res.extras) if with_spans and not fatal \
            else None
        payload = [(res.scores, res.stats.num_errors, res.stats.num_timeouts, fatal, spans)]
    dist.broadcast_object_list(payload, src=0)
    scores, errors, timeouts, fatal, spans = payload[0]
    if fatal:  # every rank stops, with the same message
        raise RewardFailureError(fatal)
    return torch.tensor(scores, dtype=torch.float32), {"reward_errors": errors, "reward_timeouts": timeouts}, spans


@dataclass(frozen=True)
class Scoring:
    """What scoring a rollout needs besides the engine and the prompts: the tokenizer, rank 0's reward manager
    (None on other ranks) and the config pieces it reads."""

    tokenizer: Any
    rewards: Any
    reward: RewardConfig
    algorithm: AlgorithmConfig
    max_response_length: int


def score_rollout(rollout_engine: Any, prompts: Sequence[Any], params: Any, scoring: Scoring, *,
                  pad_multiple: int, timer: StepTimer) -> RLBatch:
    """Generate (every rank its own prompts), score (rank 0, broadcast) and build the step's `RLBatch` with its
    rollout and rewards fields; `scores` carry DAPO's overlong penalty when configured."""
    from vapo_megatron.rewards.shaping import apply_overlong_penalty
    from vapo_megatron.rollout.sampler import generate_distributed

    alg = scoring.algorithm
    ids = [p.input_ids for p in prompts]
    with timer("generation"):
        out = generate_distributed(rollout_engine, ids, params)
    with timer("reward"):
        scores, reward_stats, error_spans = _score(scoring.tokenizer, scoring.rewards,
                                                   scoring.reward.max_failed_fraction, prompts, out)
    batch = build_rl_batch(ids, out.prompt_index, out.response_ids, out.rollout_logprobs, pad_to_multiple=pad_multiple)
    batch.is_correct = scores >= alg.reward_correct
    batch.truncated = torch.tensor([f == "length" for f in out.finish_reason])
    if alg.overlong_buffer > 0:
        scores = torch.as_tensor(apply_overlong_penalty(
            scores, batch.lengths, max_length=scoring.max_response_length, buffer=alg.overlong_buffer,
            penalty_factor=alg.overlong_penalty), dtype=torch.float32)
    batch.scores, batch.reward_stats = scores, reward_stats
    batch.first_error_tokens = error_spans  # a list, not a tensor: never sent to the engines
    return batch


def minibatch_counts(mb: RLBatch) -> dict[str, torch.Tensor]:
    """Global normalisers of one optimizer step. Every rank holds the whole mini-batch, so these are global
    without communication (each engine computes only its DP slice with them)."""
    mask = mb.resp_mask
    return {"tokens": count_tokens(mask).double(), "seqs": count_seqs(mask).double(),
            "correct_tokens": count_correct_tokens(mask, mb.is_correct).double()}


def logprob_diff(batch: RLBatch) -> float:
    """Mean |log p_megatron - log p_vllm| over the batch's response tokens (rollout_logprob_diff)."""
    return masked_mean((batch.old_logprobs - batch.rollout_logprobs).abs(), batch.resp_mask).item()


def batch_metrics(batch: RLBatch) -> dict[str, float]:
    """The step's batch-level metrics. `lam_policy_mean` only when the advantages come from GAE (GRPO has no
    lam_policy); the critic's numbers only when there is a critic."""
    mask, lengths = batch.resp_mask, batch.lengths.float()
    out = {"reward_mean": batch.scores.mean().item(), "accuracy": batch.is_correct.float().mean().item(),
           "response_length_mean": lengths.mean().item(), "response_length_max": lengths.max().item(),
           "response_clip_ratio": batch.truncated.float().mean().item(),
           "rollout_logprob_diff": logprob_diff(batch)}
    if batch.has("lam_policy"):
        out["lam_policy_mean"] = batch.lam_policy.float().mean().item()
    out.update(batch.reward_stats)
    if batch.has("old_values"):
        # against the variant's own critic targets (bootstrapped when lam_critic < 1): not comparable across variants
        out["explained_variance"] = explained_variance(batch.returns, batch.old_values, mask).item()
        # against the Monte-Carlo return (final reward, gamma 1): the same target for every variant
        out["ev_mc"] = explained_variance_mc(batch.old_values, batch.scores, mask).item()
        out["value_mean"] = masked_mean(batch.old_values, mask).item()
    return {**out, **credit_metrics(batch)}


def minibatch_order(n: int, seed: int, step: int, epoch: int) -> torch.Tensor:
    """The mini-batch permutation of one epoch of one step: different at every step and epoch, and a function of
    (seed, step, epoch) alone, so a resumed run draws the same one."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + epoch)
    return torch.randperm(n, generator=gen)


def value_pretrain_stop(step: int, cap: int, ev_mc: float | None, threshold: float | None) -> str | None:
    """Why value pretraining ends after this step, or None to go on: "ev_threshold" once the step's ev_mc
    (values before the step's update, on its fresh rollouts of the initial policy: a held-out measure) reaches
    ``threshold``; "step_cap" at ``cap`` steps (algorithm.value_pretrain_steps). NaN ev_mc never stops it."""
    if threshold is not None and ev_mc is not None and ev_mc >= threshold:
        return "ev_threshold"
    return "step_cap" if step >= cap else None


def validation_accuracy(rollout_engine: Any, val_prompts: Sequence[Any], scoring: Scoring, eval_cfg: EvalConfig,
                        seed: int) -> float:
    """avg@k accuracy on the held-out prompts (the paper's avg@32 at top_p 0.7, temperature 1.0)."""
    from vapo_megatron.rollout.sampler import SamplingConfig, generate_distributed

    e = eval_cfg
    prompts = list(val_prompts)[: e.max_prompts] if e.max_prompts else list(val_prompts)
    params = SamplingConfig(n=e.n, temperature=e.temperature, top_p=e.top_p,
                            max_tokens=scoring.max_response_length, seed=seed + 99991)
    out = generate_distributed(rollout_engine, [p.input_ids for p in prompts], params)
    scores, _, _ = _score(scoring.tokenizer, scoring.rewards, scoring.reward.max_failed_fraction, prompts, out,
                          with_spans=False)
    return (scores >= scoring.algorithm.reward_correct).float().mean().item()


def read_metrics_rows(path: Path) -> list[dict]:
    """The rows of metrics.jsonl. A torn last line (the run was killed while writing it) is dropped with a
    warning naming the file; a bad line elsewhere raises naming the file and line."""
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines):
                raise ValueError(f"{path}:{i}: not a JSON object ({e.msg}); fix or delete that line") from None
            # printed, not warnings.warn: the demo scripts run with PYTHONWARNINGS=ignore
            print(f"warning: {path}: dropped a torn last line (line {i}, {len(line)} characters; the run was "
                  "stopped while writing it)", file=sys.stderr, flush=True)
    return rows


class MetricsLogger:
    """metrics.jsonl (one JSON object per step), TensorBoard, optional wandb, a progress bar, and a PNG of the
    curves at the end. Rank 0 only."""

    KEYS = ("reward_mean", "accuracy", "val_accuracy", "value_loss", "ev_mc", "response_length_mean")

    def __init__(self, cfg: VapoConfig):
        self.dir = Path(cfg.checkpoint.run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.dir)
        print(dump_yaml(cfg), flush=True)
        self.file = open(self.dir / "metrics.jsonl", "a")
        self.tb = self.wandb = self.bar = None
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tensorboard"))
        if cfg.logging.wandb_project:
            import wandb

            self.wandb = wandb.init(project=cfg.logging.wandb_project, dir=str(self.dir))
        if cfg.logging.progress_bar:
            from tqdm import tqdm

            total = cfg.train.steps + (cfg.algorithm.value_pretrain_steps if cfg.algorithm.use_critic else 0)
            self.bar = tqdm(total=total, desc="vapo", dynamic_ncols=True, disable=os.environ.get("CI") == "true")
        self.rows: list[dict] = []

    def write(self, row: dict) -> None:
        row = {k: (float(v) if isinstance(v, (int, float)) and k not in ("step", "phase") else v)
               for k, v in row.items()}
        self.rows.append(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for k, v in row.items():
            if isinstance(v, float) and self.tb:
                self.tb.add_scalar(f"{row['phase']}/{k}" if k.startswith("t_") else k, v, row["step"])
        if self.wandb:
            self.wandb.log(row, step=row["step"])
        if self.bar and row["step"] > 0:
            self.bar.update(1)
            self.bar.set_postfix({k[:8]: f"{row[k]:.3f}" for k in self.KEYS if k in row}, refresh=True)
        elif not self.bar:
            print(json.dumps({k: row[k] for k in ("step", "phase", *self.KEYS) if k in row}), flush=True)

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint's step (they will be produced again)."""
        path = self.dir / "metrics.jsonl"
        self.file.close()
        rows = read_metrics_rows(path)
        keep = [r for r in rows if r["step"] <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self.rows = keep
        self.file = open(path, "a")

    def close(self) -> None:
        from vapo_megatron.plotting import plot_curves

        if self.bar:
            self.bar.close()
        if self.tb:
            self.tb.close()
        self.file.close()
        plot_curves(self.rows, self.dir / "curves.png")
