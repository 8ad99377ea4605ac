"""The VAPO training loop (see README "Where this departs from the paper").

Departures from the paper, each also noted where it happens:
- the critic starts from the policy's trunk with a fresh value head (or a HF `score` head when the critic
  checkpoint has one), not from a reward model;
- old log-probs for the PPO ratio are the trainer's (Megatron's) log-probs of the sampled tokens under the
  temperature-1 full distribution, computed before the update; vLLM's own log-probs are only compared with them
  (`rollout_logprob_diff`). Config validation therefore refuses training rollouts at temperature != 1, top_p < 1
  or with top_k, which would make every update silently off-policy;
- value pretraining stops at `value_pretrain_steps` or earlier once ev_mc reaches `value_pretrain_ev_threshold`
  (the paper: "until value loss and explained variance stop improving"); PPO then runs `train.steps` steps;
- `train.critic_epochs` critic passes per rollout batch, independent of the actor's `ppo_epochs` (the paper's
  critic learns faster through its larger lr only);
- no KL penalty (the paper states none);
- optional truncated importance sampling (`algorithm.tis_cap`, off by default): the PPO term of each token is
  weighted by min(p_trainer_old / p_vllm, cap), for the mismatch between vLLM's and Megatron's numerics
  (`engine/objectives.py: actor_objective`);
- optional routing replay for MoE policies (`algorithm.routing_replay`, off by default): the experts vLLM routed
  each token to are recorded after generation and the policy's old-log-prob and update forwards use them
  (rollout/routing.py, models/moe.py). The recording is a prefill of each finished sequence, not the decode
  steps themselves (rollout/routing.py says why);
- optional separate placement (`rollout.placement=separate`, docs/async.md): vLLM on its own ranks, samples up to
  `rollout.max_staleness` policy versions old, corrected as decoupled PPO does (proximal = the trainer's
  recomputed old log-probs, behaviour = vLLM's, capped weight `algorithm.tis_cap`); not in the paper.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from vapo_megatron import platform
from vapo_megatron.algorithms import (
    decoupled_gae,
    ev_lengthened_lambda,
    explained_variance_mc,
    group_normalized_advantages,
    length_adaptive_lambda,
    token_rewards_from_scores,
    uniform_group_mask,
    whiten_advantages,
)
from vapo_megatron.config import VapoConfig
from vapo_megatron.data.rl_batch import RLBatch
from vapo_megatron.engine.checkpoint import load_checkpoint, save_checkpoint
from vapo_megatron.engine.objectives import actor_objective, critic_objective, minibatch_counts
from vapo_megatron.engine.offload import rollout_offloader
from vapo_megatron.engine.resume import select_resume_checkpoint
from vapo_megatron.timing import StepTimer
from vapo_megatron.train.build import build_parts
from vapo_megatron.train.controls import actor_rows_masked, minibatch_order, value_pretrain_stop
from vapo_megatron.train.guards import DivergenceGuard
from vapo_megatron.train.metrics import MetricsLogger, batch_metrics
from vapo_megatron.train.monte_carlo import MonteCarlo, StepMC
from vapo_megatron.train.scoring import Scoring, score_output, score_rollout, validation_accuracy


class Trainer:
    def __init__(self, cfg: VapoConfig, resume: bool | str | Path = False, pools=None):
        self.cfg, self.resume = cfg, resume
        self.remote = _remote_rollout(cfg, pools)   # separate placement: the rollout pool's handle
        self.parts = parts = build_parts(cfg, with_engine=self.remote is None)
        self.rollout_engine, self.actor, self.critic = parts.rollout_engine, parts.actor, parts.critic
        self.arch, self.tokenizer, self.loader = parts.arch, parts.tokenizer, parts.loader
        self.pad_multiple = math.lcm(cfg.policy_parallel.seq_multiple(), cfg.critic_parallel.seq_multiple())
        self.log = MetricsLogger(cfg) if dist.get_rank() == 0 else None
        self.nonfinite_in_row = 0
        self._seed_counter = 0  # rollout seeds are derived from it; checkpointed for exact resume
        self._asleep = False
        self.offload = rollout_offloader([self.actor, self.critic], cfg.rollout.offload_megatron_during_rollout)
        self.guard = DivergenceGuard(cfg.train, cfg.checkpoint.run_dir)
        self.timer = StepTimer()  # one step's timings (t_* metrics)
        self.scoring = Scoring(self.tokenizer, parts.rewards, cfg.reward, cfg.algorithm,
                               cfg.rollout.max_response_length)
        self.critic_ready = True  # False while the horizon is lengthened for a critic that explains too little
        self.mc = MonteCarlo(cfg, self.tokenizer)  # the "mc" value source and the critic probe (values/mc.py)
        self._mc_step: StepMC = StepMC()
        self._ev_mc: float | None = None  # this step's ev_mc of the old values (old_logprobs_and_values)

    # ---- the loop: one screen ------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, last, step = self.cfg, {}, 0
        pretrain = cfg.algorithm.value_pretrain_steps if cfg.algorithm.use_critic else 0  # a cap until it stops
        if self.resume:
            step, pretrain = self._restore()
        elif cfg.eval.every:
            self._emit(0, "init", {"val_accuracy": self.validate()})
        while step < pretrain + cfg.train.steps:                              # the end moves if pretraining stops
            step += 1
            phase = "value_pretrain" if step <= pretrain else "ppo"
            self.timer.start()
            batch = self.rollout(self.loader.next_batch(), step, phase)       # RLBatch: responses + rewards (+ MC)
            self.old_logprobs_and_values(batch)                               # + old_logprobs, old_values
            self.advantages(batch, phase)                                     # + advantages, returns, lam_policy
            self.guard.before_update(self._engines())
            metrics = {**batch_metrics(batch, self._ev_mc), **self.off_policy(batch), **self.mc_metrics(batch),
                       **self.update(batch, phase, step)}
            self.guard.after_update(step, metrics, self._engines(), metrics["rollout_logprob_diff"])  # not synced yet
            if phase == "ppo":
                self.sync_weights()                                           # Megatron -> vLLM
            if cfg.eval.every and phase == "ppo" and (step - pretrain) % cfg.eval.every == 0:
                metrics["val_accuracy"] = self.validate()
                self.show_credit(batch, step)                                 # credit/step_XXXX.png, .html
            if phase == "value_pretrain":
                pretrain = self._value_pretrain_end(step, pretrain, metrics)  # EV threshold or step cap
            else:
                self._critic_readiness(metrics)                               # lengthened horizon until ready
            last = self._emit(step, phase, {**metrics, **self.timer.as_metrics()})
            every = cfg.checkpoint.save_every
            if step == pretrain + cfg.train.steps or (every and step % every == 0):
                self.save(step, pretrain)
        if cfg.checkpoint.export_hf_at_end:
            self.export_hf()
        if self.log:
            self.log.close()
        self.remote.stop() if self.remote else self.rollout_engine.shutdown()
        return last

    def export_hf(self) -> None:
        """The final policy as a Hugging Face checkpoint in <run_dir>/hf_policy (collective)."""
        import json
        from pathlib import Path

        from vapo_megatron.engine.export import export_hf

        base = json.loads((Path(self.cfg.model.hf_dir) / "config.json").read_text())
        export_hf(self.actor.model, self.arch, Path(self.cfg.checkpoint.run_dir) / "hf_policy",
                  hf_assets=self.cfg.model.hf_dir, base_config=base, groups=self.actor.groups)

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def _engines(self) -> dict:
        return {"policy": self.actor, **({"critic": self.critic} if self.critic is not None else {})}

    def save(self, step: int, pretrain: int) -> None:
        ck = self.cfg.checkpoint
        save_checkpoint(ck.run_dir, step, self._engines(),
                        {"step": step, "pretrain": pretrain, "loader": self.loader.state_dict(),
                         "seed_counter": self._seed_counter, "critic_ready": self.critic_ready,
                         "nonfinite_in_row": self.nonfinite_in_row,
                         "policy_version": self.remote.version if self.remote else None}, keep_last=ck.keep_last)

    def _restore(self) -> tuple[int, int]:
        """Models, optimizers, RNG, data position and sampling seeds of the newest complete checkpoint;
        FileNotFoundError naming the directory when there is none."""
        ckpt = select_resume_checkpoint(self.cfg.checkpoint.run_dir, self.resume)  # issue 23: verified, or refused
        state = load_checkpoint(ckpt, self._engines(), trust=self.cfg.checkpoint.trust_checkpoints)
        self.loader.load_state_dict(state["loader"])
        self._seed_counter = state["seed_counter"]
        self.nonfinite_in_row = state["nonfinite_in_row"]
        self.critic_ready = state.get("critic_ready", True)  # checkpoints before issue 25 have no such field
        pretrain = self._resume_unready(state["step"], state["pretrain"])
        if self.log:
            self.log.truncate_after(state["step"])
        if self.remote is not None:  # the pool restarts at the checkpoint's batch: in-flight batches regenerate
            self.remote.resume(self._seed_counter, state["loader"], state.get("policy_version") or 0)
        self.sync_weights()  # vLLM still holds the initial weights
        if dist.get_rank() == 0:
            print(f"resumed from {ckpt} (step {state['step']}); continuing at step "
                  f"{state['step'] + 1}", flush=True)
        return state["step"], pretrain

    def _resume_unready(self, step: int, pretrain: int) -> int:
        """The value-pretraining cap of a run resumed at the end of a pretraining that left the critic not ready
        (critic_unready=stop saved it there): a larger `value_pretrain_steps` now pretrains on up to it; else the
        configured `critic_unready` applies to the saved critic, as it would have at the cap."""
        alg = self.cfg.algorithm
        if self.critic_ready or step != pretrain:
            return pretrain
        if alg.value_pretrain_steps > pretrain:
            if dist.get_rank() == 0:
                print(f"the critic was not ready at step {step}: value pretraining goes on up to "
                      f"algorithm.value_pretrain_steps={alg.value_pretrain_steps}", flush=True)
            return alg.value_pretrain_steps
        self._critic_not_ready(step, {"ev_mc": math.nan}, saved=True)
        return pretrain

    # ---- phases ------------------------------------------------------------------------------------------
    def rollout(self, prompts: list, step: int = 0, phase: str = "ppo") -> RLBatch:
        """The step's responses and rewards; also, while vLLM is awake, the step's Monte-Carlo values (all rows
        with value_source "mc"; the probe's rows when it is due) into `self._mc_step`. Separate placement: the
        rollout pool's batch (config validation refuses Monte-Carlo values there, docs/async.md)."""
        from vapo_megatron.rollout.sampler import SamplingConfig

        if self.remote is not None:  # separate placement: the pool generated it, maybe ahead (docs/async.md)
            self._seed_counter += 1
            with self.timer("generation"):
                out, version = self.remote.samples(self._seed_counter, [p.input_ids for p in prompts])
            return score_output(prompts, out, self.scoring, pad_multiple=self.pad_multiple, timer=self.timer,
                                version=version)
        r = self.cfg.rollout
        params = SamplingConfig(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                max_tokens=r.max_response_length, seed=self._sample_seed())
        with self.offload.offloaded():      # GPU: Megatron's params/grads/optimizer on host while vLLM runs
            self._wake()
            batch = score_rollout(self.rollout_engine, prompts, params, self.scoring, pad_multiple=self.pad_multiple,
                                  timer=self.timer)
            if self.cfg.algorithm.routing_replay:  # the experts vLLM chose, replayed by the policy's forwards
                from vapo_megatron.rollout.routing import record_routing_distributed

                with self.timer("routing_record"):
                    batch.routed_experts = record_routing_distributed(self.rollout_engine, batch.input_ids,
                                                                      batch.seq_lens, self.arch.num_experts)
            self._mc_step = self.mc.run(self.rollout_engine, batch, prompts, self.scoring, step, self._sample_seed,
                                        self.timer, with_critic=self.critic is not None, source=phase == "ppo")
            if r.sleep_between_steps:
                self.rollout_engine.sleep()  # GPU: free the KV cache while training; CPU: no-op (logged once)
                self._asleep = True
        return batch

    def _wake(self) -> None:
        if self._asleep:
            self.rollout_engine.wake_up()
            self._asleep = False

    def _sample_seed(self) -> int:
        from vapo_megatron.rollout.sampler import rollout_seed

        self._seed_counter += 1
        return rollout_seed(self.cfg.train.seed, self._seed_counter)

    def old_logprobs_and_values(self, batch: RLBatch) -> None:
        """The engine forwards: `old_logprobs` (policy) and `old_values` (critic, when there is one)."""
        from vapo_megatron.engine.objectives import response_logprobs, response_values

        v = self.arch.vocab_size
        with self.timer("old_logprob"):
            batch.old_logprobs = self.actor.forward(batch, lambda out, mb: response_logprobs(out, mb, v)[0])
        if self.critic is not None:
            with self.timer("critic_forward"):
                batch.old_values = self.critic.forward(batch, lambda out, mb: response_values(out, mb))
        elif self._mc_step.values is not None:  # value_source "mc" alone: every token takes its step's MC value
            batch.old_values = self._mc_step.values
        self._ev_mc = explained_variance_mc(batch.old_values, batch.scores, batch.resp_mask).item() \
            if batch.has("old_values") else None  # once a step: the horizon (ev_horizon), the metrics, readiness

    def advantages(self, batch: RLBatch, phase: str = "ppo") -> None:
        """`advantages` (GRPO: group-normalised scores; else decoupled GAE, which also sets `returns` and
        `lam_policy`). In value pretraining the critic's targets are always the lambda = 1 Monte-Carlo returns
        (docs/VAPO.md, component 1), whatever `lam_critic` and `couple_gae` say: those settings are PPO-phase
        ablations, and "without decoupled GAE" must change one thing only."""
        alg, mask = self.cfg.algorithm, batch.resp_mask
        if alg.advantage == "grpo":
            batch.advantages = group_normalized_advantages(batch.scores, mask, group_size=self.cfg.rollout.n)
            return
        rewards = token_rewards_from_scores(batch.scores, mask)
        pretrain = phase == "value_pretrain"
        mc = alg.value_source == "mc" and not pretrain  # a critic still pretrains on returns
        values = (self._mc_step.values if mc else batch.old_values) * mask
        lengthen = not self.critic_ready and not mc  # departure: lambda_policy = 1 while the critic explains too little
        adaptive = alg.length_adaptive and not lengthen
        lam, alpha = (None, alg.alpha) if adaptive else (1.0 if lengthen else alg.lam_policy, None)
        if alg.ev_horizon and not (pretrain or mc or lengthen):  # departure (issue 25): the horizon from ev_mc
            base = length_adaptive_lambda(mask.sum(-1), alg.alpha) if adaptive else \
                torch.full((mask.shape[0],), alg.lam_policy)
            lam, alpha = ev_lengthened_lambda(base, self._ev_mc, alg.value_pretrain_ev_threshold), None
        gae = decoupled_gae(rewards, values, mask, gamma=alg.gamma, lam_critic=1.0 if pretrain else alg.lam_critic,
                            lam_policy=lam, alpha=alpha, coupled=alg.couple_gae and not pretrain)
        raw = gae.advantages
        if mc and alg.mc_advantage == "step":  # VinePPO's one-step form: V(next boundary) - V(boundary)
            raw = (self._mc_step.next_values - self._mc_step.values) * mask
        advantages = whiten_advantages(raw, mask) if alg.whiten_advantages else raw
        if lengthen and alg.critic_unready == "group" and not pretrain:  # departure: GRPO's baseline until ready
            advantages = group_normalized_advantages(batch.scores, mask, group_size=self.cfg.rollout.n)
        returns, w = gae.returns, alg.mc_critic_weight
        if w > 0:  # departure (issue 25, VinePPO's values): the critic also fits Monte-Carlo step values
            returns = (w * self._mc_step.values + (1.0 - w) * returns) * mask
        batch.advantages, batch.returns, batch.lam_policy = advantages, returns, gae.lam_policy

    def update(self, batch: RLBatch, phase: str, step: int) -> dict:
        """Mini-batch critic and actor updates; metrics are means over the mini-batches (skips: sums).

        Epoch e visits the mini-batches in a fresh order; on each, the critic steps first (while e <
        critic_epochs), then the actor (while e < ppo_epochs, PPO phase). The order does not change the maths:
        advantages and critic targets were fixed from the old values before any update, so extra critic passes
        only make the critic fit this batch's Monte-Carlo targets more closely for the next step."""
        cfg, n = self.cfg, batch.n
        keep = self._actor_rows(batch)
        critic_passes = (cfg.train.critic_epochs or cfg.train.ppo_epochs) if self.critic is not None else 0
        actor_passes = cfg.train.ppo_epochs if phase == "ppo" else 0
        runs: dict[str, list[float]] = {}
        self.timer.zero("actor_update", "critic_update")
        for epoch in range(max(critic_passes, actor_passes)):
            order = minibatch_order(n, cfg.train.seed, step, epoch)
            for start in range(0, n, cfg.train.mini_batch_size):
                idx = order[start:start + cfg.train.mini_batch_size]
                mb = batch.rows(idx)
                step_metrics = self._critic_step(mb) if epoch < critic_passes else {}
                amb = mb if keep is None else actor_rows_masked(mb, keep[idx])
                if epoch < actor_passes and amb.resp_mask.any():
                    step_metrics.update(self._actor_step(amb))
                self._guard(step_metrics)
                for k, v in step_metrics.items():
                    runs.setdefault(k, []).append(v)
        out = {k: (sum(v) if k.endswith("/skipped") else sum(v) / len(v)) for k, v in runs.items()}
        for role in ("critic", "policy"):
            out[f"{role}/optimizer_steps"] = len(runs.get(f"{role}/grad_norm", []))
        if keep is not None:
            out["filtered_frac"] = 1.0 - keep.float().mean().item()
        return out

    def _critic_step(self, mb: RLBatch) -> dict[str, float]:
        with self.timer("critic_update"):
            return self.critic.train_step(mb, critic_objective(self.cfg.algorithm, minibatch_counts(mb)))

    def _actor_step(self, amb: RLBatch) -> dict[str, float]:
        with self.timer("actor_update"):
            return self.actor.train_step(amb, actor_objective(self.cfg.algorithm, minibatch_counts(amb),
                                                              self.arch.vocab_size))

    def _actor_rows(self, batch: RLBatch) -> torch.Tensor | None:
        """DAPO's dynamic-sampling filter (algorithm.filter_uniform_groups): responses of groups whose rewards are
        all equal carry no policy signal, so the actor skips them (the critic still learns from them). Departure
        from DAPO: the batch is not refilled by sampling more prompts, so every run keeps the same sample budget."""
        if not self.cfg.algorithm.filter_uniform_groups:
            return None
        return ~uniform_group_mask(batch.scores, group_size=self.cfg.rollout.n)

    def sync_weights(self) -> None:
        self._wake()  # GPU path untested here: weights must be resident before the push
        if self.remote is not None:  # to every rollout rank, over the bridge
            with self.timer("weight_sync"):
                self.remote.push(self.actor.iter_hf_tensors(), self.cfg.rollout.bucket_bytes)
            return
        with self.timer("weight_sync"):
            self.rollout_engine.update_weights(self.actor.iter_hf_tensors(),
                                               bucket_bytes=self.cfg.rollout.bucket_bytes)

    def validate(self) -> float:
        with self.offload.offloaded():
            self._wake()
            return validation_accuracy(self.remote or self.rollout_engine, self.parts.val, self.scoring, self.cfg.eval,
                                       self.cfg.train.seed)

    def off_policy(self, batch: RLBatch) -> dict[str, float]:
        """Staleness of the batch and the statistics of its behaviour -> proximal weights (docs/async.md)."""
        from vapo_megatron.algorithms.off_policy import off_policy_metrics

        version = self.remote.version if self.remote else self.rollout_engine.weight_version
        return off_policy_metrics(batch.policy_version, version, batch.old_logprobs, batch.rollout_logprobs,
                                  batch.resp_mask, cap=self.cfg.algorithm.tis_cap)

    # ---- bookkeeping ------------------------------------------------------------------------------------
    def _guard(self, out: dict) -> None:
        """NaN/inf guard: a skipped step is counted; too many in a row stop the run with a clear message."""
        skipped = out.get("policy/skipped", 0.0) + out.get("critic/skipped", 0.0)
        self.nonfinite_in_row = self.nonfinite_in_row + 1 if skipped else 0
        if self.nonfinite_in_row > self.cfg.train.max_nonfinite_in_row:
            raise FloatingPointError(f"{self.nonfinite_in_row} optimizer steps in a row had a non-finite loss or "
                                     f"gradient norm (limit train.max_nonfinite_in_row="
                                     f"{self.cfg.train.max_nonfinite_in_row}); stopping")

    def _value_pretrain_end(self, step: int, pretrain: int, metrics: dict) -> int:
        """The last value-pretraining step: ``step`` when pretraining stops here (the reason goes into
        ``metrics["value_pretrain_stop"]`` and the log), else ``pretrain`` unchanged."""
        reason = value_pretrain_stop(step, pretrain, metrics.get("ev_mc"),
                                     self.cfg.algorithm.value_pretrain_ev_threshold)
        if reason is None:
            return pretrain
        metrics["value_pretrain_stop"] = reason
        alg = self.cfg.algorithm
        self.critic_ready = reason != "step_cap" or alg.value_pretrain_ev_threshold is None
        if self.log:  # "PPO steps follow" only when they do: an unready critic may stop the run (below)
            follow = "" if not self.critic_ready and alg.critic_unready == "stop" else \
                f"; {self.cfg.train.steps} PPO steps follow"
            print(f"value pretraining stops after step {step} ({reason}: ev_mc {metrics.get('ev_mc', math.nan):.4f}, "
                  f"threshold {alg.value_pretrain_ev_threshold}, cap {pretrain}){follow}", flush=True)
        if not self.critic_ready:
            self._critic_not_ready(step, metrics)
        return step

    def _critic_not_ready(self, step: int, metrics: dict, saved: bool = False) -> None:
        """Value pretraining hit its cap (step `step`) with ev_mc below the threshold: stop, lengthen the horizon,
        GRPO's advantages or the paper's horizon (algorithm.critic_unready; a departure from the paper, which goes
        on at the short horizon). `saved`: the run resumed from the checkpoint saved at that cap."""
        from vapo_megatron.errors import CriticNotReadyError

        alg, ev = self.cfg.algorithm, metrics.get("ev_mc", math.nan)
        message = (f"the critic is not ready: value pretraining reached its cap at step {step} with ev_mc "
                   f"{'(saved)' if saved else f'{ev:.4f}'} below algorithm.value_pretrain_ev_threshold "
                   f"{alg.value_pretrain_ev_threshold}")
        if alg.critic_unready == "continue":  # the paper: the configured horizon whatever the critic explains
            self.critic_ready = True
            if self.log:
                print(f"{message}: PPO goes on at the configured horizon (algorithm.critic_unready=continue)",
                      flush=True)
            return
        if alg.critic_unready == "stop":  # the step's row and a checkpoint first: no pretraining is lost
            if not saved:
                self._emit(step, "value_pretrain", {**metrics, "critic_ready": 0.0, **self.timer.as_metrics()})
                self.save(step, step)
            if self.remote:  # separate placement: the rollout pool ends now, not at rollout.rollout_timeout_s
                self.remote.stop()
            raise CriticNotReadyError(
                f"{message}; stopping (algorithm.critic_unready=stop) with the critic saved at step {step}. Go on "
                f"with --resume and a larger algorithm.value_pretrain_steps to pretrain further, or with "
                f"algorithm.critic_unready=lengthen|group|continue to start PPO on this critic")
        if self.log:
            how = ("with group-normalised advantages (the critic ignored by the policy, still trained)"
                   if alg.critic_unready == "group" else "at lambda_policy = 1 (the critic only as a baseline)")
            print(f"{message}: PPO trains {how} until a step's ev_mc reaches the threshold again "
                  f"(algorithm.critic_unready={alg.critic_unready})", flush=True)

    def _critic_readiness(self, metrics: dict) -> None:
        """While the horizon is lengthened, give the configured one back once a PPO step's ev_mc (values before
        that step's update, on fresh samples) reaches the threshold; `critic_ready` goes into the metrics."""
        if self.critic is None:
            return
        threshold = self.cfg.algorithm.value_pretrain_ev_threshold
        ev = metrics.get("ev_mc", math.nan)
        if not self.critic_ready and threshold is not None and ev >= threshold:
            self.critic_ready = True
            if self.log:
                print(f"the critic is ready (ev_mc {ev:.4f} >= {threshold}): back to the configured horizon from "
                      f"the next step", flush=True)
        metrics["critic_ready"] = float(self.critic_ready)

    def mc_metrics(self, batch: RLBatch) -> dict[str, float]:
        """This step's Monte-Carlo cost and, when the probe ran, `ev_oracle` (values/mc.py)."""
        return self.mc.metrics(self._mc_step, batch)

    def show_credit(self, batch: RLBatch, step: int) -> None:
        """The credit picture of a few responses of this step's batch (rank 0; needs advantages)."""
        from vapo_megatron.report.credit import write_credit_report

        if self.log:
            write_credit_report(self.cfg.checkpoint.run_dir, step, batch, self.tokenizer)

    def _emit(self, step: int, phase: str, metrics: dict) -> dict:
        row = {"step": step, "phase": phase, **metrics}
        if self.log:
            self.log.write(row)
        return row


def _remote_rollout(cfg: VapoConfig, pools):
    if pools is None:
        return None
    from vapo_megatron.rollout.async_pool import RemoteRollout

    return RemoteRollout(cfg, pools)


def train(cfg: VapoConfig, resume: bool | str | Path = False) -> dict:
    from vapo_megatron.parallel.layout import init_distributed

    platform.setup()
    init_distributed()
    if cfg.rollout.placement == "separate":  # two pools of one world (rollout/placement.py)
        from vapo_megatron.rollout.async_pool import serve_rollouts
        from vapo_megatron.rollout.placement import split_world

        pools = split_world(cfg)
        if pools.role == "rollout":
            return serve_rollouts(cfg, pools)
        trainer = Trainer(cfg, resume, pools=pools)
    else:
        trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.run()
    finally:  # every exit path (a stop, an error) ends the reward workers now, not at interpreter exit
        if trainer.scoring.rewards is not None:
            trainer.scoring.rewards.close()
