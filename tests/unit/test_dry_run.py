"""`vapo-train --dry-run`: the cluster recipes are valid at their stated world sizes, a wrong world size fails
with the numbers, the printed rank groups are megatron-core's, and the 32B recipe's memory plan fits 80 GiB."""
from __future__ import annotations

from pathlib import Path

import pytest

from vapo_megatron.cli import train_main
from vapo_megatron.config import load_config
from vapo_megatron.parallel.layout import ParallelConfig
from vapo_megatron.planning.dry_run import plan_input_from_config, rank_groups
from vapo_megatron.planning.memory import plan_memory
from vapo_megatron.planning.presets import qwen25_arch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RECIPES = [("qwen2.5-7b", 8, "7B"), ("qwen2.5-32b", 64, "32B"), ("qwen2.5-72b", 128, "72B")]


@pytest.mark.parametrize("recipe,world,arch", RECIPES)
def test_recipes_pass_dry_run(recipe, world, arch, capsys):
    argv = ["--config", str(EXAMPLES / recipe / "vapo.yaml"), "--dry-run", "--world-size", str(world), "--arch", arch]
    assert train_main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"config valid for world size {world}" in out and "tp groups" in out and "generation" in out


def test_wrong_world_size_fails_naming_the_numbers(capsys):
    argv = ["--config", str(EXAMPLES / "qwen2.5-32b" / "vapo.yaml"), "--dry-run", "--world-size", "48", "--arch",
            "32B"]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert "world size 48 is not divisible by tp(8) x pp(4) x cp(1) = 32" in err


def test_missing_model_dir_asks_for_arch(capsys):
    argv = ["--config", str(EXAMPLES / "qwen2.5-32b" / "vapo.yaml"), "--dry-run", "--world-size", "64"]
    assert train_main(argv) == 2
    assert "--arch" in capsys.readouterr().err


def test_rank_groups_follow_megatron_order():
    groups = rank_groups(ParallelConfig(tp=2, pp=2, cp=1), 8)  # dp = 2
    assert groups["tp"][:2] == [[0, 1], [2, 3]]
    assert groups["dp"][:2] == [[0, 2], [1, 3]]
    assert groups["pp"][0] == [0, 4]
    assert sorted(r for g in groups["tp"] for r in g) == list(range(8))


def test_32b_recipe_fits_80gib():
    cfg = load_config(str(EXAMPLES / "qwen2.5-32b" / "vapo.yaml"))
    plan = plan_memory(plan_input_from_config(cfg, 64, qwen25_arch("32B")))
    assert plan.fits, plan.problems
    assert max(plan.phases.values()) < 0.9 * 80 * 1024**3  # at least 10% headroom for what is not modelled
