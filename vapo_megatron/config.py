"""The run configuration: typed dataclasses, YAML + ``section.field=value`` overrides (values read as YAML, then
coerced to the field's type: ``1e-6``, a string in YAML 1.1, becomes a float), one validation pass that reports every
problem with its numbers and derives nothing, and a YAML dump. "(paper: x)" marks a default that is VAPO's
(docs/VAPO.md), "(DAPO: x)" one that VAPO takes from DAPO."""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import os
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from vapo_megatron.parallel.layout import ParallelConfig, ParallelConfigError


class ConfigError(ValueError):
    """A config that cannot be loaded or cannot run; ``problems`` lists every issue found."""
    def __init__(self, header: str, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__(header + "\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass(frozen=True)
class ModelConfig:
    hf_dir: str = ""
    """Hugging Face directory the policy is initialised from (required)."""
    critic_hf_dir: str | None = None
    """Critic init dir; None uses hf_dir. Trunk plus a fresh value head unless the dir has a score head."""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Training parameter dtype."""


@dataclass(frozen=True)
class RolloutConfig:
    num_prompts: int = 512
    """Prompts per PPO step (paper: 512)."""
    n: int = 16
    """Responses sampled per prompt (paper: 16)."""
    temperature: float = 1.0
    """Sampling temperature of training rollouts; must be 1.0 (old log-probs are the temperature-1 ones)."""
    top_p: float = 1.0
    """Nucleus sampling mass of training rollouts; must be 1.0 (old log-probs are of the full distribution)."""
    top_k: int | None = None
    """Top-k of training rollouts; must be None (old log-probs are of the full distribution)."""
    max_prompt_length: int = 2048
    """Longest prompt in tokens; longer prompts are dropped (DAPO: 2048)."""
    max_response_length: int = 20480
    """Most generated tokens per response, overlong buffer included (DAPO: 16384 + 4096)."""
    vllm_tensor_parallel: int = 1
    """Ranks per vLLM engine, independent of the trainer's layouts."""
    bucket_bytes: int = 256 * 1024 * 1024
    """Size of the weight buckets pushed from the trainer into vLLM."""
    sleep_between_steps: bool = True
    """Put vLLM to sleep (free its GPU memory) while the trainer runs."""
    offload_megatron_during_rollout: bool = False
    """Move Megatron params, grad buffers and optimizer state to host memory while vLLM generates (no-op on CPU)."""
    cpu_kv_cache_bytes: int = 512 * 1024 * 1024
    """KV-cache bytes of a CPU vLLM engine (ignored on GPU)."""
    placement: Literal["colocated", "separate"] = "colocated"
    """Where vLLM runs: "colocated" in every trainer process, or "separate" on its own ranks (docs/async.md)."""
    rollout_ranks: int = 0
    """Separate placement: how many world ranks (the last ones) run only vLLM; the others train. 0 when colocated."""
    max_staleness: int = 0
    """Separate placement: most policy versions a trained sample may lag the trainer (k); 0 is synchronous."""
    rollout_timeout_s: float = 1800.0
    """Separate placement: seconds either pool waits for the other (samples, a weight push) before it stops the run."""


@dataclass(frozen=True)
class AlgorithmConfig:
    advantage: Literal["gae", "grpo"] = "gae"
    """Advantage estimator: "gae" (VAPO, needs the critic) or "grpo" (group-normalised, value-free)."""
    gamma: float = 1.0
    """Discount factor (paper: 1.0)."""
    lam_critic: float = 1.0
    """GAE lambda of the critic's targets (paper: 1.0, Monte-Carlo returns); ignored when couple_gae is on."""
    couple_gae: bool = False
    """Critic targets use the policy's lambda, length-adaptive or fixed: the paper's "without decoupled GAE"."""
    lam_policy: float = 0.95
    """GAE lambda of policy advantages when length_adaptive is off (paper: 0.95)."""
    length_adaptive: bool = True
    """Per-response lam_policy = 1 - 1 / (alpha * length) (paper: on)."""
    alpha: float = 0.05
    """Length-adaptive GAE coefficient (paper: 0.05)."""
    ev_horizon: bool = False
    """PPO: lambda_policy toward 1 as the step's ev_mc falls below value_pretrain_ev_threshold (a departure)."""
    eps_low: float = 0.2
    """Lower clip range of the ratio: 1 - eps_low (paper: 0.2)."""
    eps_high: float = 0.28
    """Upper clip range of the ratio: 1 + eps_high, clip-higher (paper: 0.28)."""
    dual_clip: float | None = None
    """Dual-clip bound c > 1 on negative-advantage tokens; None disables it."""
    tis_cap: float | None = None
    """Truncated importance sampling: PPO term of a token x min(p_trainer_old / p_vllm, tis_cap >= 1); None off."""
    routing_replay: bool = False
    """MoE policy: replay the experts vLLM routed each token to in the policy's forwards (rollout/routing.py)."""
    whiten_advantages: bool = True
    """Normalise GAE advantages to zero mean, unit std over the batch's response tokens (verl's GAE default)."""
    loss_agg: str = "token-mean"
    """Loss aggregation mode, a name of algorithms.losses.loss_agg_names() (paper: token-mean)."""
    positive_lm_coef: float = 0.1
    """Weight mu of the NLL loss on correct responses (paper: 0.1)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus; 0 disables it."""
    value_clip: float | None = None
    """Clip range of new values around the old ones in the value loss; None disables it."""
    value_pretrain_steps: int = 50
    """Critic-only steps on the initial policy's samples before PPO, at most (paper: 50); ignored without critic."""
    value_pretrain_ev_threshold: float | None = None
    """Stop value pretraining once a step's ev_mc (values before its update, on its fresh rollouts) reaches this."""
    use_critic: bool = True
    """Train a critic; must be true for "gae" with value_source "critic", and false for "grpo"."""
    value_source: Literal["critic", "mc"] = "critic"
    """Values GAE runs on: the critic's, or Monte-Carlo estimates at step boundaries ("mc": `mc.*`, values/mc.py)."""
    mc_advantage: Literal["gae", "step"] = "gae"
    """With value_source "mc": "gae" on the step values, or "step", VinePPO's V(next boundary) - V(boundary)."""
    critic_unready: Literal["lengthen", "group", "continue", "stop"] = "stop"
    """Pretraining capped below its EV threshold: "stop" (saved), "lengthen" (lambda 1), "group" (GRPO), "continue"."""
    mc_critic_weight: float = 0.0
    """Critic targets w * V_mc + (1 - w) * return at every step (> 0: `mc.k` continuations per boundary, values/mc)."""
    filter_uniform_groups: bool = False
    """Drop groups whose responses all score the same (DAPO dynamic sampling; off in VAPO)."""
    overlong_buffer: int = 0
    """DAPO soft overlong penalty length in tokens before max_response_length; 0 disables it."""
    overlong_penalty: float = 1.0
    """Penalty reached at max_response_length by the soft overlong penalty."""
    reward_correct: float = 1.0
    """Reward of a correct response (the paper does not state it)."""
    reward_incorrect: float = 0.0
    """Reward of an incorrect response (the paper does not state it)."""


@dataclass(frozen=True)
class MonteCarloConfig:
    """Monte-Carlo values from step boundaries (values/mc.py): the value source `algorithm.value_source="mc"` and
    the critic-quality probe (`probe_every`)."""

    k: int = 4
    """Continuations sampled from each boundary (the value is their mean reward)."""
    step_delimiter: str | None = "\n"
    """A step ends after a token whose text contains this string (null: use step_tokens)."""
    step_tokens: int = 0
    """With no delimiter: a boundary every this many tokens."""
    every_step: int = 1
    """Keep every j-th boundary (fewer continuations, coarser credit)."""
    max_steps: int = 16
    """Most boundaries per response (evenly thinned beyond it); the response start is always one."""
    probe_every: int = 0
    """Every this many steps: Monte-Carlo values of `probe_rows` responses and `ev_oracle`; 0 never."""
    probe_rows: int = 8
    """Responses of the probe (spread over the batch's groups)."""
    probe_k: int = 4
    """Continuations per boundary in the probe."""


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-6
    """Peak learning rate (paper: actor 1e-6, critic 2e-6)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (DAPO: 0.1)."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables it (DAPO: 1.0)."""
    warmup_steps: int = 0
    """Optimizer steps (not rollout steps: one per mini-batch and epoch) of linear warmup from 0 to lr."""
    adam_beta1: float = 0.9
    """Adam first-moment decay."""
    adam_beta2: float = 0.999
    """Adam second-moment decay."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron distributed optimizer)."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 5000
    """PPO steps (rollout + update), after value pretraining (paper: about 5000)."""
    mini_batch_size: int = 512
    """Samples per optimizer step (paper: 512)."""
    micro_batch_size: int = 1
    """Samples per forward/backward on one data-parallel rank (when micro_batch_tokens is 0)."""
    micro_batch_tokens: int = 0
    """Token budget per micro-batch (packed: sum of its rows, first-fit decreasing; padded: rows x longest); 0: rows."""
    pack_sequences: bool | None = None
    """Pack micro-batch rows into one stream (THD, no padding): null where supported, true required, false pad."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: "full" whole layers, "selective" core attention only, "none" keeps all."""
    recompute_num_layers: int = 1
    """With recompute="full": layers per uniformly recomputed group (fewer stored inputs, more recompute)."""
    ppo_epochs: int = 1
    """Actor passes over each rollout batch."""
    critic_epochs: int | None = None
    """Critic passes over each rollout batch (value pretraining too); None: ppo_epochs."""
    seed: int = 0
    """Seed of data order, sampling and initialisation."""
    max_nonfinite_in_row: int = 3
    """Stop after this many consecutive steps with a non-finite loss or gradient."""
    max_weight_norm_ratio: float = 1.5
    """Stop before saving when one step changes a role's parameter norm by more than this factor; 0 disables."""
    grad_norm_spike: float = 100.0
    """Stop before saving when a grad norm exceeds this multiple of its median over the last 20 steps; 0 disables."""
    max_approx_kl: float = 1.0
    """Stop before saving when a step's mean policy approx-KL exceeds this (healthy: ~1e-3); 0 disables."""
    max_rollout_logprob_diff: float = 1.0
    """Stop before saving when mean |log p_megatron - log p_vllm| of a rollout exceeds this; 0 disables."""


@dataclass(frozen=True)
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Training prompt files (required)."""
    val_files: list[str] = field(default_factory=list)
    """Evaluation prompt files (needed when eval.every > 0)."""
    shuffle: bool = True
    """Shuffle training prompts every epoch."""
    prompt_format: Literal["chat", "plain"] = "chat"
    """"chat": the tokenizer's chat template (required then); "plain" (base models): message contents as text."""


@dataclass(frozen=True)
class RewardConfig:
    name: str = "math"
    """A registered reward ("math", "synthetic") or "path/to/file.py:fn" / "package.module:fn"."""
    timeout_s: float = 10.0
    """Per-call limit of a reward function in a worker process."""
    num_workers: int = 1
    """Reward worker processes."""
    max_failed_fraction: float = 0.5
    """Stop (exit 1) when more than this fraction of a step's reward calls fail, or all; rarer ones are counted."""


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0
    """Evaluate every this many PPO steps; 0 never."""
    n: int = 32
    """Samples per prompt, averaged into avg@n (paper: 32)."""
    temperature: float = 1.0
    """Evaluation sampling temperature (paper: 1.0)."""
    top_p: float = 0.7
    """Evaluation nucleus sampling mass (paper: 0.7)."""
    max_prompts: int | None = None
    """Evaluate on at most this many prompts; None all."""


@dataclass(frozen=True)
class CheckpointConfig:
    run_dir: str = "runs/vapo"
    """Directory of this run: config.yaml, checkpoints, logs; reused only with --resume or --overwrite."""
    save_every: int = 100
    """Save every this many PPO steps; 0 only at the end."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted."""
    export_hf_at_end: bool = True
    """Write the final policy as a Hugging Face directory."""
    trust_checkpoints: bool = False
    """Load checkpoints beyond convert/safe_load.py's allowlist (such a file can run code): trusted ones only."""


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard events under run_dir."""
    wandb_project: str | None = None
    """Weights & Biases project; None disables wandb."""
    progress_bar: bool = True
    """Show a progress bar on rank 0."""


@dataclass(frozen=True)
class VapoConfig:
    """A whole run."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Which checkpoints to start from."""
    policy_parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Megatron layout of the policy."""
    critic_parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Megatron layout of the critic."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling of one rollout batch with vLLM."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """Advantages and losses (docs/VAPO.md)."""
    mc: MonteCarloConfig = field(default_factory=MonteCarloConfig)
    """Monte-Carlo values: the "mc" value source and the critic probe."""
    actor_optim: OptimConfig = field(default_factory=OptimConfig)
    """Policy AdamW, linear warmup then constant lr (paper lr 1e-6)."""
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-6))
    """Critic AdamW (paper lr 2e-6: the critic learns faster)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The PPO loop and its batch sizes."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt files: JSONL or Parquet, plain or verl rows (data/datasets.py)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """The verifier and its worker processes."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic evaluation, avg@n over data.val_files."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Where checkpoints go and how many are kept."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metric sinks."""


def did_you_mean(word: Any, choices: Sequence[Any], prefix: str = "") -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" Did you mean '{prefix}{close[0]}'?" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp``; TypeError naming the key, the expected type and the value otherwise."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            with contextlib.suppress(TypeError):
                return _coerce(value, arg, key)
    elif origin is list and isinstance(value, (str, list, tuple)):
        items = [value] if isinstance(value, str) else value  # a single file name is a one-item list
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(items)]
    elif (origin is Literal and value in args) or (tp in (bool, str) and isinstance(value, tp)):
        return value
    elif tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # run_dir: 2024 means the directory "2024"
    elif tp in (int, float) and not isinstance(value, bool):
        number = value
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 and 3e5 as strings
            with contextlib.suppress(ValueError):
                number = float(value)
        if tp is float and isinstance(number, (int, float)):
            return float(number)
        if tp is int and (isinstance(number, int) or (isinstance(number, float) and number.is_integer())):
            return int(number)
    expected = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
    hint = did_you_mean(value, args) if origin is Literal else ""
    raise TypeError(f"{key}: expected {expected}, got {value!r} ({type(value).__name__}).{hint}")


def _build(default: Any, data: Any, prefix: str, problems: list[str]) -> Any:
    """A copy of dataclass ``default`` with the values of dict ``data``; problems are appended, not raised."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, (dict, type(None))):  # None: an empty YAML section
        problems.append(f"{where}: expected a mapping of {type(default).__name__} fields, got {data!r}")
    if not isinstance(data, dict):
        return default
    hints, names, changes = get_type_hints(type(default)), [f.name for f in fields(default)], {}
    for key, value in data.items():
        if key not in names:
            problems.append(f"unknown key '{prefix}{key}'; valid keys of {where}: {', '.join(names)}."
                            + did_you_mean(key, names, prefix))
        elif is_dataclass(hints[key]):
            changes[key] = _build(getattr(default, key), value, f"{prefix}{key}.", problems)
        else:
            try:
                changes[key] = _coerce(value, hints[key], f"{prefix}{key}")
            except TypeError as e:
                problems.append(str(e))
    return dataclasses.replace(default, **changes)


def _apply_override(data: dict, item: str, problems: list[str]) -> None:
    key, sep, text = item.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        return problems.append(f"override {item!r} must look like section.field=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return problems.append(f"override {item!r}: the value is not valid YAML ({e})")
    node = data
    for i, name in enumerate(path[:-1]):
        node[name] = {} if node.get(name) is None else node[name]
        if not isinstance(node[name], dict):
            return problems.append(f"override {item!r}: {'.'.join(path[:i + 1])} is not a section")
        node = node[name]
    node[path[-1]] = value


def load_config(path: str | None, overrides: Sequence[str] = ()) -> VapoConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``section.field=value`` overrides in order;
    ConfigError listing every unknown key and every value of the wrong type."""
    source = path or "overrides"
    data = (yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}) if path is not None else {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config ({source}):", [f"the top level must be a mapping, got {data!r}"])
    problems: list[str] = []
    for item in overrides:
        _apply_override(data, item, problems)
    cfg = _build(VapoConfig(), data, "", problems)
    if problems:
        raise ConfigError(f"invalid config ({source}):", problems)
    return cfg


def to_dict(cfg: VapoConfig) -> dict[str, Any]:
    """Nested plain dicts of every field, in declaration order."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: VapoConfig) -> str:
    """The full config as YAML; loading it gives back an equal config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: VapoConfig, run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/config.yaml`` atomically; returns its path."""
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".config.yaml.{os.getpid()}.tmp")
    tmp.write_text(dump_yaml(cfg), encoding="utf-8")
    os.replace(tmp, path)
    return path


_OPTIMS, _DEFAULTS = ("actor_optim", "critic_optim"), VapoConfig()
_BOUNDS: tuple[tuple[tuple[str, ...], str, Callable[[Any], bool]], ...] = (
    (("rollout.num_prompts", "rollout.n", "rollout.top_k", "rollout.max_prompt_length", "rollout.max_response_length",
      "rollout.vllm_tensor_parallel", "rollout.bucket_bytes", "rollout.cpu_kv_cache_bytes", "train.steps",
      "train.mini_batch_size", "train.micro_batch_size", "train.recompute_num_layers", "train.ppo_epochs",
      "train.critic_epochs", "train.max_nonfinite_in_row", "reward.num_workers", "eval.n", "eval.max_prompts",
      "checkpoint.keep_last"),
     ">= 1", lambda v: v >= 1),
    (("rollout.temperature", "rollout.rollout_ranks", "rollout.max_staleness", "train.seed",
      "train.micro_batch_tokens", "train.max_weight_norm_ratio",
      "train.grad_norm_spike", "train.max_approx_kl", "train.max_rollout_logprob_diff", "algorithm.positive_lm_coef",
      "algorithm.entropy_coef", "algorithm.value_pretrain_steps", "algorithm.overlong_buffer",
      "algorithm.overlong_penalty", "eval.every",
      "eval.temperature", "checkpoint.save_every",
      *(f"{o}.{k}" for o in _OPTIMS for k in ("weight_decay", "clip_grad", "warmup_steps"))), ">= 0", lambda v: v >= 0),
    (("algorithm.alpha", "rollout.rollout_timeout_s", "algorithm.eps_high", "algorithm.value_clip", "reward.timeout_s",
      *(f"{o}.lr" for o in _OPTIMS)), "> 0", lambda v: v > 0),
    (("algorithm.gamma", "algorithm.lam_critic", "algorithm.lam_policy"), "in [0, 1]", lambda v: 0 <= v <= 1),
    (("rollout.top_p", "eval.top_p"), "in (0, 1]", lambda v: 0 < v <= 1),
    (("reward.max_failed_fraction",), "in [0, 1]", lambda v: 0 <= v <= 1),
    (("algorithm.eps_low",), "in (0, 1)", lambda v: 0 < v < 1),
    (tuple(f"{o}.{k}" for o in _OPTIMS for k in ("adam_beta1", "adam_beta2")), "in [0, 1)", lambda v: 0 <= v < 1),
    (("algorithm.dual_clip",), "> 1", lambda v: v > 1),
    (("algorithm.tis_cap",), ">= 1", lambda v: v >= 1),
    (("algorithm.value_pretrain_ev_threshold",), "<= 1 (explained variance is at most 1)", lambda v: v <= 1),
)
"""Range of every numeric field: (dotted keys, requirement, test). None (optional fields' default) passes."""


def _bound_problems(cfg: VapoConfig) -> list[str]:
    problems = []
    for keys, requirement, test in _BOUNDS:
        for key in keys:
            value = functools.reduce(getattr, key.split("."), cfg)
            if value is not None and not test(value):
                optional = functools.reduce(getattr, key.split("."), _DEFAULTS) is None
                problems.append(f"{key}={value!r} must be {requirement}{' or null' if optional else ''}")
    return problems


def _layout_problems(cfg: VapoConfig, world_size: int, arch: Any, critic_arch: Any) -> list[str]:
    """Each role's parallel layout, its micro-batches per data-parallel rank and its context length."""
    problems, (mini, micro), r = [], (cfg.train.mini_batch_size, cfg.train.micro_batch_size), cfg.rollout
    roles = [("policy", cfg.policy_parallel, arch), ("critic", cfg.critic_parallel, critic_arch)]
    for role, layout, shape in roles[:1 + bool(cfg.algorithm.use_critic)]:
        try:
            layout.validate(world_size, num_layers=getattr(shape, "num_layers", None),
                            num_heads=getattr(shape, "num_heads", None),
                            num_kv_heads=getattr(shape, "num_kv_heads", None),
                            num_experts=getattr(shape, "num_experts", None),
                            moe_ffn_hidden_size=getattr(shape, "moe_ffn_hidden_size", None))
        except ParallelConfigError as e:
            problems.append(f"{role}_parallel: {e}")
            continue
        dp = layout.data_parallel_size(world_size)
        if cfg.train.micro_batch_tokens > 0 and mini >= 1 and mini % dp:
            problems.append(f"train.mini_batch_size {mini} is not divisible by the {role} data-parallel size {dp}")
        elif cfg.train.micro_batch_tokens == 0 and mini >= 1 and micro >= 1 and mini % (micro * dp):
            problems.append(f"train.mini_batch_size {mini} is not divisible by train.micro_batch_size {micro} x "
                            f"{role} data-parallel size {dp} = {micro * dp} (dp = world size {world_size} / "
                            f"(tp {layout.tp} x pp {layout.pp} x cp {layout.cp}))")
        if role == "policy" and cfg.algorithm.routing_replay:
            problems += _routing_replay_problems(cfg, layout, shape)
        max_len, total = getattr(shape, "max_position_embeddings", None), r.max_prompt_length + r.max_response_length
        if max_len is not None and total > max_len:
            problems.append(f"rollout.max_prompt_length {r.max_prompt_length} + max_response_length "
                            f"{r.max_response_length} = {total} exceeds the {role} model's max_position_embeddings "
                            f"{max_len}")
    return problems


def _routing_replay_problems(cfg: VapoConfig, layout: Any, arch: Any) -> list[str]:
    """What algorithm.routing_replay needs of the policy (models/moe.py RoutingReplay)."""
    p = []
    if arch is not None and not getattr(arch, "is_moe", False):
        p.append("algorithm.routing_replay=true needs a mixture-of-experts policy; model.hf_dir is a dense model")
    if layout.cp > 1:
        p.append(f"algorithm.routing_replay=true with policy_parallel.cp={layout.cp}: replay is not supported with "
                 "context parallelism (set cp=1)")
    if cfg.train.recompute == "full":
        p.append("algorithm.routing_replay=true with train.recompute='full': the recomputed forward would replay "
                 "another micro-batch's experts; use recompute 'none' or 'selective'")
    return p


def _combination_problems(cfg: VapoConfig, world_size: int) -> list[str]:
    from vapo_megatron.algorithms.losses import loss_agg_names  # imports torch: only when validating
    from vapo_megatron.config_checks import pool_sizes

    r, a, t, name, p = cfg.rollout, cfg.algorithm, cfg.train, cfg.reward.name, []
    if t.mini_batch_size >= 1 and (r.num_prompts * r.n) % t.mini_batch_size:
        p.append(f"rollout batch rollout.num_prompts {r.num_prompts} x rollout.n {r.n} = {r.num_prompts * r.n} is "
                 f"not divisible by train.mini_batch_size {t.mini_batch_size}")
    _, rollout_world = pool_sizes(cfg, world_size)
    if r.vllm_tensor_parallel >= 1 and rollout_world >= 1 and rollout_world % r.vllm_tensor_parallel:
        p.append(f"{'rollout ranks' if r.placement == 'separate' else 'world size'} {rollout_world} is not divisible "
                 f"by rollout.vllm_tensor_parallel {r.vllm_tensor_parallel}")
    if a.advantage not in ("gae", "grpo"):
        p.append(f"algorithm.advantage={a.advantage!r} must be 'gae' or 'grpo'")
    elif a.advantage == "grpo" and a.use_critic:
        p.append("algorithm.advantage='grpo' needs algorithm.use_critic=false (GRPO is value-free)")
    elif a.advantage == "gae" and not a.use_critic and a.value_source == "critic":
        p.append("algorithm.advantage='gae' needs algorithm.use_critic=true (GAE needs the critic's values) or "
                 "algorithm.value_source='mc' (Monte-Carlo values)")
    if a.value_source == "mc" and a.advantage != "gae":
        p.append(f"algorithm.value_source='mc' needs algorithm.advantage='gae', got {a.advantage!r}")
    if a.ev_horizon and (a.advantage != "gae" or not a.use_critic or a.value_pretrain_ev_threshold is None):
        p.append("algorithm.ev_horizon=true scales the GAE horizon by the critic's ev_mc: needs algorithm.advantage"
                 "='gae', use_critic=true and a value_pretrain_ev_threshold (the ev at which the critic is trusted)")
    if a.advantage == "grpo" and r.n < 2:
        p.append(f"algorithm.advantage='grpo' normalises within groups: needs rollout.n >= 2, got rollout.n={r.n}")
    if a.loss_agg not in loss_agg_names():
        p.append(f"algorithm.loss_agg={a.loss_agg!r} is unknown; valid: {', '.join(loss_agg_names())}."
                 + did_you_mean(a.loss_agg, loss_agg_names()))
    if a.overlong_buffer > r.max_response_length:
        p.append(f"algorithm.overlong_buffer {a.overlong_buffer} exceeds rollout.max_response_length "
                 f"{r.max_response_length}")
    if not a.reward_correct > a.reward_incorrect:
        p.append(f"algorithm.reward_correct={a.reward_correct} must be > reward_incorrect={a.reward_incorrect}")
    if not name:  # whether the name is registered or the file loads is checked at start-up (preflight.py)
        p.append("reward.name is required: a registered reward or 'path/to/file.py:fn' / 'package.module:fn'")
    if r.temperature != 1.0 or r.top_p != 1.0 or r.top_k is not None:
        p.append(f"rollout.temperature={r.temperature}, top_p={r.top_p}, top_k={r.top_k}: training rollouts must "
                 "sample the full temperature-1 distribution (temperature 1.0, top_p 1.0, top_k null), because "
                 "the PPO ratio's old log-probs are the trainer's temperature-1 full-vocabulary log-probs; any "
                 "other sampler makes every update silently off-policy (eval.* may differ)")
    if cfg.eval.every > 0 and not cfg.data.val_files:
        p.append(f"eval.every={cfg.eval.every} needs data.val_files (empty); set eval.every=0 to skip evaluation")
    return p + [f"{key} is required" for key, value in (("model.hf_dir", cfg.model.hf_dir), ("data.train_files",
                cfg.data.train_files), ("checkpoint.run_dir", cfg.checkpoint.run_dir)) if not value]


def critic_vocab_problem(arch: Any, critic_arch: Any) -> str | None:
    """Why a critic of its own shape (`model.critic_hf_dir`) cannot read the policy's tokens, or None."""
    vocab = getattr(arch, "vocab_size", None), getattr(critic_arch, "vocab_size", None)
    if None in vocab or vocab[0] == vocab[1]:
        return None
    return (f"model.critic_hf_dir has a vocabulary of {vocab[1]} tokens, the policy {vocab[0]}: the critic must "
            "read the policy's tokens (the same tokenizer)")


def validate(cfg: VapoConfig, world_size: int, arch: Any = None, critic_arch: Any = None) -> None:
    """Raise ConfigError listing every impossible setting of ``cfg`` on ``world_size`` ranks; never mutates. ``arch``
    / ``critic_arch`` (``ModelArch``-like) add shape checks; critic_arch defaults to arch if the critic uses hf_dir."""
    if world_size < 1:
        raise ConfigError("invalid config:", [f"world size {world_size} must be >= 1"])
    if critic_arch is None and cfg.model.critic_hf_dir in (None, cfg.model.hf_dir):
        critic_arch = arch
    from vapo_megatron.config_checks import monte_carlo_problems, placement_problems, pool_sizes

    problems = _bound_problems(cfg) + placement_problems(cfg, world_size)
    trainer_world, _ = pool_sizes(cfg, world_size)
    if trainer_world >= 1:
        problems += _layout_problems(cfg, trainer_world, arch, critic_arch)
    problems += _combination_problems(cfg, world_size) + monte_carlo_problems(cfg)
    problems += [p for p in [critic_vocab_problem(arch, critic_arch)] if p]
    if problems:
        raise ConfigError(f"invalid config for world size {world_size} ({len(problems)} problems):", problems)
