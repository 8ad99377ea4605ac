"""`vapo-train --dry-run`: the cluster recipes are valid at their stated world sizes, a wrong world size fails
with the numbers, the printed rank groups are megatron-core's, and the 32B recipe's memory plan fits 80 GiB; the
separate-placement recipes (vapo_separate.yaml) too, each pool's plan."""
from __future__ import annotations

from pathlib import Path

import pytest

from vapo_megatron.cli import train_main
from vapo_megatron.config import load_config
from vapo_megatron.parallel.layout import ParallelConfig
from vapo_megatron.planning.dry_run import plan_input_from_config, rank_groups
from vapo_megatron.planning.memory import plan_memory
from vapo_megatron.planning.presets import qwen25_arch, resolve_arch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RECIPES = [("qwen2.5-7b", 8, "7B", 80), ("qwen2.5-32b", 64, "32B", 80), ("qwen2.5-72b", 128, "72B", 80),
           ("qwen3-8b", 16, "Qwen3-8B", 80), ("qwen3-32b", 64, "Qwen3-32B", 80),
           ("qwen3-30b-a3b", 64, "Qwen3-30B-A3B", 80), ("qwen3-235b-a22b", 256, "Qwen3-235B-A22B", 141)]


@pytest.mark.parametrize("recipe,world,arch,gib", RECIPES)
def test_recipes_pass_dry_run(recipe, world, arch, gib, capsys):
    argv = ["--config", str(EXAMPLES / recipe / "vapo.yaml"), "--dry-run", "--world-size", str(world), "--arch", arch,
            "--gpu-memory-gib", str(gib)]
    assert train_main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"config valid for world size {world}" in out and "tp groups" in out and "generation" in out
    assert ("ep groups" in out) == arch.endswith(("A3B", "A22B"))  # the expert grid of the MoE recipes


@pytest.mark.parametrize("recipe,world,arch,gib", RECIPES[3:])
def test_qwen3_recipes_fit_with_headroom(recipe, world, arch, gib):
    """Failure: a Qwen3 recipe's layout no longer fits its GPUs by the memory plan, with 10% left for what the
    plan does not model; its scripts and header must state the world size the plan is for."""
    cfg = load_config(str(EXAMPLES / recipe / "vapo.yaml"))
    plan = plan_memory(plan_input_from_config(cfg, world, resolve_arch(arch), gpu_memory_gib=gib))
    assert plan.fits and max(plan.phases.values()) < 0.9 * gib * 1024**3, plan.problems
    nodes = world // 8
    assert f"--world-size {world} --arch {arch}" in (EXAMPLES / recipe / "vapo.yaml").read_text()
    assert f"#SBATCH --nodes={nodes}" in (EXAMPLES / recipe / "launch_slurm.sbatch").read_text()
    assert f"NNODES=${{NNODES:-{nodes}}}" in (EXAMPLES / recipe / "launch_torchrun.sh").read_text()


SEPARATE_RECIPES = [("qwen2.5-32b", 96, "32B"), ("qwen3-30b-a3b", 96, "Qwen3-30B-A3B")]


@pytest.mark.parametrize("recipe,world,arch", SEPARATE_RECIPES)
def test_separate_recipes_pass_dry_run_and_fit_with_headroom(recipe, world, arch, capsys):
    """Failure: a separate-placement recipe (vapo_separate.yaml) is invalid at its world size, its rollout pool is
    not whole nodes, a pool's plan no longer fits 80 GiB with 10% left, or its scripts state another size."""
    path = EXAMPLES / recipe / "vapo_separate.yaml"
    assert train_main(["--config", str(path), "--dry-run", "--world-size", str(world), "--arch", arch]) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    cfg = load_config(str(path))
    r = cfg.rollout
    assert (r.placement, r.max_staleness >= 1, cfg.algorithm.tis_cap is not None) == ("separate", True, True)
    assert r.rollout_ranks % 8 == 0 and f"rollout pool ranks {world - r.rollout_ranks}..{world - 1}" in out
    assert "rollout/weight_sync" in out and ("ep groups" in out) == arch.endswith("A3B")
    plan = plan_memory(plan_input_from_config(cfg, world, resolve_arch(arch)))
    assert plan.inputs.world_size + plan.inputs.rollout_gpus == world and plan.inputs.rollout_gpus == r.rollout_ranks
    assert plan.fits and max(plan.phases.values()) < 0.9 * 80 * 1024**3, plan.problems
    assert plan.vllm.max_len_sequences >= 8  # the KV cache of an engine holds several full-length sequences
    nodes = world // 8
    assert f"--world-size {world} --arch {arch}" in path.read_text()
    assert f"#SBATCH --nodes={nodes}" in (EXAMPLES / recipe / "launch_slurm_separate.sbatch").read_text()
    assert f"NNODES=${{NNODES:-{nodes}}}" in (EXAMPLES / recipe / "launch_torchrun_separate.sh").read_text()


def test_impossible_expert_layout_fails_naming_the_numbers(capsys):
    argv = ["--config", str(EXAMPLES / "qwen3-30b-a3b" / "vapo.yaml"), "--dry-run", "--world-size", "64", "--arch",
            "Qwen3-30B-A3B", "policy_parallel.ep=48", "critic_parallel.ep=3"]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert "world size 64 is not divisible by etp(1) x ep(48) x pp(2) = 96" in err
    assert "num_experts 128 is not divisible by ep 3" in err


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
