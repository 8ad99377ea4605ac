"""Prompt datasets: JSONL or Parquet rows -> :class:`PromptRecord` -> chat-template token ids.

Two row forms are read (keys not listed are kept in ``PromptRecord.metadata``):

* plain: ``{"prompt": "What is 1+1?", "ground_truth": "2"}``, optionally with ``"data_source"``;
* verl: ``{"prompt": [{"role": "user", "content": "..."}], "reward_model": {"ground_truth": "2", ...},
  "data_source": "gsm8k", ...}`` (the other ``reward_model`` keys, such as ``style``, go to metadata).

A prompt may be a string (wrapped into one user message) or a list of chat messages, in either form. A ground
truth may be a string or a number (numbers are written as ``str(value)``). Every malformed row raises
:class:`DatasetFormatError` naming the file, the line (JSONL, 1-based) or row (Parquet, 0-based) and the problem.

:class:`PromptDataset` renders each record with the tokenizer's chat template (``add_generation_prompt=True``),
tokenises it, and drops prompts longer than ``max_prompt_length`` tokens, counting them in
``num_dropped_too_long`` (a silent drop would bias the training distribution toward short problems unnoticed).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_SUFFIXES = (".jsonl", ".parquet")
_CONSUMED_KEYS = ("prompt", "ground_truth", "reward_model", "data_source")


class DatasetFormatError(ValueError):
    """A row of a prompt file does not have the expected shape; the message names file, line/row and field."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt, normalised from either row form."""

    messages: list[dict[str, str]]
    """Chat messages ``{"role", "content"}``; a plain-string prompt becomes one user message."""
    ground_truth: str
    """The reference answer given to the reward function."""
    data_source: str
    """Where the row comes from (routes it to a reward); the loader's default when the row has none."""
    index: int
    """Position of the row among all rows read (across files, before any prompt is dropped)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Every other key of the row, unchanged (e.g. ``extra_info``, ``ability``, ``num_steps``)."""


@dataclass(frozen=True)
class TokenizedPrompt:
    """A record with its rendered chat prompt and token ids."""

    record: PromptRecord
    text: str
    """The prompt after the chat template, generation prompt included."""
    input_ids: list[int]


def _where(path: Path, position: int, is_parquet: bool) -> str:
    return f"{path}: row {position}" if is_parquet else f"{path}:{position}"


def _parse_messages(prompt: Any, where: str) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
        raise DatasetFormatError(f"{where}: 'prompt' must be a string or a non-empty list of chat messages, "
                                 f"got {type(prompt).__name__}{'' if prompt else ' (empty)'}")
    messages = []
    for i, message in enumerate(prompt):
        if not isinstance(message, dict):
            raise DatasetFormatError(f"{where}: prompt message {i} must be an object with 'role' and 'content', "
                                     f"got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                got = "missing" if key not in message else f"a {type(message[key]).__name__}"
                raise DatasetFormatError(f"{where}: prompt message {i} needs a string '{key}', it is {got}")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _parse_ground_truth(row: dict[str, Any], where: str) -> str:
    reward_model = row.get("reward_model")
    if reward_model is not None and not isinstance(reward_model, dict):
        raise DatasetFormatError(f"{where}: 'reward_model' must be an object, got {type(reward_model).__name__}")
    # Parquet fills a column a row lacks with null, so a null counts as absent.
    in_top = row.get("ground_truth") is not None
    in_rm = reward_model is not None and reward_model.get("ground_truth") is not None
    if in_top and in_rm:
        raise DatasetFormatError(f"{where}: both 'ground_truth' and 'reward_model.ground_truth' are given; "
                                 "keep one")
    if not (in_top or in_rm):
        raise DatasetFormatError(f"{where}: missing 'ground_truth' (plain form) or 'reward_model.ground_truth' "
                                 "(verl form)")
    value = row["ground_truth"] if in_top else reward_model["ground_truth"]
    name = "ground_truth" if in_top else "reward_model.ground_truth"
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DatasetFormatError(f"{where}: '{name}' must be a string or a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise DatasetFormatError(f"{where}: '{name}' is {value}")
    return value if isinstance(value, str) else str(value)


def parse_row(row: Any, *, where: str, index: int, default_data_source: str = "") -> PromptRecord:
    """Normalise one row of either form; ``where`` (``file:line``) prefixes every error message."""
    if not isinstance(row, dict):
        raise DatasetFormatError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if row.get("prompt") is None:
        present = sorted(k for k, v in row.items() if v is not None)
        raise DatasetFormatError(f"{where}: missing 'prompt' (keys: {present})")
    messages = _parse_messages(row["prompt"], where)
    ground_truth = _parse_ground_truth(row, where)
    data_source = row.get("data_source", default_data_source)
    if data_source is None:
        data_source = default_data_source
    if not isinstance(data_source, str):
        raise DatasetFormatError(f"{where}: 'data_source' must be a string, got {type(data_source).__name__}")
    metadata = {k: v for k, v in row.items() if k not in _CONSUMED_KEYS}
    rest = {k: v for k, v in (row.get("reward_model") or {}).items() if k != "ground_truth"}
    if rest:
        metadata["reward_model"] = rest
    return PromptRecord(messages=messages, ground_truth=ground_truth, data_source=data_source, index=index,
                        metadata=metadata)


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                where = "column" if e.msg.endswith(" at") else "at column"  # "Unterminated string starting at"
                raise DatasetFormatError(f"{path}:{line_no}: invalid JSON ({e.msg} {where} {e.colno})") from None


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DatasetFormatError(f"{path}: not a readable Parquet file ({e})") from e
    row_no = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield row_no, row
            row_no += 1


def load_prompt_records(paths: str | Path | Sequence[str | Path], *,
                        default_data_source: str = "") -> list[PromptRecord]:
    """Read and validate every row of one or several ``.jsonl`` / ``.parquet`` files, in order."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    records: list[PromptRecord] = []
    for raw_path in paths:
        path = Path(raw_path)
        if not path.is_file():
            raise FileNotFoundError(f"prompt data file not found: {path}")
        if path.suffix not in SUPPORTED_SUFFIXES:
            raise ValueError(f"unsupported prompt file {path}: the suffix must be one of {SUPPORTED_SUFFIXES}")
        is_parquet = path.suffix == ".parquet"
        rows = _iter_parquet(path) if is_parquet else _iter_jsonl(path)
        for position, row in rows:
            records.append(parse_row(row, where=_where(path, position, is_parquet), index=len(records),
                                     default_data_source=default_data_source))
    return records


def render_prompts(records: Sequence[PromptRecord], tokenizer: Any,
                   prompt_format: str = "chat") -> tuple[list[str], list[list[int]]]:
    """Chat-template texts (with the generation prompt) and their token ids. The template already writes any
    special tokens it wants, so the tokenizer must not add its own (a double BOS otherwise). ``prompt_format=
    "plain"`` (base models without a chat template): the messages' contents joined by blank lines, tokenised
    with the tokenizer's own special tokens (its BOS, if any)."""
    if prompt_format == "plain":
        texts = ["\n\n".join(m["content"] for m in r.messages) for r in records]
    else:
        texts = [tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False)
                 for r in records]
    if not texts:
        return [], []
    ids = tokenizer(texts, add_special_tokens=prompt_format == "plain")["input_ids"]
    return texts, [list(x) for x in ids]


class PromptDataset(Sequence[TokenizedPrompt]):
    """Tokenised prompts no longer than ``max_prompt_length`` tokens; ``num_dropped_too_long`` counts the rest."""

    def __init__(self, records: Sequence[PromptRecord], tokenizer: Any, max_prompt_length: int,
                 prompt_format: str = "chat") -> None:
        if max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
        if not records:
            raise ValueError("no prompts: the prompt files hold no rows")
        self.max_prompt_length = max_prompt_length
        texts, ids = render_prompts(records, tokenizer, prompt_format)
        self._items = [TokenizedPrompt(record=r, text=t, input_ids=x)
                       for r, t, x in zip(records, texts, ids) if len(x) <= max_prompt_length]
        # How many prompts were longer than `max_prompt_length` tokens and so dropped.
        self.num_dropped_too_long = len(records) - len(self._items)
        if not self._items:
            raise ValueError(f"no prompt is left: all {len(records)} prompts are longer than "
                             f"max_prompt_length={max_prompt_length} tokens")

    @classmethod
    def from_files(cls, paths: str | Path | Sequence[str | Path], tokenizer: Any, max_prompt_length: int, *,
                   default_data_source: str = "", prompt_format: str = "chat") -> PromptDataset:
        """Load, validate and tokenise the rows of one or several files."""
        return cls(load_prompt_records(paths, default_data_source=default_data_source), tokenizer,
                   max_prompt_length, prompt_format)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> TokenizedPrompt:  # type: ignore[override]
        return self._items[i]


class PromptSampler:
    """An endless, deterministic stream of batches of dataset indices, resumable exactly.

    Epoch ``e`` visits the indices in the permutation drawn from ``(seed, e)`` (or in order without
    ``shuffle``), ``batch_size`` at a time. With ``drop_last`` the ``num_prompts % batch_size`` prompts left at
    the end of an epoch are skipped (the next epoch's permutation differs, so none is skipped for good), which
    keeps every batch the same size, as group sampling wants. ``state_dict()`` holds the position; a sampler
    loaded from it yields exactly the batches the saved one would have yielded next.
    """

    def __init__(self, num_prompts: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_prompts < (batch_size if drop_last else 1):
            raise ValueError(f"{num_prompts} prompts cannot fill one batch of {batch_size} with drop_last="
                             f"{drop_last}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_prompts, self.batch_size, self.seed = num_prompts, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch = 0  # the epoch the next batch comes from
        self.batch_in_epoch = 0  # batches of the current epoch already yielded
        self._order: list[int] | None = None

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_prompts, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def epoch_order(self, epoch: int) -> list[int]:
        """The order in which epoch ``epoch`` visits the indices."""
        if not self.shuffle:
            return list(range(self.num_prompts))
        import numpy as np

        # A SeedSequence of (seed, epoch): independent, reproducible streams per epoch, no global RNG touched.
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts).tolist()

    def next_batch(self) -> list[int]:
        """The next batch of indices (moving to the next epoch when this one is exhausted)."""
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
        start = self.batch_in_epoch * self.batch_size
        self.batch_in_epoch += 1
        return self._order[start:start + self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The position and the settings it is only meaningful with (plain ints and bools)."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "num_prompts": self.num_prompts, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "drop_last": self.drop_last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; raises when the saved settings differ from this sampler's (the same
        position would then name different prompts, so the run would not resume exactly)."""
        mine = self.state_dict()
        differ = [f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in
                  ("seed", "num_prompts", "batch_size", "shuffle", "drop_last") if state.get(k) != mine[k]]
        if differ:
            raise ValueError("cannot resume the prompt sampler, settings changed: " + "; ".join(differ))
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or not 0 <= batch <= self.batches_per_epoch:
            raise ValueError(f"invalid sampler position epoch={epoch}, batch_in_epoch={batch} "
                             f"(batches_per_epoch={self.batches_per_epoch})")
        self.epoch, self.batch_in_epoch, self._order = epoch, batch, None


class PromptLoader:
    """Batches of ``batch_size`` :class:`TokenizedPrompt` from a dataset, in :class:`PromptSampler` order;
    iterate it (endless) or call :meth:`next_batch`; ``state_dict()`` makes a resumed run continue exactly."""

    def __init__(self, dataset: Sequence[TokenizedPrompt], batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True) -> None:
        self.dataset = dataset
        self.sampler = PromptSampler(len(dataset), batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def next_batch(self) -> list[TokenizedPrompt]:
        return [self.dataset[i] for i in self.sampler.next_batch()]

    def __iter__(self) -> Iterator[list[TokenizedPrompt]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
