"""The batch of one RL step, typed: what rollout creates and what each later phase adds.

`RLBatch` holds n rows (one response each) and declares every field with the phase that sets it:

- rollout (`build_rl_batch`): `input_ids`, `prompt_lens`, `resp_mask`, `rollout_logprobs`, `lengths`,
  `seq_lens`, `prompt_index`;
- rewards (`train.scoring.score_rollout`): `scores`, `is_correct`, `truncated`, `reward_stats`,
  `first_error_tokens`;
- routing record (`train.loop.Trainer.rollout`, with `algorithm.routing_replay` only): `routed_experts`;
- engine forwards (`Trainer.old_logprobs_and_values`): `old_logprobs`, `old_values` (with a critic only);
- advantages (`Trainer.advantages`): `advantages`; `returns` and `lam_policy` (GAE only, not GRPO).

A field of a later phase reads as an error until its phase sets it (`FieldNotSetError` names the field and the
phase); `batch.has(name)` asks without raising. Every field is per row except `reward_stats` (batch-level counts);
`batch.rows(idx)` keeps exactly the per-row fields. `targets` (input_ids shifted left) and `resp_pos` (the position
whose output scores response token j: prompt_len - 1 + j) are not stored: they are derived for the rows that need
them (`micro_batch`), so a rank never holds them for the whole batch (docs/architecture.md, per-rank memory).

`MicroBatch` is the engines' typed view of a few rows: what the model and the losses read (engine/objectives.py).
These two are the only batch contract: the engines take nothing else (tests and tools build an `RLBatch` with
`RLBatch.from_tensors` or `build_rl_batch`, or a `MicroBatch` directly). No megatron, no torch.distributed:
this module is in the pure layer.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

Tensor = torch.Tensor
TokenSpan = tuple[int, int]


class FieldNotSetError(AttributeError):
    """A batch field was read before the phase that sets it ran."""


class _PhaseField:
    """A dataclass field set by a later phase: reading it before that phase raises FieldNotSetError."""

    def __init__(self, phase: str) -> None:
        self.phase = phase

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.slot = name, "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return None  # the dataclass default: not set
        value = obj.__dict__.get(self.slot)
        if value is None:
            raise FieldNotSetError(f"RLBatch.{self.name} is set by the {self.phase} phase, which has not run for this "
                                   f"batch (or does not produce it in this configuration); check batch.has("
                                   f"{self.name!r}) first")
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.slot] = None if isinstance(value, _PhaseField) else value  # the default: not set


def _later(phase: str, per_row: bool = True) -> Any:
    return field(default=_PhaseField(phase), metadata={"per_row": per_row, "phase": phase})


ROUTING = "routing record (Trainer.rollout with algorithm.routing_replay)"
VERSION = "rollout (train.scoring.score_output: the policy version of the engine that sampled each row)"
REWARDS, FORWARDS, ADVANTAGES = "rewards (train.scoring.score_rollout)", \
    "engine forwards (Trainer.old_logprobs_and_values)", "advantages (Trainer.advantages)"


def _take(value: Any, idx: Any) -> Any:
    """Rows `idx` of a per-row tensor or list."""
    if isinstance(value, Tensor):
        return value[idx]
    if isinstance(idx, slice):
        return value[idx]
    return [value[int(i)] for i in (idx.tolist() if isinstance(idx, Tensor) else idx)]


@dataclass(eq=False, repr=False)
class RLBatch:
    """The n rows of one RL step (see the module docstring for who sets which field)."""

    input_ids: Tensor          # [n, S] long, prompt + response, right padded
    prompt_lens: Tensor        # [n] long
    resp_mask: Tensor          # [n, R] float, 1 on response tokens
    rollout_logprobs: Tensor   # [n, R] float, vLLM's log-probs of the sampled tokens
    lengths: Tensor            # [n] long, response tokens
    seq_lens: Tensor           # [n] long, prompt + response tokens
    prompt_index: Tensor       # [n] long, the prompt (of this step's prompts) each row answers
    scores: Optional[Tensor] = _later(REWARDS)              # [n] float, after the overlong penalty
    is_correct: Optional[Tensor] = _later(REWARDS)          # [n] bool
    truncated: Optional[Tensor] = _later(REWARDS)           # [n] bool, stopped at max_response_length
    reward_stats: Optional[dict] = _later(REWARDS, per_row=False)   # {"reward_errors", "reward_timeouts"}
    first_error_tokens: Optional[list] = _later(REWARDS)    # [n] TokenSpan | None per row
    policy_version: Optional[Tensor] = _later(VERSION)      # [n] long, the weights' version that sampled the row
    routed_experts: Optional[Tensor] = _later(ROUTING)      # [n, S, moe layers, k] uint8/int16, vLLM's experts
    old_logprobs: Optional[Tensor] = _later(FORWARDS)       # [n, R] float32, the policy before the update
    old_values: Optional[Tensor] = _later(FORWARDS)         # [n, R] float32, the critic before the update
    advantages: Optional[Tensor] = _later(ADVANTAGES)       # [n, R] float
    returns: Optional[Tensor] = _later(ADVANTAGES)          # [n, R] float, critic targets (GAE)
    lam_policy: Optional[Tensor] = _later(ADVANTAGES)       # [n] float, GAE's per-row policy lambda

    @classmethod
    def from_tensors(cls, input_ids: Tensor, prompt_lens: Tensor | Sequence[int], resp_mask: Tensor, *,
                     rollout_logprobs: Tensor | None = None, **later: Any) -> RLBatch:
        """A batch from tensors a caller already has (tests, tools, benchmarks): `input_ids` [n, S], each row's
        prompt length, `resp_mask` [n, R] (1 on the row's response tokens, left aligned), and any later-phase
        fields by name (`old_logprobs=...`, `returns=...`). `lengths`, `seq_lens` and `prompt_index` are derived;
        `rollout_logprobs` defaults to zeros. Unknown field names raise TypeError (the dataclass does)."""
        prompt_lens = torch.as_tensor(prompt_lens, dtype=torch.long)
        n, width = input_ids.shape
        lengths = resp_mask.sum(1).long()
        if prompt_lens.shape != (n,) or resp_mask.shape[0] != n:
            raise ValueError(f"RLBatch.from_tensors: {n} rows of input_ids, {tuple(prompt_lens.shape)} prompt "
                             f"lengths, {tuple(resp_mask.shape)} resp_mask")
        if int((prompt_lens + lengths).max()) > width:
            raise ValueError(f"RLBatch.from_tensors: a row's prompt + response ({int((prompt_lens + lengths).max())}"
                             f" tokens) is longer than input_ids ({width})")
        logprobs = torch.zeros_like(resp_mask, dtype=torch.float32) if rollout_logprobs is None else rollout_logprobs
        return cls(input_ids=input_ids, prompt_lens=prompt_lens, resp_mask=resp_mask, rollout_logprobs=logprobs,
                   lengths=lengths, seq_lens=prompt_lens + lengths, prompt_index=torch.arange(n), **later)

    # ---- reading ----------------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.input_ids.shape[0]

    def __len__(self) -> int:
        return self.n

    def has(self, name: str) -> bool:
        """Whether field `name` holds a value (never raises)."""
        return name in FIELD_NAMES and self.__dict__.get("_" + name, self.__dict__.get(name)) is not None

    @property
    def targets(self) -> Tensor:
        """[n, S] the next token at every position (derived: use `micro_batch` for a few rows)."""
        return torch.roll(self.input_ids, -1, dims=1)

    @property
    def resp_pos(self) -> Tensor:
        """[n, R] the position whose output scores response token j (derived; `response_positions` for rows)."""
        return self.response_positions(slice(None))

    def response_positions(self, rows: Any, width: int | None = None) -> Tensor:
        """resp_pos of `rows`: prompt_len - 1 + j, clamped into the first `width` positions (default S)."""
        seq, resp = self.input_ids.shape[1], self.resp_mask.shape[1]
        limit = min(seq, width or seq) - 1
        lens = self.prompt_lens[rows].reshape(-1, 1)
        return (lens - 1 + torch.arange(resp, device=lens.device)).clamp(max=limit)

    def __repr__(self) -> str:
        set_ = [name for name in FIELD_NAMES if self.has(name)]
        return f"RLBatch(n={self.n}, S={self.input_ids.shape[1]}, R={self.resp_mask.shape[1]}, fields={set_})"

    # ---- slicing ----------------------------------------------------------------------------------------
    def rows(self, idx: Any) -> RLBatch:
        """The rows `idx` (index tensor, list or slice; a slice gives views) of every per-row field that is set;
        batch-level fields (`reward_stats`) are left out, unset fields stay unset."""
        values = {f.name: self.__dict__.get("_" + f.name, self.__dict__.get(f.name)) for f in dataclasses.fields(self)}
        return RLBatch(**{name: (_take(v, idx) if v is not None and name in ROW_FIELDS else None)
                          for name, v in values.items()})

    def to(self, device: torch.device | str) -> RLBatch:
        """Every tensor field on `device`."""
        out = self.rows(slice(None))
        for name in FIELD_NAMES:
            if out.has(name) and isinstance(getattr(out, name), Tensor):
                setattr(out, name, getattr(out, name).to(device))
        if self.has("reward_stats"):
            out.reward_stats = self.reward_stats
        return out

    def micro_batch(self, rows: Sequence[int] | Tensor | slice, width: int | None = None) -> MicroBatch:
        """The engines' view of `rows`, the token dimension cut to `width` (default S): `targets` and `resp_pos`
        are derived here for these rows only (padded response slots are clamped into the width; they are masked
        out of every loss and metric)."""
        idx = rows if isinstance(rows, (slice, Tensor)) else torch.tensor(list(rows), dtype=torch.long)
        seq = self.input_ids.shape[1]
        width = width or seq
        ids = self.input_ids[idx]
        loss_inputs = {name: getattr(self, name)[idx] for name in MICRO_FIELDS if self.has(name)}
        routed = self.routed_experts[idx][:, :width] if self.has("routed_experts") else None
        return MicroBatch(input_ids=ids[:, :width], targets=torch.roll(ids, -1, dims=1)[:, :width],
                          resp_pos=self.response_positions(idx, width), resp_mask=self.resp_mask[idx],
                          seq_lens=self.seq_lens[idx], routed_experts=routed, **loss_inputs)


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(RLBatch))
ROW_FIELDS = tuple(f.name for f in dataclasses.fields(RLBatch) if f.metadata.get("per_row", True))
MICRO_FIELDS = ("old_logprobs", "old_values", "advantages", "returns", "is_correct", "truncated", "rollout_logprobs")
"""The per-row fields a micro-batch carries besides the tokens: what the losses read."""


@dataclass(eq=False)
class MicroBatch:
    """A few rows as the model and the losses see them. `input_ids` [m, S'] (S' the micro-batch's width),
    `targets` [m, S'], `resp_pos` [m, R], `resp_mask` [m, R], `seq_lens` [m]; the loss inputs of the step when
    the batch has them; `tp_group` / `cp_group` set by the schedule (engine/schedule.py).

    Packed (THD, data/packing.py): `input_ids` and `targets` are one stream [1, T], `cu_seqlens` / `cu_seqlens_padded`
    ([m + 1], or [m + 2] with a final padding segment; int32) say where each row's tokens and slot are, and
    `resp_pos` [m, R] points into the stream, and `routed_experts` (routing replay: [m, S', layers, k] padded,
    the experts of every token) becomes [1, T, layers, k]. Everything else stays per row."""

    input_ids: Tensor
    targets: Optional[Tensor] = None
    resp_pos: Optional[Tensor] = None
    resp_mask: Optional[Tensor] = None
    seq_lens: Optional[Tensor] = None
    old_logprobs: Optional[Tensor] = None
    old_values: Optional[Tensor] = None
    advantages: Optional[Tensor] = None
    returns: Optional[Tensor] = None
    is_correct: Optional[Tensor] = None
    truncated: Optional[Tensor] = None
    cu_seqlens: Optional[Tensor] = None
    cu_seqlens_padded: Optional[Tensor] = None
    rollout_logprobs: Optional[Tensor] = None
    routed_experts: Optional[Tensor] = None
    tp_group: Any = None
    cp_group: Optional[tuple[int, Any]] = None

    @property
    def packed(self) -> bool:
        """Whether the rows are packed into one stream (THD)."""
        return self.cu_seqlens_padded is not None

    def replace(self, **changes: Any) -> MicroBatch:
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MicroBatch:
        def move(v: Any) -> Any:
            return v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v

        return self.replace(**{n: move(getattr(self, n)) for n in _TENSOR_NAMES})


_TENSOR_NAMES = ("input_ids", "targets", "resp_pos", "resp_mask", "seq_lens", "cu_seqlens", "cu_seqlens_padded",
                 "routed_experts", *MICRO_FIELDS)


def build_rl_batch(prompt_ids: list[list[int]], prompt_index: torch.Tensor, response_ids: list[list[int]],
                   rollout_logprobs: list[list[float]], *, pad_to_multiple: int = 8, pad_id: int = 0) -> RLBatch:
    """Concatenate each prompt with its response (right padded to S, a multiple of `pad_to_multiple`, which
    sequence parallelism needs) and mask the response tokens: the rollout phase's fields of an `RLBatch`;
    `seq_lens[i]` counts row i's prompt + response tokens."""
    n = len(response_ids)
    plens = [len(prompt_ids[int(p)]) for p in prompt_index]
    rlens = [len(r) for r in response_ids]
    width = max(p + r for p, r in zip(plens, rlens))
    seq = -(-width // pad_to_multiple) * pad_to_multiple
    resp = max(1, max(rlens))
    input_ids = torch.full((n, seq), pad_id, dtype=torch.long)
    resp_mask = torch.zeros(n, resp)
    logprobs = torch.zeros(n, resp)
    for i, (p, r) in enumerate(zip(plens, rlens)):
        input_ids[i, :p] = torch.tensor(prompt_ids[int(prompt_index[i])])
        if r:
            input_ids[i, p:p + r] = torch.tensor(response_ids[i])
            logprobs[i, :r] = torch.tensor(rollout_logprobs[i][:r])
        resp_mask[i, :r] = 1.0
    return RLBatch(input_ids=input_ids, prompt_lens=torch.tensor(plens, dtype=torch.long), resp_mask=resp_mask,
                   rollout_logprobs=logprobs, lengths=torch.tensor(rlens),
                   seq_lens=torch.tensor([p + r for p, r in zip(plens, rlens)]), prompt_index=prompt_index.clone())
