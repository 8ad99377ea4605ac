"""Parameter counts of the policy (megatron-core GPTModel) and the critic (trunk + value head, no output layer),
whole and per tensor/pipeline-parallel rank, as megatron-core allocates them. They are what memory is made of, and
tests/distributed/test_planning_params.py checks them against real models built by the project's builders.

Per rank, megatron-core holds: the vocabulary padded to a multiple of tp (ModelArch.padded_vocab_size) split
over tp in the embedding (first stage) and the output layer (last stage of the policy; a tied output layer is
no extra tensor at pp=1 but a separate copy on the last stage at pp>1); per layer, QKV (+ bias) and fc1 column-
and the attention projection and fc2 row-split over tp, the two RMSNorm weights replicated; the final norm on the
last stage; the critic's value head (hidden x 1, replicated) on its last stage.
"""
from __future__ import annotations

from dataclasses import dataclass

from vapo_megatron.models.hf_config import ModelArch

ROLES = ("policy", "critic")


def layer_params(arch: ModelArch, tp: int = 1) -> int:
    """One transformer layer's parameters on one tensor-parallel rank."""
    h, q, kv = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    qkv_out = (q + 2 * kv) // tp
    attention = qkv_out * h + (qkv_out if arch.qkv_bias else 0) + h * (q // tp)
    mlp = 2 * (arch.ffn_hidden_size // tp) * h + h * (arch.ffn_hidden_size // tp)  # SwiGLU fc1 is [gate; up]
    return attention + mlp + 2 * h  # + input and pre-MLP RMSNorm weights


@dataclass(frozen=True)
class StageParams:
    """Parameters of one (tp rank, pp stage) of a role, by component."""

    embedding: int
    layers: int
    num_layers: int
    output_layer: int
    final_norm: int
    value_head: int

    @property
    def total(self) -> int:
        return self.embedding + self.layers + self.output_layer + self.final_norm + self.value_head


def stage_params(arch: ModelArch, role: str, *, tp: int = 1, pp: int = 1, pp_rank: int = 0) -> StageParams:
    """What megatron-core allocates on a rank of pipeline stage `pp_rank` (every TP rank holds the same count)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; use one of {ROLES}")
    if arch.num_layers % pp or not 0 <= pp_rank < pp:
        raise ValueError(f"pp {pp} / pp_rank {pp_rank} do not split {arch.num_layers} layers evenly")
    first, last, h = pp_rank == 0, pp_rank == pp - 1, arch.hidden_size
    vocab_shard = arch.padded_vocab_size(tp) // tp * h
    n_layers = arch.num_layers // pp
    output = 0
    if role == "policy" and last and not (arch.tie_word_embeddings and first):
        output = vocab_shard  # untied, or the tied copy megatron keeps on the last stage when pp > 1
    return StageParams(embedding=vocab_shard if first else 0, layers=n_layers * layer_params(arch, tp),
                       num_layers=n_layers, output_layer=output, final_norm=h if last else 0,
                       value_head=h if (role == "critic" and last) else 0)


def total_params(arch: ModelArch, role: str = "policy") -> int:
    """Unique parameters of the whole model (unpadded vocabulary, a tied output layer counted once): the number
    usually quoted, e.g. about 32.8e9 for Qwen2.5-32B."""
    h, vocab_rows = arch.hidden_size, arch.vocab_size * arch.hidden_size
    output = vocab_rows if role == "policy" and not arch.tie_word_embeddings else 0
    head = h if role == "critic" else 0
    return vocab_rows + arch.num_layers * layer_params(arch) + h + output + head
