"""Grouped sampling: what to sample (`SamplingConfig`), what comes back (`RolloutOutput`), and how a batch of
prompts is spread over data-parallel rollout engines (`generate_distributed`).

Nothing here imports vLLM: the engine is anything with `generate(prompts, params, prompt_offset=...)` and a
`tensor_parallel_size` (see `RolloutEngineLike`), so the bookkeeping is testable with a fake engine.

Determinism. Every response (prompt p, sample s) is one request whose seed is `sample_seed(seed, p, s)`, with p
the prompt's index in the *whole* batch. vLLM gives each seeded request its own generator, so a response does
not depend on which other requests share its batch, on the order of requests, or on the data-parallel layout.
(Logits can still differ in the last bit between batch shapes; on the tiny test models that never flipped a
sample, but bit-exact batch invariance is not promised by vLLM on every kernel.)
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample the responses of one rollout batch."""

    n: int = 1
    """Responses per prompt (the group size of group-normalised advantages)."""
    temperature: float = 1.0
    """Softmax temperature used for sampling; 0 means greedy. Returned log-probs are not tempered (see
    `RolloutOutput.rollout_logprobs`)."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables it."""
    top_k: int | None = None
    """Sample among the k most likely tokens only; None disables it."""
    max_tokens: int = 256
    """Most tokens generated per response (the eos token included); longer responses end with "length"."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a response in addition to the model's eos; the stop token is kept in the response."""
    seed: int = 0
    """Base seed; response (prompt p, sample s) is sampled with `sample_seed(seed, p, s)`."""
    logprobs: bool = True
    """Return the log-prob of every sampled token (`RolloutOutput.rollout_logprobs`)."""

    def validate(self) -> None:
        """Raise ValueError quoting the offending numbers."""
        problems = []
        if self.n < 1:
            problems.append(f"n={self.n} must be >= 1")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"top_k={self.top_k} must be >= 1 or None")
        if self.max_tokens < 1:
            problems.append(f"max_tokens={self.max_tokens} must be >= 1")
        if problems:
            raise ValueError("invalid SamplingConfig: " + "; ".join(problems))


def rollout_seed(train_seed: int, batch: int) -> int:
    """The base seed of the run's `batch`-th training rollout (1, 2, ...): the same in either placement."""
    return train_seed * 1_000_003 + batch


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one response, a hash of (seed, global prompt index, sample index).

    Hashing rather than `seed + index` keeps neighbouring batches (seed, seed + 1) from sharing samples."""
    digest = hashlib.blake2b(struct.pack("<qqq", seed, prompt_index, sample_index), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def group_requests(num_prompts: int, params: SamplingConfig, prompt_offset: int = 0) -> list[tuple[int, int, int]]:
    """(local prompt index, sample index, seed) of every response, prompt-major: prompt 0's n samples first.
    `prompt_offset` is the global index of local prompt 0, so seeds do not depend on how prompts are split."""
    return [(p, s, sample_seed(params.seed, prompt_offset + p, s))
            for p in range(num_prompts) for s in range(params.n)]


@dataclass
class RolloutOutput:
    """The responses of B prompts x n samples, prompt-major (prompt 0's n responses first), length B*n.

    `response_ids[i]` holds the generated tokens only (no prompt), including the eos / stop token when the
    response ended with one. `rollout_logprobs[i][t]` is log softmax(logits)[token] of the rollout engine at
    temperature 1, before temperature, top-k and top-p ("raw_logprobs" in vLLM): the quantity the trainer
    computes from its own logits, so the two can be compared token by token (e.g. for truncated importance
    sampling). It is *not* the log-prob under the tempered / truncated sampling distribution unless
    temperature is 1 and top-k / top-p are off. Empty lists when log-probs were not requested."""

    prompt_index: torch.Tensor
    """[B*n] int64: index of each response's prompt in the batch given to generate (global index)."""
    sample_index: torch.Tensor
    """[B*n] int64: position of each response within its prompt's group, 0..n-1."""
    response_ids: list[list[int]]
    """B*n lists of generated token ids."""
    rollout_logprobs: list[list[float]]
    """B*n lists of per-token log-probs (raw, temperature 1), or B*n empty lists when not requested."""
    finish_reason: list[str]
    """B*n strings: "stop" (eos or a stop token) or "length" (max_tokens reached)."""
    lengths: torch.Tensor = field(init=False)
    """[B*n] int64: number of generated tokens of each response."""

    def __post_init__(self) -> None:
        self.lengths = torch.tensor([len(r) for r in self.response_ids], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.response_ids)

    @classmethod
    def empty(cls) -> RolloutOutput:
        """No responses (a data-parallel rank that got no prompts)."""
        none = torch.zeros(0, dtype=torch.long)
        return cls(prompt_index=none, sample_index=none.clone(), response_ids=[], rollout_logprobs=[],
                   finish_reason=[])

    @classmethod
    def concat(cls, parts: Sequence[RolloutOutput]) -> RolloutOutput:
        """Join outputs in the given order (prompt indices are kept as they are)."""
        if not parts:
            return cls.empty()
        return cls(prompt_index=torch.cat([p.prompt_index for p in parts]),
                   sample_index=torch.cat([p.sample_index for p in parts]),
                   response_ids=[r for p in parts for r in p.response_ids],
                   rollout_logprobs=[lp for p in parts for lp in p.rollout_logprobs],
                   finish_reason=[f for p in parts for f in p.finish_reason])

    def padded(self, pad_token_id: int = 0, max_length: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [B*n, T] int64, logprobs [B*n, T] float32, mask [B*n, T] bool), right-padded to the longest
        response or `max_length`. Log-probs are 0 where absent (padding, or not requested)."""
        width = max_length if max_length is not None else int(self.lengths.max()) if len(self) else 0
        ids = torch.full((len(self), width), pad_token_id, dtype=torch.long)
        logprobs = torch.zeros((len(self), width), dtype=torch.float32)
        for i, (toks, lps) in enumerate(zip(self.response_ids, self.rollout_logprobs)):
            ids[i, :len(toks)] = torch.tensor(toks[:width], dtype=torch.long)
            if lps:
                logprobs[i, :len(lps)] = torch.tensor(lps[:width], dtype=torch.float32)
        mask = torch.arange(width).unsqueeze(0) < self.lengths.clamp(max=width).unsqueeze(1)
        return ids, logprobs, mask


class RolloutEngineLike(Protocol):
    """What `generate_distributed` needs from an engine (`RolloutEngine` is one)."""

    tensor_parallel_size: int

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingConfig, *,
                 prompt_offset: int = 0) -> RolloutOutput: ...


def shard_bounds(num_items: int, num_shards: int, shard: int) -> tuple[int, int]:
    """[start, stop) of contiguous shard `shard` of `num_items` items; the first `num_items % num_shards`
    shards get one extra item."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} out of range for {num_shards} shards")
    base, extra = divmod(num_items, num_shards)
    start = shard * base + min(shard, extra)
    return start, start + base + (1 if shard < extra else 0)


def engine_replica(group_rank: int, group_size: int, tensor_parallel_size: int) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size) of this process's engine: each run of
    `tensor_parallel_size` consecutive ranks of the group is one vLLM engine (its TP peers)."""
    if group_size % tensor_parallel_size:
        raise ValueError(f"group size {group_size} is not a multiple of the rollout tensor_parallel_size "
                         f"{tensor_parallel_size}")
    return group_rank // tensor_parallel_size, group_size // tensor_parallel_size


def generate_distributed(engine: RolloutEngineLike, prompt_token_ids: list[list[int]], params: SamplingConfig,
                         group=None) -> RolloutOutput:
    """Generate for the full prompt list with every engine of `group` sharing the work; every rank returns the
    same full RolloutOutput, in the original prompt order.

    Each engine (data-parallel rank) takes a contiguous slice of prompts; the TP peers of one engine take the
    same slice, as vLLM's external launcher requires. Every rank of `group` must call this with the same
    prompts and params. The group's ranks must list each engine's TP peers consecutively (true for the world
    group, on which vLLM builds its TP groups). Seeds use global prompt indices, so the samples are the same
    for any number of engines."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return engine.generate(prompt_token_ids, params)
    dp_rank, dp_size = engine_replica(dist.get_rank(group), dist.get_world_size(group),
                                      engine.tensor_parallel_size)
    start, stop = shard_bounds(len(prompt_token_ids), dp_size, dp_rank)
    local = engine.generate(prompt_token_ids[start:stop], params, prompt_offset=start)
    gathered: list[RolloutOutput | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, local, group=group)
    # one copy per engine: the first rank of each run of TP peers
    return RolloutOutput.concat(gathered[::engine.tensor_parallel_size])
