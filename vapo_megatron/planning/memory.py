"""Per-GPU memory of a VAPO run: the policy and the critic (megatron-core) colocated with vLLM (hybrid engine),
or, with separate placement, a trainer pool (Megatron only) and a rollout pool (vLLM only).

Everything is per GPU, in bytes (printed in GiB), for the worst pipeline stage of each role.

Static, per role (P = parameters of the rank, `params.stage_params`: P_dense + P_experts; d = dp x cp, the
ranks the distributed optimizer shards the dense parameters over; d_e = expert-DP = world / (etp x ep x pp), the
ranks it shards a mixture-of-experts model's expert parameters over):
    parameters  2 P (bf16; 4 P in fp32)
    gradients   4 P (megatron DDP's fp32 main-grad buffer: the project builds DDP with grad_reduce_in_fp32;
                2 P if `grad_bytes=2`)
    optimizer   12 P (fp32 master copy + Adam m, v) or 8 P when training in fp32 (no master copy); with the
                distributed optimizer 12 (P_dense / d + P_experts / d_e)
Experts are split over ep (whole experts) and etp (each expert's width), so a rank holds num_experts / ep experts
of width moe_ffn_hidden_size / etp in every MoE layer of its stage.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"). The
paper's per-layer memory of a GPT layer with s tokens, b sequences, hidden h, a heads is sbh(34 + 5as/h) bytes
in 16-bit: 34h per token = norm inputs 4h + attention 11h + MLP 19h (dropout masks included), 5as = softmax
output 2as + its dropout mask as + dropout output 2as. Adapted here to grouped-query attention (q = heads x
head_dim, g = kv_heads x head_dim) and SwiGLU (f = ffn hidden), no dropout (Qwen2.5 trains with p = 0), in
elements per token (bytes = e x elements, e = 2 for bf16):
    replicated  4h          = RMSNorm inputs 2h + QKV input h + fc1 input h           (/tp only with SP)
    sharded     2q + 2g + 3f = Q q, K g, V g, projection input q, fc1 output [gate; up] 2f, fc2 input f (/tp)
    attention   5as/2       = the paper's 5as bytes, kept for the unfused ("local") core attention   (/tp)
                4a/e        = with flash attention (TransformerEngine): only the fp32 log-sum-exp
With q = g = h, a GELU MLP (f = 4h: fc1 output 4h and GELU output 4h instead of 3f) and the dropout masks (2h
bytes) this is the paper's 34h. Per layer and micro-batch of T tokens (T = b s) on one rank:
    M_layer = e T/cp [4h/t_sp + (2q + 2g + 3f)/tp] + attention,  t_sp = tp with SP, else 1
recompute "selective" (megatron: core attention) drops the attention term; "full" (uniform, one layer per
checkpoint) keeps only each layer's input, e T h/(cp t_sp), and needs one M_layer of working memory for the
layer being recomputed. With 1F1B pipelining, stage k holds min(pp - k, micro-batches) micro-batches in flight
of its L/pp layers, so stage 0 holds L layers' worth whatever pp is.

Mixture-of-experts layers (Qwen3-MoE), assuming balanced routing (megatron drops no token here: no capacity
factor, so a skewed router raises the real peak). The T' = T/(cp t_sp) tokens entering the layer on a rank are
sent, k copies each, to their experts by all-to-all, and with etp > 1 all-gathered over the etp ranks; a rank's
experts then see about k etp T' tokens. The dense MLP's 3f/tp per token is replaced by, per entering token,
    router      8E/e            = fp32 logits and probabilities over E experts
    experts     k (2 etp h + 3 f_e)  = dispatched expert inputs and expert outputs (kept for the combine), fc1
                                  output 2 f_e/etp and fc2 input f_e/etp per received token
and one layer at a time holds the all-to-all buffers, a transient added to the peak:
    dispatch    2 e k etp T' h bytes  (the send and receive copies of the dispatched tokens)

Logits (policy, last stage): the vocabulary-parallel log-prob/entropy (parallel/vocab_parallel.py) keeps the
bf16 logits shard plus at most two fp32 shard-sized tensors: 10 bytes x T/cp x V_padded/tp.

vLLM (colocated, in the same processes): weights 2 x total params / vllm_tp; it claims
gpu_memory_utilization x GPU memory in all (weights + activations, about `vllm_reserve` + KV cache); a token's KV
cache takes 2 (K, V) x layers x kv_heads x head_dim x 2 bytes / vllm_tp. During training vLLM sleeps (level 1:
KV cache freed, weights to host); with `offload_megatron` Megatron's parameters, gradients and optimizer state
go to host during generation.

Phases (peak per GPU, plus a fixed `overhead` for the CUDA context, NCCL buffers and allocator slack):
    training     policy static + critic static + max(policy activations + logits, critic activations)
    weight sync  vLLM awake (its whole budget, or its weights only when Megatron is offloaded: wake weights,
                 sync, offload, then wake the KV cache) + Megatron static + two sync buckets
    generation   vLLM's whole budget + Megatron static (0 with offload)

Separate placement (`rollout_gpus` > 0: docs/async.md; nodes x gpus_per_node is then the trainer pool and the
`rollout_gpus` GPUs run only vLLM). The phases are per pool, named "<pool>/<phase>":
    trainer/training     policy static + critic static + max(policy activations + logits, critic activations)
    trainer/weight_sync  Megatron static + two sync buckets (the broadcast source gathers the next bucket while
                         one is sent)
    rollout/generation   vLLM's whole budget
    rollout/weight_sync  vLLM's whole budget + one bucket
each plus the overhead (for the rollout pool a margin: vLLM counts its own CUDA context inside its budget).
No vLLM on the trainer GPUs and no generation phase there: at max_staleness k > 0 the trainer trains while the
pool generates, at k = 0 it waits with its static memory only. vLLM never sleeps in the rollout pool (nothing
else wants its memory), so a weight push lands in an awake engine. The receiver (rollout/transports/broadcast.py
`_receive_bucket`) allocates one flat buffer per bucket; with the gloo bridge it is host memory
(rollout/async_pool.py builds the transport with device "cpu"; `receive()` keeps the previous bucket until the
next has arrived and vLLM holds an incomplete layer's tensors, so about two buckets of host memory), and vLLM's
loader copies each tensor into its parameters: one bucket on the GPU is the planned transient.
The rollout pool's gpu_memory_utilization is `VLLM_SEPARATE_UTILIZATION` = 0.85 (nothing else is on the GPU;
a little under vLLM's own default 0.9 for the push's transients; rollout/async_pool.py passes it to the engine),
not the colocated 0.5; no config field sets either. The pool has rollout_gpus / vllm_tp engines; one rollout
batch of `batch_sequences` (num_prompts x n) sequences is counted at max_seq_len each (the worst case: vLLM
reserves KV blocks as sequences grow, so shorter responses fit more), ceil(batch / engines) per engine, in
ceil(per engine / max_len_sequences) waves if the KV cache cannot hold them at once (an estimate: vLLM's
max_num_seqs and preemption are not modelled).
These are estimates (no fragmentation model, no CUDA graphs, no TransformerEngine workspaces); keep headroom.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from vapo_megatron.models.hf_config import ModelArch
from vapo_megatron.planning.params import stage_params, total_params

GIB = 1024**3
VLLM_DEFAULT_UTILIZATION = 0.5  # RolloutEngineConfig.gpu_memory_utilization (the trainer does not override it)
VLLM_SEPARATE_UTILIZATION = 0.85  # rollout/async_pool.py ROLLOUT_POOL_GPU_MEMORY_UTILIZATION (vLLM alone on its GPU)
Recompute = Literal["none", "selective", "full"]


@dataclass(frozen=True)
class RoleSettings:
    """One Megatron role's layout and training knobs."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    recompute: Recompute = "none"
    micro_batch_tokens: int = 4096
    """Tokens of one micro-batch (b x s; padded sequences count whole)."""
    seq_len: int = 4096
    """Tokens of one sequence (sets the s in the attention term)."""
    attention: Literal["flash", "unfused"] = "flash"
    """Core attention: flash (TransformerEngine) or megatron's local unfused softmax."""
    grad_bytes: int = 4
    ep: int = 1
    """Expert-parallel size (MoE models: experts split over ep ranks)."""
    etp: int = 1
    """Expert tensor-parallel size (each expert's MLP split over etp ranks)."""


@dataclass(frozen=True)
class RolloutSettings:
    vllm_tp: int = 1
    gpu_memory_utilization: float = VLLM_DEFAULT_UTILIZATION
    max_seq_len: int = 4096
    """Prompt + response tokens of one sequence."""
    offload_megatron: bool = False
    sleep_during_training: bool = True
    bucket_bytes: int = 256 * 1024**2
    vllm_reserve_gib: float = 2.0
    """vLLM's own activation peak and sampler buffers inside its budget (profiled by vLLM at start)."""
    batch_sequences: int = 0
    """Sequences of one rollout batch (num_prompts x n); 0: unknown (separate placement reports its waves)."""


@dataclass(frozen=True)
class PlanInput:
    arch: ModelArch
    policy: RoleSettings
    critic: RoleSettings | None = None
    """None: no critic (value-free training)."""
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    overhead_gib: float = 3.0
    param_bytes: int = 2
    rollout_gpus: int = 0
    """Separate placement: GPUs that run only vLLM (the rollout pool; nodes x gpus_per_node are then the trainer
    pool's). 0: colocated, vLLM in every trainer GPU."""

    @property
    def world_size(self) -> int:
        """The GPUs Megatron runs on (the trainer pool with separate placement)."""
        return self.nodes * self.gpus_per_node

    @property
    def separate(self) -> bool:
        return self.rollout_gpus > 0


@dataclass(frozen=True)
class RoleMemory:
    role: str
    dp: int
    stage: int
    """The pipeline stage with the largest total (the one reported)."""
    params_per_rank: int
    params: int
    grads: int
    optimizer: int
    activations: int
    logits: int
    expert_params_per_rank: int = 0
    """Of params_per_rank, the routed experts' (sharded over ep x etp, data-parallel over expert-DP)."""
    dispatch: int = 0
    """All-to-all buffers of one MoE layer's token dispatch (transient, counted at the training peak)."""

    @property
    def static(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def training(self) -> int:
        return self.activations + self.logits + self.dispatch


@dataclass(frozen=True)
class VllmMemory:
    weights: int
    budget: int
    kv_cache: int
    kv_bytes_per_token: int
    kv_tokens: int
    """KV-cache capacity of one engine (vllm_tp GPUs), in tokens."""
    max_len_sequences: int
    """Sequences of max_seq_len tokens that fit in one engine's KV cache at once."""


@dataclass(frozen=True)
class RolloutBatchFit:
    """Separate placement: one rollout batch against the rollout pool's KV cache (full-length sequences)."""

    engines: int
    sequences_per_engine: int
    """ceil(batch_sequences / engines)."""
    waves: int
    """1: the batch fits the KV cache at once; more: about that many rounds of generation (0: no KV cache)."""


@dataclass(frozen=True)
class MemoryPlan:
    inputs: PlanInput
    policy: RoleMemory
    critic: RoleMemory | None
    vllm: VllmMemory
    phases: dict[str, int]
    problems: list[str]
    rollout_batch: RolloutBatchFit | None = None
    """Separate placement only."""

    @property
    def fits(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["fits"] = self.fits
        out["gib"] = {k: round(v / GIB, 2) for k, v in self.phases.items()}
        return out


def layer_activation_bytes(arch: ModelArch, s: RoleSettings, e: int, layer: int = 0) -> int:
    """Bytes layer `layer` keeps for backward, for one micro-batch on one rank, without full recompute."""
    h, a = arch.hidden_size, arch.num_heads
    q, g, f = a * arch.head_dim, arch.num_kv_heads * arch.head_dim, arch.ffn_hidden_size
    tokens = s.micro_batch_tokens / s.cp
    t_sp = s.tp if s.sequence_parallel else 1
    if arch.is_moe_layer(layer):
        k = arch.moe_topk
        mlp = (8 * arch.num_experts / e + k * (2 * s.etp * h + 3 * arch.moe_ffn_hidden_size)) / t_sp
    else:
        mlp = 3 * f / s.tp
    per_token = e * (4 * h / t_sp + (2 * q + 2 * g) / s.tp + mlp)
    if s.recompute == "selective":
        attention = 0.0
    elif s.attention == "flash":
        attention = 4.0 * a / s.tp
    else:
        attention = e / 2 * 5 * a * min(s.seq_len, s.micro_batch_tokens) / s.tp
    return int(tokens * (per_token + attention))


def dispatch_bytes(arch: ModelArch, s: RoleSettings, e: int) -> int:
    """All-to-all buffers of one MoE layer for one micro-batch on one rank (0 for a dense model)."""
    if not arch.is_moe:
        return 0
    t_sp = s.tp if s.sequence_parallel else 1
    return int(2 * e * arch.moe_topk * s.etp * s.micro_batch_tokens / (s.cp * t_sp) * arch.hidden_size)


def _stage_activations(arch: ModelArch, role: str, s: RoleSettings, stage: int, e: int) -> tuple[int, int, int]:
    """(activations, logits, dispatch) bytes of pipeline stage `stage` at its 1F1B peak."""
    n_layers, in_flight = arch.num_layers // s.pp, s.pp - stage
    stage_layers = range(stage * n_layers, (stage + 1) * n_layers)
    per_layer = [layer_activation_bytes(arch, s, e, i) for i in stage_layers]
    if s.recompute == "full":
        t_sp = s.tp if s.sequence_parallel else 1
        layer_input = int(e * s.micro_batch_tokens / s.cp * arch.hidden_size / t_sp)
        acts = n_layers * in_flight * layer_input + max(per_layer)
    else:
        acts = in_flight * sum(per_layer)
    logits = 0
    if role == "policy" and stage == s.pp - 1:
        logits = int(10 * s.micro_batch_tokens / s.cp * arch.padded_vocab_size(s.tp) / s.tp)
    moe_here = any(arch.is_moe_layer(i) for i in stage_layers)
    return acts, logits, dispatch_bytes(arch, s, e) if moe_here else 0


def role_memory(arch: ModelArch, role: str, s: RoleSettings, world_size: int, param_bytes: int) -> RoleMemory:
    """The role's memory on the pipeline stage where it is largest."""
    for name, size in (("tp x pp x cp", s.tp * s.pp * s.cp), ("etp x ep x pp", s.etp * s.ep * s.pp)):
        if world_size % size:
            raise ValueError(f"{role}: world size {world_size} is not divisible by {name} = {size} (tp {s.tp}, "
                             f"pp {s.pp}, cp {s.cp}, ep {s.ep}, etp {s.etp})")
    dp = world_size // (s.tp * s.pp * s.cp)
    shard = dp * s.cp if s.distributed_optimizer else 1
    expert_shard = world_size // (s.etp * s.ep * s.pp) if s.distributed_optimizer else 1
    optim_bytes = 12 if param_bytes == 2 else 8
    best = None
    for stage in range(s.pp):
        p = stage_params(arch, role, tp=s.tp, pp=s.pp, pp_rank=stage, ep=s.ep, etp=s.etp)
        n = p.total
        acts, logits, dispatch = _stage_activations(arch, role, s, stage, param_bytes)
        mem = RoleMemory(role=role, dp=dp, stage=stage, params_per_rank=n, params=param_bytes * n,
                         grads=s.grad_bytes * n,
                         optimizer=int(optim_bytes * p.dense / shard + optim_bytes * p.experts / expert_shard),
                         activations=acts, logits=logits, expert_params_per_rank=p.experts, dispatch=dispatch)
        if best is None or mem.static + mem.training > best.static + best.training:
            best = mem
    return best


def vllm_memory(arch: ModelArch, r: RolloutSettings, gpu_bytes: int) -> VllmMemory:
    weights = 2 * total_params(arch) // r.vllm_tp
    kv_heads_per_rank = max(1, arch.num_kv_heads // r.vllm_tp)  # vLLM replicates KV heads when tp > kv_heads
    per_token = 2 * arch.num_layers * kv_heads_per_rank * arch.head_dim * 2
    budget = int(r.gpu_memory_utilization * gpu_bytes)
    kv = max(0, budget - weights - int(r.vllm_reserve_gib * GIB))
    tokens = kv // per_token  # every rank of the engine holds the same number of tokens (its heads' share)
    return VllmMemory(weights=weights, budget=budget, kv_cache=kv, kv_bytes_per_token=per_token, kv_tokens=tokens,
                      max_len_sequences=tokens // r.max_seq_len)


def _phases(inp: PlanInput, policy: RoleMemory, critic: RoleMemory | None, vllm: VllmMemory) -> dict[str, int]:
    r, overhead = inp.rollout, int(inp.overhead_gib * GIB)
    static = policy.static + (critic.static if critic else 0)
    train_peak = max(policy.training, critic.training if critic else 0)
    asleep_vllm = 0 if r.sleep_during_training else vllm.budget
    resident = 0 if r.offload_megatron else static
    sync_vllm = vllm.weights if r.offload_megatron else vllm.budget
    return {"training": static + train_peak + asleep_vllm + overhead,
            "weight_sync": static + sync_vllm + 2 * r.bucket_bytes + overhead,
            "generation": resident + vllm.budget + overhead}


def _separate_phases(inp: PlanInput, policy: RoleMemory, critic: RoleMemory | None,
                     vllm: VllmMemory) -> dict[str, int]:
    """Per pool: the trainer GPUs hold Megatron only, the rollout GPUs vLLM only (module docstring)."""
    r, overhead = inp.rollout, int(inp.overhead_gib * GIB)
    static = policy.static + (critic.static if critic else 0)
    train_peak = max(policy.training, critic.training if critic else 0)
    return {"trainer/training": static + train_peak + overhead,
            "trainer/weight_sync": static + 2 * r.bucket_bytes + overhead,
            "rollout/generation": vllm.budget + overhead,
            "rollout/weight_sync": vllm.budget + r.bucket_bytes + overhead}


def rollout_batch_fit(inp: PlanInput, vllm: VllmMemory) -> RolloutBatchFit:
    engines = inp.rollout_gpus // inp.rollout.vllm_tp
    per_engine = -(-inp.rollout.batch_sequences // max(1, engines))
    waves = -(-per_engine // vllm.max_len_sequences) if vllm.max_len_sequences else 0
    return RolloutBatchFit(engines=engines, sequences_per_engine=per_engine, waves=waves)


def plan_memory(inp: PlanInput) -> MemoryPlan:
    """Estimate every phase's per-GPU peak and list what does not fit."""
    gpu = int(inp.gpu_memory_gib * GIB)
    policy = role_memory(inp.arch, "policy", inp.policy, inp.world_size, inp.param_bytes)
    critic = None if inp.critic is None else role_memory(inp.arch, "critic", inp.critic, inp.world_size,
                                                         inp.param_bytes)
    vllm = vllm_memory(inp.arch, inp.rollout, gpu)
    phases = (_separate_phases if inp.separate else _phases)(inp, policy, critic, vllm)
    problems = [f"{name}: {peak / GIB:.1f} GiB per GPU exceeds the {inp.gpu_memory_gib:g} GiB of the GPU"
                for name, peak in phases.items() if peak > gpu]
    if vllm.kv_tokens < inp.rollout.max_seq_len:
        problems.append(f"vLLM: gpu_memory_utilization {inp.rollout.gpu_memory_utilization} gives "
                        f"{vllm.budget / GIB:.1f} GiB, not enough for its weights {vllm.weights / GIB:.1f} GiB + "
                        f"reserve {inp.rollout.vllm_reserve_gib:g} GiB + one {inp.rollout.max_seq_len}-token "
                        "sequence of KV cache")
    return MemoryPlan(inputs=inp, policy=policy, critic=critic, vllm=vllm, phases=phases, problems=problems,
                      rollout_batch=rollout_batch_fit(inp, vllm) if inp.separate else None)
