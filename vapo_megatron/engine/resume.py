"""Which checkpoint `--resume` continues from: the newest complete one of the run, verified against its manifest
(engine/manifest.py), or with `--resume=previous` the newest older one that verifies. A checkpoint that does not
verify is never used silently: the error names its damaged files and offers the newest older checkpoint that
verifies; `previous` prints every checkpoint it skips and why."""
from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from vapo_megatron.engine.checkpoint import (
    checkpoint_problems,
    checkpoint_step,
    checkpoints_root,
    list_checkpoints,
    refusal,
    resolve_checkpoint,
)
from vapo_megatron.errors import CheckpointError


def _offer_refusal(ckpt: Path, problems: list[str], older: list[Path]) -> CheckpointError:
    """The error for a checkpoint that does not verify, offering the newest older one that does."""
    offer = "there is no older checkpoint of this run"
    for c in older:
        if not checkpoint_problems(c):
            offer = (f"the previous complete checkpoint {c.name} verifies: continue from it with --resume=previous "
                     f"(steps after {checkpoint_step(c)} are trained again)")
            break
    else:
        if older:
            offer = f"no older checkpoint verifies either ({', '.join(c.name for c in older)})"
    return refusal(ckpt, problems, offer)


def _say(text: str) -> None:
    if dist.get_rank() == 0:
        print(text, flush=True)


def select_resume_checkpoint(run_dir: str | Path, mode: bool | str | Path = True) -> Path:
    """The checkpoint `--resume` continues from, verified (collective). `mode`: True or "latest" (the newest
    complete checkpoint; CheckpointError naming what is damaged, and offering an older one that verifies, when it
    does not verify), "previous" (the newest one older than the newest that verifies; every skipped checkpoint and
    why is printed), or a checkpoint directory (verified as it is)."""
    if isinstance(mode, Path) or (isinstance(mode, str) and mode not in ("latest", "previous")):
        ckpt = resolve_checkpoint(mode)
        problems = checkpoint_problems(ckpt)
        if problems:
            raise _offer_refusal(ckpt, problems, [c for c in list_checkpoints(ckpt.parent.parent)[::-1]
                                            if checkpoint_step(c) < checkpoint_step(ckpt)])
        return ckpt
    found = list_checkpoints(run_dir)[::-1]  # newest first
    if not found:
        raise FileNotFoundError(f"no checkpoint in {checkpoints_root(run_dir)}")
    newest, older = found[0], found[1:]
    if mode in (True, "latest"):
        problems = checkpoint_problems(newest)
        if problems:
            raise _offer_refusal(newest, problems, older)
        return newest
    if not older:
        raise CheckpointError(f"--resume=previous: {checkpoints_root(run_dir)} holds only {newest.name}; there is "
                              "no previous checkpoint (give --resume for that one)")
    problems = checkpoint_problems(newest)
    _say(f"--resume=previous: skipping the newest checkpoint {newest}: "
         + ("; ".join(problems) if problems else "it verifies, skipped as asked"))
    for ckpt in older:
        problems = checkpoint_problems(ckpt)
        if not problems:
            _say(f"--resume=previous: {ckpt} verifies; resuming from it")
            return ckpt
        _say(f"--resume=previous: skipping {ckpt}: {'; '.join(problems)}")
    raise CheckpointError(f"--resume=previous: no checkpoint older than {newest.name} verifies "
                          f"({', '.join(c.name for c in older)}); see the reasons above")
