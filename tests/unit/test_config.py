"""The run config: YAML + dotted overrides, type coercion, error messages, validation, dump/load round trip.

A failure here points at vapo_megatron/config.py: loading (unknown keys, types, number parsing), a validation
rule (the parametrised cases name the rule), or the dump -> load round trip."""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
from types import SimpleNamespace

import pytest
import yaml

from vapo_megatron import config as config_module
from vapo_megatron.config import (
    ConfigError,
    VapoConfig,
    dump_yaml,
    load_config,
    save_config,
    to_dict,
    validate,
)
from vapo_megatron.parallel.layout import ParallelConfig

REQUIRED = ["model.hf_dir=/models/qwen", "data.train_files=[train.jsonl]"]
QWEN32B = SimpleNamespace(num_layers=64, num_heads=40, num_kv_heads=8, max_position_embeddings=131072)


def _cfg(*overrides: str) -> VapoConfig:
    return load_config(None, [*REQUIRED, *overrides])


def _problems(cfg: VapoConfig, world_size: int = 1, arch=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size, arch)
    return info.value.problems


def test_yaml_then_overrides(tmp_path):
    """YAML values replace defaults, overrides replace YAML, untouched fields keep their (per-section) defaults."""
    path = tmp_path / "run.yaml"
    path.write_text("model: {hf_dir: /m}\nrollout:\n  n: 8\n  num_prompts: 64\nactor_optim:\n  lr: 1e-6\n"
                    "critic_optim:\n  weight_decay: 0\neval:\n")
    cfg = load_config(str(path), ["rollout.n=4", "train.mini_batch_size=128"])
    assert (cfg.model.hf_dir, cfg.rollout.n, cfg.rollout.num_prompts, cfg.train.mini_batch_size) == ("/m", 4, 64, 128)
    assert cfg.actor_optim.lr == 1e-6 and type(cfg.actor_optim.lr) is float
    assert cfg.critic_optim.lr == 2e-6 and cfg.critic_optim.weight_decay == 0.0  # critic default kept
    assert cfg.eval == VapoConfig().eval  # an empty section is the defaults


@pytest.mark.parametrize("override, key, expected", [
    ("actor_optim.lr=1e-6", "actor_optim.lr", 1e-6),
    ("critic_optim.lr=3E-7", "critic_optim.lr", 3e-7),
    ("algorithm.dual_clip=3", "algorithm.dual_clip", 3.0),
    ("algorithm.tis_cap=2", "algorithm.tis_cap", 2.0),
    ("rollout.bucket_bytes=1e6", "rollout.bucket_bytes", 1_000_000),
    ("rollout.top_k=null", "rollout.top_k", None),
    ("rollout.top_k=50", "rollout.top_k", 50),
    ("logging.progress_bar=false", "logging.progress_bar", False),
    ("data.val_files=[a.jsonl, b.parquet]", "data.val_files", ["a.jsonl", "b.parquet"]),
    ("data.val_files=a.jsonl", "data.val_files", ["a.jsonl"]),
    ("checkpoint.run_dir=2024", "checkpoint.run_dir", "2024"),
    ("reward.name=rewards/my.py:score", "reward.name", "rewards/my.py:score"),
    ("policy_parallel.tp=2", "policy_parallel.tp", 2),
])
def test_override_values_take_the_field_type(override, key, expected):
    value = functools.reduce(getattr, key.split("."), load_config(None, [override]))
    assert value == expected and type(value) is type(expected)


def test_unknown_keys_list_valid_ones_and_suggest(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["algorithm.eps_hgh=0.3", "rollot.n=4"])
    message = str(info.value)
    assert "unknown key 'algorithm.eps_hgh'" in message and "valid keys of algorithm:" in message
    assert "eps_low, eps_high" in message and "Did you mean 'algorithm.eps_high'?" in message
    assert "unknown key 'rollot'" in message and "Did you mean 'rollout'?" in message
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  mini_batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"(?s)bad\.yaml.*Did you mean 'train\.mini_batch_size'"):
        load_config(str(path), [])


def test_type_errors_name_key_type_and_value():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["rollout.n=abc", "rollout.num_prompts=2.5", "logging.tensorboard=3",
                           "model.dtype=bf16", "algorithm", "train.seed.x=1", "eval.n=4", "eval.n.x=1"])
    problems = info.value.problems
    assert "rollout.n: expected int, got 'abc' (str)." in problems
    assert "rollout.num_prompts: expected int, got 2.5 (float)." in problems
    assert "logging.tensorboard: expected bool, got 3 (int)." in problems
    assert any("model.dtype: expected Literal['float32', 'bfloat16'], got 'bf16'" in p
               and "Did you mean 'bfloat16'?" in p for p in problems)
    assert "override 'algorithm' must look like section.field=value" in problems
    assert "train.seed: expected int, got {'x': 1} (dict)." in problems
    assert "override 'eval.n.x=1': eval.n is not a section" in problems
    with pytest.raises(ConfigError, match=r"rollout: expected a mapping of RolloutConfig fields, got \[1\]"):
        load_config(None, ["rollout=[1]"])


def test_valid_configs_pass():
    """The paper's defaults fit 1..64 ranks with any power-of-two TP, and a 32B-like model shape."""
    validate(_cfg(), 1)
    validate(_cfg("policy_parallel.tp=8", "critic_parallel.tp=4", "critic_parallel.pp=2"), 64, QWEN32B)
    validate(_cfg("algorithm.advantage=grpo", "algorithm.use_critic=false", "critic_parallel.tp=3"), 8)


@pytest.mark.parametrize("overrides, world_size, arch, expected", [
    (["rollout.num_prompts=100", "rollout.n=3"], 1, None,
     "rollout batch rollout.num_prompts 100 x rollout.n 3 = 300 is not divisible by train.mini_batch_size 512"),
    (["policy_parallel.tp=2", "train.micro_batch_size=3"], 8, None,
     "train.mini_batch_size 512 is not divisible by train.micro_batch_size 3 x policy data-parallel size 4 = 12 "
     "(dp = world size 8 / (tp 2 x pp 1 x cp 1))"),
    (["policy_parallel.tp=4", "train.mini_batch_size=8", "train.micro_batch_size=2"], 8, None,
     "train.micro_batch_size 2 x critic data-parallel size 8 = 16"),
    (["policy_parallel.tp=3"], 8, None, "policy_parallel: invalid parallel layout: world size 8 is not divisible"),
    (["critic_parallel.tp=16"], 16, QWEN32B, "critic_parallel: invalid parallel layout: num_attention_heads 40 is "
                                             "not divisible by tp 16"),
    (["rollout.max_response_length=131072"], 1, QWEN32B,
     "rollout.max_prompt_length 2048 + max_response_length 131072 = 133120 exceeds the policy model's "
     "max_position_embeddings 131072"),
    (["rollout.vllm_tensor_parallel=3"], 8, None, "world size 8 is not divisible by rollout.vllm_tensor_parallel 3"),
    (["algorithm.eps_low=1.2"], 1, None, "algorithm.eps_low=1.2 must be in (0, 1)"),
    (["algorithm.eps_high=0"], 1, None, "algorithm.eps_high=0.0 must be > 0"),
    (["algorithm.lam_policy=1.5"], 1, None, "algorithm.lam_policy=1.5 must be in [0, 1]"),
    (["algorithm.lam_critic=-0.1"], 1, None, "algorithm.lam_critic=-0.1 must be in [0, 1]"),
    (["algorithm.alpha=0"], 1, None, "algorithm.alpha=0.0 must be > 0"),
    (["algorithm.dual_clip=0.5"], 1, None, "algorithm.dual_clip=0.5 must be > 1 or null"),
    (["algorithm.tis_cap=0.5"], 1, None, "algorithm.tis_cap=0.5 must be >= 1 or null"),
    (["algorithm.routing_replay=true"], 1, QWEN32B, "algorithm.routing_replay=true needs a mixture-of-experts policy"),
    (["algorithm.routing_replay=true", "policy_parallel.cp=2"], 2, None,
     "algorithm.routing_replay=true with policy_parallel.cp=2: replay is not supported with context parallelism"),
    (["algorithm.routing_replay=true", "train.recompute=full"], 1, None,
     "algorithm.routing_replay=true with train.recompute='full'"),
    (["algorithm.value_pretrain_steps=-1"], 1, None, "algorithm.value_pretrain_steps=-1 must be >= 0"),
    (["algorithm.value_pretrain_ev_threshold=1.5"], 1, None, "algorithm.value_pretrain_ev_threshold=1.5 must be <= 1"),
    (["algorithm.loss_agg=token-meen"], 1, None, "loss_agg='token-meen' is unknown; valid: seq-mean-token-mean,"),
    (["algorithm.advantage=grpo"], 1, None, "algorithm.advantage='grpo' needs algorithm.use_critic=false"),
    (["algorithm.use_critic=false"], 1, None, "algorithm.advantage='gae' needs algorithm.use_critic=true"),
    (["algorithm.advantage=grpo", "algorithm.use_critic=false", "algorithm.value_source=mc"], 1, None,
     "algorithm.value_source='mc' needs algorithm.advantage='gae'"),
    (["mc.probe_every=2", "mc.step_delimiter=null"], 1, None, "Monte-Carlo values need step boundaries"),
    (["mc.k=0"], 1, None, "mc.k 0"),
    (["algorithm.mc_critic_weight=1.5"], 1, None, "algorithm.mc_critic_weight 1.5 must be within [0, 1]"),
    (["algorithm.mc_critic_weight=0.5", "algorithm.use_critic=false", "algorithm.value_source=mc"], 1, None,
     "algorithm.mc_critic_weight > 0 blends Monte-Carlo values into the critic's targets: needs"),
    (["algorithm.mc_critic_weight=0.5", "mc.step_delimiter=null"], 1, None, "Monte-Carlo values need step boundaries"),
    (["algorithm.ev_horizon=true", "algorithm.value_pretrain_ev_threshold=null"], 1, None,
     "algorithm.ev_horizon=true scales the GAE horizon by the critic's ev_mc"),
    (["algorithm.ev_horizon=true", "algorithm.advantage=grpo", "algorithm.use_critic=false"], 1, None,
     "algorithm.ev_horizon=true scales the GAE horizon by the critic's ev_mc"),
    (["algorithm.advantage=grpo", "algorithm.use_critic=false", "rollout.n=1", "train.mini_batch_size=512"], 1,
     None, "needs rollout.n >= 2, got rollout.n=1"),
    (["algorithm.overlong_buffer=30000"], 1, None,
     "algorithm.overlong_buffer 30000 exceeds rollout.max_response_length 20480"),
    (["algorithm.reward_correct=0"], 1, None, "algorithm.reward_correct=0.0 must be > reward_incorrect=0.0"),
    (["rollout.max_response_length=0"], 1, None, "rollout.max_response_length=0 must be >= 1"),
    (["rollout.top_k=0"], 1, None, "rollout.top_k=0 must be >= 1 or null"),
    (["eval.top_p=0"], 1, None, "eval.top_p=0.0 must be in (0, 1]"),
    (["eval.every=10"], 1, None, "eval.every=10 needs data.val_files (empty)"),
    (["critic_optim.lr=0"], 1, None, "critic_optim.lr=0.0 must be > 0"),
    (["actor_optim.adam_beta2=1"], 1, None, "actor_optim.adam_beta2=1.0 must be in [0, 1)"),
    (["train.micro_batch_size=0"], 1, None, "train.micro_batch_size=0 must be >= 1"),
    (["model.hf_dir=''"], 1, None, "model.hf_dir is required"),
])
def test_each_impossible_combination_is_reported_with_numbers(overrides, world_size, arch, expected):
    problems = _problems(_cfg(*overrides), world_size, arch)
    assert any(expected in p for p in problems), problems


def test_suggestions_in_validation_messages():
    problems = _problems(_cfg("algorithm.loss_agg=token-meen", "reward.name=mth"))
    assert any("Did you mean 'token-mean'?" in p for p in problems)
    assert not any("reward.name" in p for p in problems)  # the reward is checked at start-up (preflight)
    from vapo_megatron.errors import PreflightError
    from vapo_megatron.train.preflight import check_reward

    with pytest.raises(PreflightError, match="reward.name='mth' is neither a registered reward.*Did you mean 'math'"):
        check_reward(_cfg("reward.name=mth"), [])


def test_config_validation_does_not_import_the_rewards_package():
    """Issue 14: validating a config must not import (and register) the reward package."""
    import subprocess
    import sys

    code = ("import sys; from vapo_megatron.config import VapoConfig, _combination_problems; "
            "_combination_problems(VapoConfig(), 1); "
            "assert not [m for m in sys.modules if m.startswith('vapo_megatron.rewards')], sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_problem_reported_at_once_without_mutating():
    cfg = _cfg("rollout.num_prompts=100", "rollout.n=3", "algorithm.eps_low=1.2", "algorithm.alpha=0",
               "policy_parallel.tp=3", "eval.top_p=1.5", "data.train_files=[]")
    before = to_dict(cfg)
    problems = _problems(cfg, world_size=8)
    assert len(problems) == 6, problems
    message = str(ConfigError("h", problems))
    for fragment in ("= 300 is not divisible", "eps_low=1.2", "alpha=0.0", "tp(3)", "eval.top_p=1.5",
                     "data.train_files is required"):
        assert fragment in message
    assert to_dict(cfg) == before


def test_world_size_must_be_positive():
    with pytest.raises(ConfigError, match="world size 0 must be >= 1"):
        validate(_cfg(), 0)


def test_dump_load_round_trip(tmp_path):
    cfg = dataclasses.replace(
        _cfg("actor_optim.lr=3e-7", "algorithm.dual_clip=3", "rollout.top_k=20", "checkpoint.run_dir=2024",
             "data.val_files=[v.jsonl]", "model.critic_hf_dir=/critic", "logging.wandb_project=vapo"),
        policy_parallel=ParallelConfig(tp=2, sequence_parallel=True))
    text = dump_yaml(cfg)
    assert yaml.safe_load(text) == to_dict(cfg)
    path = save_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml" and path.read_text() == text
    assert load_config(str(path), []) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary file left
    assert load_config(str(path), ["actor_optim.lr=1e-6"]).actor_optim.lr == 1e-6


def test_defaults_are_the_papers():
    """docs/VAPO.md: the settings the paper states, and DAPO's that VAPO takes."""
    cfg = VapoConfig()
    paper = {"rollout.num_prompts": 512, "rollout.n": 16, "train.mini_batch_size": 512, "algorithm.gamma": 1.0,
             "algorithm.lam_critic": 1.0, "algorithm.lam_policy": 0.95, "algorithm.length_adaptive": True,
             "algorithm.alpha": 0.05, "algorithm.eps_low": 0.2, "algorithm.eps_high": 0.28,
             "algorithm.loss_agg": "token-mean", "algorithm.positive_lm_coef": 0.1,
             "algorithm.value_pretrain_steps": 50, "algorithm.advantage": "gae", "algorithm.use_critic": True,
             "actor_optim.lr": 1e-6, "critic_optim.lr": 2e-6, "eval.n": 32, "eval.temperature": 1.0,
             "eval.top_p": 0.7, "rollout.max_prompt_length": 2048, "rollout.max_response_length": 20480,
             "actor_optim.weight_decay": 0.1, "actor_optim.clip_grad": 1.0}
    for key, value in paper.items():
        assert functools.reduce(getattr, key.split("."), cfg) == value, key


def test_every_field_has_a_one_line_docstring():
    tree = ast.parse(inspect.getsource(config_module))
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name.endswith("Config")]
    assert len(classes) == 12
    for cls in classes:
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                doc = body[i + 1] if i + 1 < len(body) else None
                assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant), (cls.name, node.target.id)
                assert "\n" not in doc.value.value, (cls.name, node.target.id)


def test_a_critic_of_another_vocabulary_is_refused():
    """model.critic_hf_dir must read the policy's tokens: one problem line naming both vocabularies."""
    shape = dict(num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=32768)
    cfg = _cfg("model.critic_hf_dir=/critic")
    validate(cfg, 1, SimpleNamespace(vocab_size=128, **shape), SimpleNamespace(vocab_size=128, **shape))
    with pytest.raises(ConfigError, match="vocabulary of 256 tokens, the policy 128"):
        validate(cfg, 1, SimpleNamespace(vocab_size=128, **shape), SimpleNamespace(vocab_size=256, **shape))
