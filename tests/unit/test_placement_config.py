"""rollout.placement / rollout_ranks / max_staleness: impossible sizes fail naming the numbers, and `--dry-run`
shows both pools. A failure pinpoints config_checks.py `placement_problems` / `pool_sizes` or planning/dry_run.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from vapo_megatron.cli import train_main
from vapo_megatron.config import ConfigError, load_config, validate
from vapo_megatron.config_checks import pool_sizes

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CFG = str(EXAMPLES / "qwen2.5-32b" / "vapo.yaml")


def _cfg(*overrides):
    return load_config(CFG, list(overrides))


def test_pool_sizes():
    assert pool_sizes(_cfg(), 64) == (64, 64)
    assert pool_sizes(_cfg("rollout.placement=separate", "rollout.rollout_ranks=32"), 96) == (64, 32)


@pytest.mark.parametrize("overrides,message", [
    (("rollout.placement=separate", "rollout.rollout_ranks=0"), "needs 1 <= rollout.rollout_ranks < world size 64"),
    (("rollout.placement=separate", "rollout.rollout_ranks=64"), "got rollout_ranks=64"),
    (("rollout.rollout_ranks=8",), "rollout.rollout_ranks=8 needs rollout.placement='separate'"),
    (("rollout.max_staleness=1",), "rollout.max_staleness=1 needs rollout.placement='separate'"),
    (("rollout.placement=separate", "rollout.rollout_ranks=8", "rollout.max_staleness=1"),
     "set algorithm.tis_cap"),
    (("rollout.placement=separate", "rollout.rollout_ranks=6", "rollout.vllm_tensor_parallel=4"),
     "rollout ranks 6 is not divisible by rollout.vllm_tensor_parallel 4"),
    (("rollout.placement=separate", "rollout.rollout_ranks=16"),  # 48 trainer ranks for tp 8 x pp 4
     "world size 48 is not divisible by tp(8) x pp(4) x cp(1) = 32"),
    (("rollout.placement=separate", "rollout.rollout_ranks=8", "rollout.max_staleness=-1"),
     "rollout.max_staleness=-1 must be >= 0"),
    (("rollout.placement=nearby",), "rollout.placement"),
    (("rollout.placement=separate", "rollout.rollout_ranks=8", "algorithm.value_source=mc",
      "algorithm.use_critic=false"),
     "algorithm.value_source='mc' with rollout.placement='separate': it samples Monte-Carlo continuations in the "
     "trainer's own vLLM engine"),
    (("rollout.placement=separate", "rollout.rollout_ranks=8", "mc.probe_every=5"),
     "mc.probe_every=5 with rollout.placement='separate'"),
    (("rollout.placement=separate", "rollout.rollout_ranks=8", "algorithm.mc_critic_weight=0.5"),
     "algorithm.mc_critic_weight=0.5 with rollout.placement='separate'"),
    (("rollout.placement=separate", "rollout.rollout_ranks=8", "algorithm.routing_replay=true"),
     "algorithm.routing_replay=true with rollout.placement='separate'"),
])
def test_impossible_placements_fail_naming_the_numbers(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(_cfg(*overrides), 64)
    assert message in str(e.value)


def test_separate_placement_is_valid():
    validate(_cfg("rollout.placement=separate", "rollout.rollout_ranks=32", "rollout.max_staleness=2",
                  "algorithm.tis_cap=2"), 96)


def test_dry_run_shows_both_pools(capsys):
    argv = ["--config", CFG, "--dry-run", "--world-size", "96", "--arch", "32B", "rollout.placement=separate",
            "rollout.rollout_ranks=32", "rollout.max_staleness=1", "algorithm.tis_cap=2"]
    assert train_main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "trainer pool ranks 0..63 (64), rollout pool ranks 64..95 (32)" in out
    assert "max_staleness 1 (asynchronous)" in out
    assert "policy: tp 8 x pp 4 x cp 1 x dp 2 = 64" in out
    assert "does not split" not in out
    # each pool's own plan: Megatron alone on the 64 trainer GPUs, vLLM alone (at 0.85) on the 32 rollout GPUs
    assert "trainer pool 8 node(s) x 8 GPUs of 80 GiB (world size 64, Megatron only); rollout pool 32 GPUs" in out
    assert "vLLM (rollout pool): tp 8, gpu_memory_utilization 0.85 -> budget 68.0 GiB" in out
    assert "rollout batch: 8192 sequences over 4 engine(s) of tp 8 = 2048 per engine" in out
    phases = [line.split()[0] for line in out.splitlines() if line.endswith("%)")]
    assert phases == ["trainer/training", "trainer/weight_sync", "rollout/generation", "rollout/weight_sync"]
    assert "  trainer/weight_sync     27.48 GiB" in out  # the colocated recipe's 67.48 less vLLM's 40 GiB budget
