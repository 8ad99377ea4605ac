"""Parameter counts of the policy (megatron-core GPTModel) and the critic (trunk + value head, no output layer),
whole and per tensor/pipeline/expert-parallel rank, as megatron-core allocates them. They are what memory is made
of, and tests/distributed/test_planning_params.py checks the dense ones against real models built by the
project's builders.

Per rank, megatron-core holds: the vocabulary padded to a multiple of tp (ModelArch.padded_vocab_size) split
over tp in the embedding (first stage) and the output layer (last stage of the policy; a tied output layer is
no extra tensor at pp=1 but a separate copy on the last stage at pp>1); per layer, QKV (+ bias) and fc1 column-
and the attention projection and fc2 row-split over tp, the two RMSNorm weights replicated; the final norm on the
last stage; the critic's value head (hidden x 1, replicated) on its last stage. A mixture-of-experts layer
(Qwen3-MoE) replaces the MLP by a router (replicated) and its share of the experts: num_experts / ep local experts,
each split over etp; experts are data-parallel over the expert-DP group (world / (etp x ep x pp)), the rest over
dp x cp. Totals are checked against Hugging Face's own models on the meta device (tests/unit/test_planning_moe.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from vapo_megatron.models.hf_config import ModelArch

ROLES = ("policy", "critic")


@dataclass(frozen=True)
class LayerParams:
    """One transformer layer's parameters on one rank, split by how they are sharded and data-parallel."""

    dense: int
    """Attention, norms, the router and a dense MLP: split over tp, replicated over dp x cp."""
    experts: int
    """This rank's routed experts: num_experts / ep of them, each split over etp, replicated over expert-DP."""

    @property
    def total(self) -> int:
        return self.dense + self.experts


def layer_params(arch: ModelArch, tp: int = 1, *, layer: int = 0, ep: int = 1, etp: int = 1) -> LayerParams:
    """Layer `layer`'s parameters on one (tp, ep, etp) rank. A MoE layer (`arch.moe_layers`) has a router
    (num_experts x hidden, replicated over tp) and num_experts / ep local SwiGLU experts of width
    moe_ffn_hidden_size / etp instead of the dense MLP; QK-norm (Qwen3) adds two head_dim weights, replicated."""
    h, q, kv = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    qkv_out = (q + 2 * kv) // tp
    attention = qkv_out * h + (qkv_out if arch.qkv_bias else 0) + h * (q // tp)
    attention += 2 * arch.head_dim if arch.qk_norm else 0
    norms = 2 * h  # input and pre-MLP RMSNorm weights
    if arch.is_moe_layer(layer):
        local_experts, width = arch.num_experts // ep, arch.moe_ffn_hidden_size // etp
        experts = local_experts * 3 * width * h  # SwiGLU: fc1 is [gate; up], then fc2
        return LayerParams(dense=attention + norms + arch.num_experts * h, experts=experts)
    mlp = 2 * (arch.ffn_hidden_size // tp) * h + h * (arch.ffn_hidden_size // tp)  # SwiGLU fc1 is [gate; up]
    return LayerParams(dense=attention + mlp + norms, experts=0)


@dataclass(frozen=True)
class StageParams:
    """Parameters of one (tp, ep, etp rank, pp stage) of a role, by component."""

    embedding: int
    layers: int
    """The layers' dense parameters (LayerParams.dense)."""
    num_layers: int
    output_layer: int
    final_norm: int
    value_head: int
    experts: int = 0
    """The layers' routed-expert parameters on this rank (LayerParams.experts)."""

    @property
    def dense(self) -> int:
        """Everything but the experts: what the dense data-parallel group (dp x cp) replicates."""
        return self.embedding + self.layers + self.output_layer + self.final_norm + self.value_head

    @property
    def total(self) -> int:
        return self.dense + self.experts


def stage_params(arch: ModelArch, role: str, *, tp: int = 1, pp: int = 1, pp_rank: int = 0, ep: int = 1,
                 etp: int = 1) -> StageParams:
    """What megatron-core allocates on a rank of pipeline stage `pp_rank` (every TP/EP rank holds the same count)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; use one of {ROLES}")
    if arch.num_layers % pp or not 0 <= pp_rank < pp:
        raise ValueError(f"pp {pp} / pp_rank {pp_rank} do not split {arch.num_layers} layers evenly")
    if arch.is_moe and (arch.num_experts % ep or arch.moe_ffn_hidden_size % etp):
        raise ValueError(f"ep {ep} / etp {etp} do not split {arch.num_experts} experts of width "
                         f"{arch.moe_ffn_hidden_size} evenly")
    first, last, h = pp_rank == 0, pp_rank == pp - 1, arch.hidden_size
    vocab_shard = arch.padded_vocab_size(tp) // tp * h
    n_layers = arch.num_layers // pp
    layers = [layer_params(arch, tp, layer=i, ep=ep, etp=etp) for i in range(pp_rank * n_layers,
                                                                             (pp_rank + 1) * n_layers)]
    output = 0
    if role == "policy" and last and not (arch.tie_word_embeddings and first):
        output = vocab_shard  # untied, or the tied copy megatron keeps on the last stage when pp > 1
    return StageParams(embedding=vocab_shard if first else 0, layers=sum(x.dense for x in layers),
                       num_layers=n_layers, output_layer=output, final_norm=h if last else 0,
                       value_head=h if (role == "critic" and last) else 0, experts=sum(x.experts for x in layers))


def total_params(arch: ModelArch, role: str = "policy") -> int:
    """Unique parameters of the whole model (unpadded vocabulary, a tied output layer counted once, every
    expert): the number usually quoted, e.g. about 32.8e9 for Qwen2.5-32B, 30.5e9 for Qwen3-30B-A3B."""
    h, vocab_rows = arch.hidden_size, arch.vocab_size * arch.hidden_size
    output = vocab_rows if role == "policy" and not arch.tie_word_embeddings else 0
    head = h if role == "critic" else 0
    layers = sum(layer_params(arch, layer=i).total for i in range(arch.num_layers))
    return vocab_rows + layers + h + output + head


def active_params(arch: ModelArch, role: str = "policy") -> int:
    """Parameters one token passes through: every expert layer contributes moe_topk of its num_experts experts
    (e.g. about 3.3e9 of Qwen3-30B-A3B's 30.5e9); total_params for a dense model."""
    inactive = 0
    if arch.is_moe:
        per_expert = 3 * arch.moe_ffn_hidden_size * arch.hidden_size
        inactive = len(arch.moe_layers) * (arch.num_experts - arch.moe_topk) * per_expert
    return total_params(arch, role) - inactive
