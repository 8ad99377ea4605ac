"""The rollout pool of separate placement, and the trainer's handle on it: bounded-staleness generation.

Protocol over the bridge (rollout/channel.py; trainer rank 0 is bridge rank 0, the first rollout rank is 1).
The trainer drives it; every message is a broadcast from trainer rank 0 that every rollout rank reads in order:

| trainer sends | rollout pool does |
|---|---|
| `("request", j)` | generates batch j if not yet done, sends it (rollout rank 1 -> trainer rank 0), generates ahead |
| `("weights", v)` + a `BroadcastTransport` session | loads policy version v into every engine |
| `("generate", prompt ids, SamplingConfig)` | generates those (validation) with the weights it holds, sends them |
| `("resume", j, loader state)` | drops what it generated ahead; the next batch is j + 1, its prompts from that state |
| `("stop",)` | shuts its engines down and returns |

Bounded staleness. After answering request j the pool generates ahead batches j+1 .. j+k (k =
`rollout.max_staleness`, never past the run's last step), while the trainer trains step j: that is the overlap.
Batch i is generated after request i - k was answered, i.e. after every weight push of steps before i - k, so when
it is trained (at step i, after the pushes of steps < i) it lags by at most the pushes of steps i-k .. i-1: k
versions (`may_generate`; tests/unit/test_async_schedule.py simulates it). The trainer checks every batch again
(`RemoteRollout.samples`: StalenessError past k). k = 0 is synchronous: batch j is generated only when requested,
with the weights of step j - 1.

Both pools read the same prompts in the same order (each has the data loader, same seed) and derive batch j's
sampling seed from j, exactly as the colocated trainer does, so at k = 0 the samples equal the colocated ones; the
pool sends a fingerprint of its prompts and the trainer refuses a batch whose prompts differ.

Resume (`RemoteRollout.resume`, before the resumed run's first weight push). The checkpoint holds the trainer's
data position and batch count, not the batches the pool had generated ahead: the pool is told to continue after
the checkpoint's batch j from the trainer's loader state, so the batches that were in flight are generated again,
from the same prompts with the same seeds, by the checkpoint's policy. Nothing is lost or trained twice. At k = 0
nothing is in flight after a step (batch j + 1 is generated only when requested, with the weights of step j), so
the resumed run is the uninterrupted one; at k > 0 the regenerated batches are fresher than the lost ones were.
"""
from __future__ import annotations

import time
from typing import Any

import torch.distributed as dist

from vapo_megatron.config import VapoConfig
from vapo_megatron.errors import RolloutRankError, StalenessError
from vapo_megatron.rollout.placement import Pools
from vapo_megatron.rollout.sampler import RolloutOutput, SamplingConfig, generate_distributed, rollout_seed
from vapo_megatron.rollout.transports.broadcast import BroadcastTransport
from vapo_megatron.rollout.weight_sync import WeightUpdateStats, push_weights

ROLLOUT_POOL_GPU_MEMORY_UTILIZATION = 0.85
"""vLLM's share of a rollout rank's GPU, where nothing else runs (the colocated engine keeps RolloutEngineConfig's
0.5 and leaves the rest to Megatron): a little under vLLM's own default 0.9, leaving room for the weight push's
transient copies, which vLLM's start-up profile does not see. Ignored on CPU. planning/memory.py plans with it."""


def may_generate(batch: int, answered: int, max_staleness: int, last: int) -> bool:
    """Whether the pool may generate `batch` now, having answered requests 1..`answered`: at most
    `max_staleness` batches ahead of the last request, and never past the run's `last` step."""
    return batch <= min(last, answered + max_staleness)


def prompts_fingerprint(prompt_ids: list[list[int]]) -> int:
    """A stable hash of a batch's prompt token ids (ints and tuples hash the same in every process)."""
    return hash(tuple(tuple(p) for p in prompt_ids))


def last_step(cfg: VapoConfig) -> int:
    """The run's last step if value pretraining runs to its cap (an early stop leaves up to k batches unused)."""
    return (cfg.algorithm.value_pretrain_steps if cfg.algorithm.use_critic else 0) + cfg.train.steps


def training_params(cfg: VapoConfig, batch: int) -> SamplingConfig:
    r = cfg.rollout
    return SamplingConfig(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          max_tokens=r.max_response_length, seed=rollout_seed(cfg.train.seed, batch))


class RolloutServer:
    """The loop of every rollout rank: answer the trainer's messages (module docstring)."""

    def __init__(self, cfg: VapoConfig, pools: Pools, engine: Any, loader: Any) -> None:
        self.cfg, self.pools, self.engine, self.loader = cfg, pools, engine, loader
        self.bridge = pools.bridge
        self.ready: dict[int, tuple] = {}   # batch -> (output, version, fingerprint), generated, not yet sent
        self.generated = self.answered = 0
        self.busy_s = 0.0

    def run(self) -> dict:
        start = time.perf_counter()
        while True:
            msg = self.bridge.broadcast_object(None, 0, "the trainer's next message")
            if msg[0] == "request":
                self._answer(msg[1])
            elif msg[0] == "weights":
                t = time.perf_counter()
                BroadcastTransport(None, 0, self._receiver(), channel=self.bridge).receive()
                self.busy_s += time.perf_counter() - t
            elif msg[0] == "generate":
                t = time.perf_counter()
                out = generate_distributed(self.engine, msg[1], msg[2])
                self.busy_s += time.perf_counter() - t
                self._send((out, self.engine.weight_version, None), "validation samples")
            elif msg[0] == "resume":
                self.ready.clear()
                self.generated = self.answered = msg[1]
                self.loader.load_state_dict(msg[2])
            elif msg[0] == "stop":
                wall = time.perf_counter() - start
                return {"generated": self.generated, "answered": self.answered, "busy_s": self.busy_s,
                        "wall_s": wall, "idle_frac": 1.0 - self.busy_s / wall if wall > 0 else 0.0}
            else:
                raise RolloutRankError(f"rollout rank got an unknown message {msg[0]!r} from the trainer")

    def _receiver(self):
        from vapo_megatron.rollout.transports.colocated import ColocatedTransport

        return ColocatedTransport(self.engine)

    def _answer(self, batch: int) -> None:
        if batch != self.answered + 1:
            raise RolloutRankError(f"the trainer asked for batch {batch}, the rollout pool expected "
                                   f"{self.answered + 1}")
        while self.generated < batch:
            self._generate_next()
        self._send(self.ready.pop(batch), f"batch {batch}'s samples")
        self.answered = batch
        while may_generate(self.generated + 1, self.answered, self.cfg.rollout.max_staleness, last_step(self.cfg)):
            self._generate_next()

    def _generate_next(self) -> None:
        t = time.perf_counter()
        batch = self.generated + 1
        ids = [p.input_ids for p in self.loader.next_batch()]
        out = generate_distributed(self.engine, ids, training_params(self.cfg, batch))
        self.ready[batch] = (out, self.engine.weight_version, prompts_fingerprint(ids))
        self.generated = batch
        self.busy_s += time.perf_counter() - t

    def _send(self, payload: tuple, what: str) -> None:
        if self.bridge.rank == 1:  # the other rollout ranks hold the same output (generate_distributed)
            self.bridge.send_object(payload, 0, what)


class RemoteRollout:
    """The trainer's handle on the rollout pool (every trainer rank has one; only rank 0 talks over the bridge).

    `version` is the policy version of the last push (0: the checkpoint's). `wait_s` sums the seconds the trainer
    waited for samples (its idle time in the benchmark)."""

    def __init__(self, cfg: VapoConfig, pools: Pools) -> None:
        self.cfg, self.pools, self.bridge = cfg, pools, pools.bridge
        self.version, self.wait_s = 0, 0.0

    def _from_leader(self, obj=None):
        box = [obj]
        dist.broadcast_object_list(box, src=0)  # the trainer pool's own world
        return box[0]

    def samples(self, batch: int, prompt_ids: list[list[int]]) -> tuple[RolloutOutput, int]:
        """Batch `batch`'s output and the policy version that generated it; refuses a batch older than
        rollout.max_staleness versions or for other prompts than `prompt_ids` (the trainer's own loader's)."""
        t = time.perf_counter()
        payload = None
        if self.bridge is not None:
            self.bridge.broadcast_object(("request", batch), 0)
            payload = self.bridge.recv_object(1, f"batch {batch}'s samples")
        out, version, fingerprint = self._from_leader(payload)
        self.wait_s += time.perf_counter() - t
        if fingerprint != prompts_fingerprint(prompt_ids):
            raise RolloutRankError(f"batch {batch}: the rollout pool sampled other prompts than the trainer's "
                                   "loader holds (the two data loaders are out of step)")
        if self.version - version > self.cfg.rollout.max_staleness:
            raise StalenessError(f"batch {batch} was sampled by policy version {version}, the trainer is at "
                                 f"{self.version}: {self.version - version} > rollout.max_staleness "
                                 f"{self.cfg.rollout.max_staleness}")
        return out, version

    def generate_all(self, prompt_ids: list[list[int]], params: SamplingConfig) -> RolloutOutput:
        """Generate for these prompts with the pool's current weights (validation)."""
        payload = None
        if self.bridge is not None:
            self.bridge.broadcast_object(("generate", prompt_ids, params), 0)
            payload = self.bridge.recv_object(1, "validation samples")
        return self._from_leader(payload)[0]

    def push(self, named_tensors, bucket_bytes: int) -> WeightUpdateStats | None:
        """Policy version `version + 1` to every rollout rank. Collective over the trainer pool (the stream is);
        rank 0 broadcasts it over the bridge, the other ranks only drive their share of the stream."""
        self.version += 1
        if self.bridge is None:
            for _ in named_tensors:
                pass
            return None
        self.bridge.broadcast_object(("weights", self.version), 0)
        return push_weights(BroadcastTransport(None, 0, channel=self.bridge), named_tensors, bucket_bytes,
                            version=self.version)

    def resume(self, batch: int, loader_state: dict, version: int) -> None:
        """After a checkpoint of step `batch` at policy `version`: the pool's next batch is `batch` + 1, from the
        trainer's `loader_state` (module docstring: Resume); the resume's weight push is version + 1."""
        self.version = version
        if self.bridge is not None:
            self.bridge.broadcast_object(("resume", batch, loader_state), 0)

    def stop(self) -> None:
        if self.bridge is not None:
            self.bridge.broadcast_object(("stop",), 0)


def serve_rollouts(cfg: VapoConfig, pools: Pools) -> dict:
    """A rollout rank's whole life: build its vLLM engine and the data loader, answer the trainer until it says
    stop. Returns the pool's counts and busy / idle seconds."""
    from transformers import AutoTokenizer

    from vapo_megatron.data.datasets import PromptDataset, PromptLoader
    from vapo_megatron.rollout.vllm_engine import RolloutEngine

    r, seed = cfg.rollout, cfg.train.seed
    engine = RolloutEngine(cfg.model.hf_dir, tensor_parallel_size=r.vllm_tensor_parallel, seed=seed,
                           max_model_len=r.max_prompt_length + r.max_response_length,
                           cpu_kv_cache_bytes=r.cpu_kv_cache_bytes,
                           gpu_memory_utilization=ROLLOUT_POOL_GPU_MEMORY_UTILIZATION)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_dir)
    train_set = PromptDataset.from_files(cfg.data.train_files, tokenizer, r.max_prompt_length,
                                         prompt_format=cfg.data.prompt_format)
    loader = PromptLoader(train_set, r.num_prompts, seed=seed, shuffle=cfg.data.shuffle)
    try:
        return RolloutServer(cfg, pools, engine, loader).run()
    finally:
        engine.shutdown()
