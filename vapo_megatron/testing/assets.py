"""Assets of the trainer's end-to-end tests: a tiny Qwen2-shaped model and a short synthetic task."""
from __future__ import annotations

from pathlib import Path


def tiny_task_assets(root: Path, *, num_val: int) -> Path:
    """`root/model` (tiny Qwen2, seed 0) and `root/data` (64 training prompts of 1-2 steps, `num_val` held out,
    8 demonstrations, seed 0); returns `root`."""
    from vapo_megatron.data.synthetic import SyntheticDifficulty, write_synthetic_task
    from vapo_megatron.models.tiny import save_tiny_hf_model

    save_tiny_hf_model(root / "model", "qwen2", seed=0)
    write_synthetic_task(root / "data", num_train=64, num_val=num_val, num_demonstrations=8, seed=0,
                         difficulty=SyntheticDifficulty(min_steps=1, max_steps=2))
    return root
