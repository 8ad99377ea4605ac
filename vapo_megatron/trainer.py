"""The VAPO training loop (see README "Where this departs from the paper").

Departures from the paper, each also noted where it happens:
- the critic starts from the policy's trunk with a fresh value head (or a HF `score` head when the critic
  checkpoint has one), not from a reward model;
- log-probs for the PPO ratio are those of the temperature-1 distribution (vLLM's raw log-probs), which is the
  paper's setting (training rollouts at temperature 1.0);
- no KL penalty (the paper states none).
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from vapo_megatron import platform
from vapo_megatron.algorithms import (
    decoupled_gae,
    group_normalized_advantages,
    token_rewards_from_scores,
    uniform_group_mask,
    whiten_advantages,
)
from vapo_megatron.config import VapoConfig
from vapo_megatron.engine.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from vapo_megatron.engine.offload import rollout_offloader
from vapo_megatron.guards import DivergenceGuard
from vapo_megatron.trainer_parts import (
    MetricsLogger,
    batch_metrics,
    build_engines,
    logprob_diff,
    minibatch_counts,
    score_rollout,
)


class Trainer:
    def __init__(self, cfg: VapoConfig, resume: bool = False):
        self.cfg, self.resume = cfg, resume
        parts = build_engines(cfg)
        self.rollout_engine, self.actor, self.critic = parts.rollout_engine, parts.actor, parts.critic
        self.arch, self.tokenizer, self.loader, self.val = parts.arch, parts.tokenizer, parts.loader, parts.val
        self.rewards, self.layouts = parts.rewards, parts.layouts
        self.pad_multiple = math.lcm(cfg.policy_parallel.seq_multiple(), cfg.critic_parallel.seq_multiple())
        self.log = MetricsLogger(cfg) if dist.get_rank() == 0 else None
        self.nonfinite_in_row = 0
        self._seed_counter = 0  # rollout seeds are derived from it; checkpointed for exact resume
        self._asleep = False
        self.offload = rollout_offloader([self.actor, self.critic], cfg.rollout.offload_megatron_during_rollout)
        self.guard = DivergenceGuard(cfg.train, cfg.checkpoint.run_dir)

    # ---- the loop: one screen ------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, last = self.cfg, {}
        pretrain = cfg.algorithm.value_pretrain_steps if cfg.algorithm.use_critic else 0
        end, start = pretrain + cfg.train.steps, 0
        if self.resume:
            start, pretrain = self._restore()
        elif cfg.eval.every:
            self._emit(0, "init", {"val_accuracy": self.validate()})
        for step in range(start + 1, end + 1):
            phase = "value_pretrain" if step <= pretrain else "ppo"
            t = {"t_start": time.perf_counter()}
            batch = self.rollout(self.loader.next_batch(), t)                 # grouped responses + rewards
            self.old_logprobs_and_values(batch, t)                            # engine forwards
            self.advantages(batch)                                            # decoupled, length-adaptive GAE
            self.guard.before_update(self._engines())
            metrics = self.update(batch, phase, t)                            # mini-batch PPO / value updates
            self.guard.after_update(step, metrics, self._engines(), logprob_diff(batch))  # before sync and save
            if phase == "ppo":
                self.sync_weights(t)                                          # Megatron -> vLLM
            if cfg.eval.every and phase == "ppo" and (step - pretrain) % cfg.eval.every == 0:
                metrics["val_accuracy"] = self.validate()
            last = self._emit(step, phase, {**batch_metrics(batch), **metrics, **self._timings(t)})
            if phase == "value_pretrain" and self._value_pretrain_done(metrics):
                pretrain = step                                               # EV threshold reached: PPO now
            if step == end or (cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0):
                self.save(step, pretrain)
        if cfg.checkpoint.export_hf_at_end:
            self.export_hf()
        if self.log:
            self.log.close()
        self.rollout_engine.shutdown()
        return last

    def export_hf(self) -> None:
        """The final policy as a Hugging Face checkpoint in <run_dir>/hf_policy (collective)."""
        import json
        from pathlib import Path

        from vapo_megatron.engine.export import export_hf

        base = json.loads((Path(self.cfg.model.hf_dir) / "config.json").read_text())
        with self.layouts.use("policy"):
            export_hf(self.actor.model, self.arch, Path(self.cfg.checkpoint.run_dir) / "hf_policy",
                      hf_assets=self.cfg.model.hf_dir, base_config=base)

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def _engines(self) -> dict:
        return {"policy": self.actor, **({"critic": self.critic} if self.critic is not None else {})}

    def save(self, step: int, pretrain: int) -> None:
        ck = self.cfg.checkpoint
        save_checkpoint(ck.run_dir, step, self._engines(),
                        {"step": step, "pretrain": pretrain, "loader": self.loader.state_dict(),
                         "seed_counter": self._seed_counter,
                         "nonfinite_in_row": self.nonfinite_in_row}, keep_last=ck.keep_last)

    def _restore(self) -> tuple[int, int]:
        """Models, optimizers, RNG, data position and sampling seeds of the newest complete checkpoint;
        FileNotFoundError naming the directory when there is none."""
        ckpt = resolve_checkpoint(self.cfg.checkpoint.run_dir)
        state = load_checkpoint(ckpt, self._engines(), trust=self.cfg.checkpoint.trust_checkpoints)
        self.loader.load_state_dict(state["loader"])
        self._seed_counter = state["seed_counter"]
        self.nonfinite_in_row = state["nonfinite_in_row"]
        if self.log:
            self.log.truncate_after(state["step"])
        self.sync_weights({})  # vLLM still holds the initial weights
        if dist.get_rank() == 0:
            print(f"resumed from {ckpt} (step {state['step']}); continuing at step "
                  f"{state['step'] + 1}", flush=True)
        return state["step"], state["pretrain"]

    # ---- phases ------------------------------------------------------------------------------------------
    def rollout(self, prompts, t: dict) -> dict:
        from vapo_megatron.rollout.sampler import SamplingConfig

        r = self.cfg.rollout
        params = SamplingConfig(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                max_tokens=r.max_response_length, seed=self._sample_seed())
        with self.offload.offloaded():      # GPU: Megatron's params/grads/optimizer on host while vLLM runs
            self._wake()
            batch = score_rollout(self, prompts, params, t)
            if r.sleep_between_steps:
                self.rollout_engine.sleep()  # GPU: free the KV cache while training; CPU: no-op (logged once)
                self._asleep = True
        return batch

    def _wake(self) -> None:
        if self._asleep:
            self.rollout_engine.wake_up()
            self._asleep = False

    def _sample_seed(self) -> int:
        self._seed_counter += 1
        return self.cfg.train.seed * 1_000_003 + self._seed_counter

    def old_logprobs_and_values(self, batch: dict, t: dict) -> None:
        from vapo_megatron.engine.objectives import response_logprobs, response_values

        v = self.arch.vocab_size
        t0 = time.perf_counter()
        batch["old_logprobs"] = self.actor.forward(batch, lambda out, mb: response_logprobs(out, mb, v)[0])
        t["t_old_logprob"] = time.perf_counter() - t0
        if self.critic is not None:
            t0 = time.perf_counter()
            batch["old_values"] = self.critic.forward(batch, lambda out, mb: response_values(out, mb))
            t["t_critic_forward"] = time.perf_counter() - t0

    def advantages(self, batch: dict) -> None:
        alg, mask = self.cfg.algorithm, batch["resp_mask"]
        if alg.advantage == "grpo":
            batch["advantages"] = group_normalized_advantages(batch["scores"], mask, group_size=self.cfg.rollout.n)
            batch["lam_policy"] = torch.zeros(len(mask))
            return
        rewards = token_rewards_from_scores(batch["scores"], mask)
        values = batch["old_values"] * mask
        gae = decoupled_gae(rewards, values, mask, gamma=alg.gamma, lam_critic=alg.lam_critic,
                            lam_policy=None if alg.length_adaptive else alg.lam_policy,
                            alpha=alg.alpha if alg.length_adaptive else None, coupled=alg.couple_gae)
        advantages = whiten_advantages(gae.advantages, mask) if alg.whiten_advantages else gae.advantages
        batch["advantages"], batch["returns"], batch["lam_policy"] = advantages, gae.returns, gae.lam_policy

    def update(self, batch: dict, phase: str, t: dict) -> dict:
        """Mini-batch critic and actor updates; metrics are means over the mini-batches (skips: sums)."""
        from vapo_megatron.engine.objectives import actor_loss_fn, critic_loss_fn

        cfg, n = self.cfg, len(batch["input_ids"])
        keep = self._actor_rows(batch)
        runs: dict[str, list[float]] = {}
        t["t_actor_update"] = t["t_critic_update"] = 0.0
        for epoch in range(cfg.train.ppo_epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.train.seed + epoch + n))
            for start in range(0, n, cfg.train.mini_batch_size):
                idx = order[start:start + cfg.train.mini_batch_size]
                mb = _rows(batch, idx, n)
                step_metrics: dict[str, float] = {}
                if self.critic is not None:
                    t0 = time.perf_counter()
                    m = self.critic.train_step(mb, critic_loss_fn(cfg.algorithm, minibatch_counts(mb)))
                    t["t_critic_update"] += time.perf_counter() - t0
                    step_metrics.update(value_loss=m["value_loss"], grad_norm_critic=m["grad_norm"],
                                        critic_skipped=m["skipped"], padding_waste_critic=m["padding_waste"])
                amb = mb if keep is None else _rows(mb, keep[idx].nonzero().squeeze(1), len(idx))
                if phase == "ppo" and len(amb["input_ids"]):
                    t0 = time.perf_counter()
                    m = self.actor.train_step(amb, actor_loss_fn(cfg.algorithm, minibatch_counts(amb),
                                                                 self.arch.vocab_size))
                    t["t_actor_update"] += time.perf_counter() - t0
                    step_metrics.update({k: m[k] for k in ("policy_loss", "clip_frac_low", "clip_frac_high",
                                                           "approx_kl", "entropy") if k in m})
                    step_metrics.update(nll_loss=m.get("nll_loss", 0.0), grad_norm_actor=m["grad_norm"],
                                        actor_skipped=m["skipped"], padding_waste_actor=m["padding_waste"])
                self._guard(step_metrics)
                for k, v in step_metrics.items():
                    runs.setdefault(k, []).append(v)
        out = {k: (sum(v) if k.endswith("_skipped") else sum(v) / len(v)) for k, v in runs.items()}
        if keep is not None:
            out["filtered_frac"] = 1.0 - keep.float().mean().item()
        return out

    def _actor_rows(self, batch: dict) -> torch.Tensor | None:
        """DAPO's dynamic-sampling filter (algorithm.filter_uniform_groups): responses of groups whose rewards are
        all equal carry no policy signal, so the actor skips them (the critic still learns from them). Departure
        from DAPO: the batch is not refilled by sampling more prompts, so every run keeps the same sample budget."""
        if not self.cfg.algorithm.filter_uniform_groups:
            return None
        return ~uniform_group_mask(batch["scores"], group_size=self.cfg.rollout.n)

    def sync_weights(self, t: dict) -> None:
        self._wake()  # GPU path untested here: weights must be resident before the push
        t0 = time.perf_counter()
        self.rollout_engine.update_weights(self.actor.iter_hf_tensors(), bucket_bytes=self.cfg.rollout.bucket_bytes)
        t["t_weight_sync"] = time.perf_counter() - t0

    def validate(self) -> float:
        from vapo_megatron.trainer_parts import validation_accuracy

        with self.offload.offloaded():
            self._wake()
            return validation_accuracy(self)

    # ---- bookkeeping ------------------------------------------------------------------------------------
    def _guard(self, out: dict) -> None:
        """NaN/inf guard: a skipped step is counted; too many in a row stop the run with a clear message."""
        skipped = out.get("actor_skipped", 0.0) + out.get("critic_skipped", 0.0)
        self.nonfinite_in_row = self.nonfinite_in_row + 1 if skipped else 0
        if self.nonfinite_in_row > self.cfg.train.max_nonfinite_in_row:
            raise FloatingPointError(f"{self.nonfinite_in_row} optimizer steps in a row had a non-finite loss or "
                                     f"gradient norm (limit train.max_nonfinite_in_row="
                                     f"{self.cfg.train.max_nonfinite_in_row}); stopping")

    def _value_pretrain_done(self, metrics: dict) -> bool:
        threshold = self.cfg.algorithm.value_pretrain_ev_threshold
        return threshold is not None and metrics.get("explained_variance", float("-inf")) >= threshold

    @staticmethod
    def _timings(t: dict) -> dict:
        total = time.perf_counter() - t.pop("t_start")
        t["t_step"] = total
        t["t_other"] = total - sum(v for k, v in t.items() if k != "t_step")
        return dict(t)

    def _emit(self, step: int, phase: str, metrics: dict) -> dict:
        row = {"step": step, "phase": phase, **metrics}
        if self.log:
            self.log.write(row)
        return row


def train(cfg: VapoConfig, resume: bool = False) -> dict:
    from vapo_megatron.parallel.layout import init_distributed

    platform.setup()
    init_distributed()
    return Trainer(cfg, resume=resume).run()


def _rows(batch: dict, idx: torch.Tensor, n: int) -> dict:
    """The rows `idx` of every per-sample tensor of `batch` (those with `n` rows)."""
    return {k: v[idx] for k, v in batch.items() if isinstance(v, torch.Tensor) and len(v) == n}
