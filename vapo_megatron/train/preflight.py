"""Checks of the user's inputs before any model or vLLM engine is built, each failing with one specific message
(a :class:`~vapo_megatron.errors.PreflightError` or :class:`~vapo_megatron.errors.RunDirError`):

* the run directory: one holding checkpoints or metrics is refused without ``resume`` (continue it) or
  ``overwrite`` (its run outputs are deleted first); ``resume`` needs a complete checkpoint;
* the data files: exist, hold rows, parse; prompts dropped for length are reported with their count;
* the tokenizer: present in model.hf_dir, with a chat template unless data.prompt_format is "plain";
* the reward: importable, callable with one of the supported signatures, and (``verl_default``) a rule for every
  data_source of the training data.

Takes seconds where a typo used to cost a full start-up of vLLM and both models.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from vapo_megatron.config import VapoConfig
from vapo_megatron.errors import PreflightError, RunDirError

RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "curves.png", "hf_policy", "config.yaml")
"""What a run writes into its directory; ``overwrite`` deletes exactly these."""
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def run_dir_outputs(run_dir: Path) -> list[str]:
    """The checkpoints and metrics already in ``run_dir`` (what a fresh run would overwrite)."""
    found = []
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir()):
        found.append(f"checkpoints ({ckpts})")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(f"metrics ({metrics})")
    return found


def check_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool, is_rank0: bool = True) -> None:
    """Refuse to reuse a run directory silently (module docstring); with ``overwrite``, rank 0 deletes the run's
    outputs (RUN_OUTPUTS only: other files the user keeps there stay)."""
    from vapo_megatron.engine.checkpoint import latest_checkpoint

    run_dir = Path(run_dir)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; give one")
    if resume:
        if latest_checkpoint(run_dir) is None:
            raise RunDirError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'} to continue from")
        return
    found = run_dir_outputs(run_dir)
    if found and not overwrite:
        raise RunDirError(f"run directory {run_dir} already holds {' and '.join(found)}. Give --resume to "
                          "continue that run, --overwrite to delete its outputs and start again, or another "
                          "checkpoint.run_dir")
    if found and is_rank0:
        for name in RUN_OUTPUTS:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        print(f"--overwrite: deleted the outputs of the previous run in {run_dir}", flush=True)


def load_tokenizer(cfg: VapoConfig) -> Any:
    """The tokenizer of model.hf_dir; PreflightError when the files are missing or there is no chat template
    (and data.prompt_format is "chat")."""
    from transformers import AutoTokenizer

    hf_dir = Path(cfg.model.hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise PreflightError(f"model.hf_dir {hf_dir} is not a Hugging Face model directory (no config.json)")
    if not any((hf_dir / f).is_file() for f in _TOKENIZER_FILES):
        raise PreflightError(f"model.hf_dir {hf_dir} has no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}); "
                             "copy the tokenizer of the model there")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a broken tokenizer
        raise PreflightError(f"the tokenizer in {hf_dir} does not load: {type(e).__name__}: {e}") from e
    if cfg.data.prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise PreflightError(f"the tokenizer in {hf_dir} has no chat template; a base model needs "
                             "data.prompt_format=plain (message contents as plain text)")
    return tokenizer


def check_data(cfg: VapoConfig, tokenizer: Any) -> list[str]:
    """Parse and tokenise every data file; returns the training rows' data sources. Prints what was loaded and how
    many prompts were dropped for length."""
    from vapo_megatron.data.datasets import DatasetFormatError, PromptDataset, load_prompt_records

    sources: set[str] = set()
    limit = cfg.rollout.max_prompt_length
    for key, files in (("data.train_files", cfg.data.train_files), ("data.val_files", cfg.data.val_files)):
        for path in files:
            try:
                records = load_prompt_records(path)
            except (DatasetFormatError, FileNotFoundError, ValueError) as e:
                raise PreflightError(f"{key}: {e}") from e
            if not records:
                raise PreflightError(f"{key}: {path} is empty (no rows)")
            try:
                dataset = PromptDataset(records, tokenizer, limit, cfg.data.prompt_format)
            except ValueError as e:
                raise PreflightError(f"{key}: {path}: {e}; raise rollout.max_prompt_length") from e
            dropped = dataset.num_dropped_too_long
            print(f"data: {path}: {len(dataset)} prompts" + (f", {dropped} of {len(records)} dropped (longer than "
                  f"rollout.max_prompt_length={limit} tokens)" if dropped else ""), flush=True)
            if key == "data.train_files":
                sources.update(r.data_source for r in records)
    return sorted(sources)


def check_reward(cfg: VapoConfig, data_sources: list[str]) -> None:
    """The reward loads and can be called; ``verl_default`` knows every training data source."""
    from vapo_megatron.config import did_you_mean
    from vapo_megatron.rewards import available_rewards, resolve_reward
    from vapo_megatron.rewards.calling import check_reward_signature
    from vapo_megatron.rewards.registry import is_custom_spec
    from vapo_megatron.rewards.verl_default import is_known_source, known_sources

    name = cfg.reward.name
    if not is_custom_spec(name) and name not in available_rewards():
        known = available_rewards()  # importing the package registers the built-in rewards
        raise PreflightError(f"reward.name={name!r} is neither a registered reward ({', '.join(known)}) nor "
                             "'path/to/file.py:fn' / 'package.module:fn'." + did_you_mean(name, known))
    try:
        fn = resolve_reward(name)
        check_reward_signature(fn, {"correct_score": 1.0, "incorrect_score": 0.0})
    except (ImportError, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        raise PreflightError(f"reward.name={name!r}: {e}") from e
    if name == "verl_default":
        unknown = [s for s in data_sources if not is_known_source(s)]
        if unknown:
            raise PreflightError(f"reward.name=verl_default has no rule for the data_source(s) {unknown} of "
                                 f"data.train_files; known: {', '.join(known_sources())}")


def preflight(cfg: VapoConfig, *, resume: bool = False, overwrite: bool = False, is_rank0: bool = True) -> None:
    """Every check above, in the order a user would fix them."""
    check_run_dir(cfg.checkpoint.run_dir, resume=resume, overwrite=overwrite, is_rank0=is_rank0)
    tokenizer = load_tokenizer(cfg)
    check_reward(cfg, check_data(cfg, tokenizer))
