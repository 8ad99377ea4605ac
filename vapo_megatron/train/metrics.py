"""The step's batch metrics and the metrics log (metrics.jsonl, TensorBoard, wandb, progress bar, curves)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from vapo_megatron.algorithms import explained_variance, explained_variance_mc, masked_mean
from vapo_megatron.config import VapoConfig, dump_yaml, save_config
from vapo_megatron.data.rl_batch import RLBatch
from vapo_megatron.report.credit import credit_metrics


def logprob_diff(batch: RLBatch) -> float:
    """Mean |log p_megatron - log p_vllm| over the batch's response tokens (rollout_logprob_diff)."""
    return masked_mean((batch.old_logprobs - batch.rollout_logprobs).abs(), batch.resp_mask).item()


def batch_metrics(batch: RLBatch, ev_mc: float | None = None) -> dict[str, float]:
    """The step's batch-level metrics. `lam_policy_mean` only when the advantages come from GAE (GRPO has no
    lam_policy); the critic's numbers only when there is a critic. `ev_mc`: the old values' explained variance
    against the Monte-Carlo return when the caller already has it (computed here otherwise)."""
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
        out["ev_mc"] = explained_variance_mc(batch.old_values, batch.scores, mask).item() if ev_mc is None else ev_mc
        out["value_mean"] = masked_mean(batch.old_values, mask).item()
    return {**out, **credit_metrics(batch)}


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

    KEYS = ("reward_mean", "accuracy", "val_accuracy", "critic/value_loss", "ev_mc", "response_length_mean")

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
            short = {k.rsplit("/", 1)[-1][:8]: f"{row[k]:.3f}" for k in self.KEYS if k in row}
            self.bar.set_postfix(short, refresh=True)
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
        from vapo_megatron.report.plotting import plot_curves

        if self.bar:
            self.bar.close()
        if self.tb:
            self.tb.close()
        self.file.close()
        plot_curves(self.rows, self.dir / "curves.png")
