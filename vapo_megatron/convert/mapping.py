"""The one place that knows how Hugging Face tensors map onto megatron-core parameters.

Three views of every parameter:
  * HF: the names and shapes of a transformers checkpoint (`model.layers.3.self_attn.q_proj.weight`, ...);
  * Megatron *full*: the GPTModel parameter at TP=1, named with the *global* layer index
    (`decoder.layers.3.self_attention.linear_qkv.weight`, fused QKV in Megatron's per-query-group order);
  * Megatron *shard*: what one (tp_rank, pp_stage, ep_rank, etp_rank) holds, named with the *local* layer
    index and, for experts, the *local* expert index (expert e lives on EP rank e // (E / ep) as local expert
    e % (E / ep); its MLP is split over the expert-TP ranks, not the TP ranks).

`ParamMap` entries are plain data; `hf_to_full`, `full_to_hf`, `split_tp`, `merge_tp` are pure functions over
tensors, so the converter, the trainer's equivalence tests and the hybrid engine's weight sync all share them.

Fused layouts:
  * QKV: for each of the `g` query groups, that group's `h/g` query heads, then its key head, then its value
    head, each `head_dim` rows. TP splits this along rows into whole groups.
  * gate/up (SwiGLU fc1): `[gate; up]` at TP=1; a TP rank holds `[gate_r; up_r]`, so TP split/merge work on
    the two halves separately. Each expert's fc1 is the same, over expert-TP ranks.

Mixture-of-experts layers (Qwen3-MoE): HF's router `mlp.gate.weight` [E, h] is megatron's `mlp.router.weight`
(replicated); HF's per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight` are megatron's SequentialMLP
`mlp.experts.local_experts.{e}.linear_fc1/linear_fc2.weight`. QK-norm (Qwen3): `self_attn.{q,k}_norm.weight`
[head_dim] are `self_attention.{q,k}_layernorm.weight`, replicated over TP (every head shares them).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from vapo_megatron.models.hf_config import ModelArch

QKV, GLU, PLAIN = "qkv", "glu", "plain"


class ShapeMismatchError(ValueError):
    pass


@dataclass(frozen=True)
class ParamMap:
    """One Megatron parameter and the HF tensors it is made of."""

    name: str  # Megatron full name, global layer index
    hf_names: tuple[str, ...]
    kind: str = PLAIN  # QKV, GLU or PLAIN
    tp_dim: int | None = None  # dimension split over TP ranks; None = replicated
    vocab: bool = False  # rows are vocabulary entries (padded to a multiple of tp)
    layer: int | None = None  # global layer index, None for embedding / final norm / heads
    expert: int | None = None  # global expert index of an expert's weight, None otherwise

    def local_name(self, layer_offset: int, expert_offset: int = 0) -> str:
        if self.layer is None:
            return self.name
        name = self.name.replace(f"decoder.layers.{self.layer}.", f"decoder.layers.{self.layer - layer_offset}.", 1)
        if self.expert is not None:
            name = name.replace(f".local_experts.{self.expert}.", f".local_experts.{self.expert - expert_offset}.", 1)
        return name


def _mlp_maps(i: int, arch: ModelArch) -> list[ParamMap]:
    """The MLP of layer i: dense SwiGLU, or router + experts for a MoE layer."""
    hf, mg = f"model.layers.{i}.mlp.", f"decoder.layers.{i}.mlp."
    if not arch.is_moe_layer(i):
        return [ParamMap(mg + "linear_fc1.weight", (hf + "gate_proj.weight", hf + "up_proj.weight"), GLU, 0, layer=i),
                ParamMap(mg + "linear_fc2.weight", (hf + "down_proj.weight",), tp_dim=1, layer=i)]
    maps = [ParamMap(mg + "router.weight", (hf + "gate.weight",), layer=i)]
    for e in range(arch.num_experts):
        hfe, mge = f"{hf}experts.{e}.", f"{mg}experts.local_experts.{e}."
        maps += [ParamMap(mge + "linear_fc1.weight", (hfe + "gate_proj.weight", hfe + "up_proj.weight"), GLU, 0,
                          layer=i, expert=e),
                 ParamMap(mge + "linear_fc2.weight", (hfe + "down_proj.weight",), tp_dim=1, layer=i, expert=e)]
    return maps


def _layer_maps(i: int, arch: ModelArch) -> list[ParamMap]:
    hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
    maps = [
        ParamMap(mg + "input_layernorm.weight", (hf + "input_layernorm.weight",), layer=i),
        ParamMap(mg + "self_attention.linear_qkv.weight",
                 tuple(hf + f"self_attn.{p}_proj.weight" for p in "qkv"), QKV, 0, layer=i),
        ParamMap(mg + "self_attention.linear_proj.weight", (hf + "self_attn.o_proj.weight",), tp_dim=1, layer=i),
        ParamMap(mg + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",), layer=i),
        *_mlp_maps(i, arch),
    ]
    if arch.qk_norm:
        maps[2:2] = [ParamMap(mg + f"self_attention.{p}_layernorm.weight", (hf + f"self_attn.{p}_norm.weight",),
                              layer=i) for p in "qk"]
    if arch.qkv_bias:
        maps.insert(2, ParamMap(mg + "self_attention.linear_qkv.bias",
                                tuple(hf + f"self_attn.{p}_proj.bias" for p in "qkv"), QKV, 0, layer=i))
    return maps


def param_maps(arch: ModelArch, role: str = "policy") -> list[ParamMap]:
    """Every Megatron parameter of the `role` ("policy" or "critic") model, in forward order."""
    if role not in ("policy", "critic"):
        raise ValueError(f"role must be 'policy' or 'critic', got {role!r}")
    maps = [ParamMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), tp_dim=0, vocab=True)]
    for i in range(arch.num_layers):
        maps += _layer_maps(i, arch)
    maps.append(ParamMap("decoder.final_layernorm.weight", ("model.norm.weight",)))
    if role == "critic":
        maps.append(ParamMap("value_head.weight", ("score.weight",)))
    elif not arch.tie_word_embeddings:
        maps.append(ParamMap("output_layer.weight", ("lm_head.weight",), tp_dim=0, vocab=True))
    return maps


# ---- HF <-> Megatron full -------------------------------------------------------------------------------

def _check(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ShapeMismatchError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def hf_to_full(pm: ParamMap, hf: dict[str, torch.Tensor], arch: ModelArch) -> torch.Tensor:
    """The Megatron full tensor for `pm` from its HF tensors (shapes checked, dtype kept)."""
    tensors = [hf[n] for n in pm.hf_names]
    if pm.kind == QKV:
        return _fuse_qkv(pm, tensors, arch)
    if pm.kind == GLU:
        for n, t in zip(pm.hf_names, tensors):
            _check(n, t, (_ffn(pm, arch), arch.hidden_size))
        return torch.cat(tensors, dim=0)
    (t,) = tensors
    _check(pm.hf_names[0], t, _hf_shape(pm, arch))
    return t


def full_shape(pm: ParamMap, arch: ModelArch) -> tuple[int, ...]:
    """Shape of the Megatron full tensor of `pm` (vocabulary unpadded)."""
    h, d = arch.hidden_size, arch.head_dim
    if pm.kind == QKV:
        rows = (arch.num_heads + 2 * arch.num_kv_heads) * d
        return (rows, h) if pm.name.endswith("weight") else (rows,)
    if pm.kind == GLU:
        return (2 * _ffn(pm, arch), h)
    return _hf_shape(pm, arch)


def _ffn(pm: ParamMap, arch: ModelArch) -> int:
    """The MLP hidden size of `pm`: an expert's or the dense one."""
    return arch.moe_ffn_hidden_size if pm.expert is not None else arch.ffn_hidden_size


def _hf_shape(pm: ParamMap, arch: ModelArch) -> tuple[int, ...]:
    h = arch.hidden_size
    if pm.vocab:
        return (arch.vocab_size, h)
    if pm.name.endswith("linear_proj.weight"):
        return (h, arch.num_heads * arch.head_dim)
    if pm.name.endswith("linear_fc2.weight"):
        return (h, _ffn(pm, arch))
    if pm.name.endswith("router.weight"):
        return (arch.num_experts, h)
    if pm.name.endswith("_layernorm.weight") and ".self_attention." in pm.name:
        return (arch.head_dim,)  # QK-norm: per head
    if pm.name.endswith("value_head.weight"):
        return (1, h)
    return (h,)  # norms


def _fuse_qkv(pm: ParamMap, tensors: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    g, d = arch.num_kv_heads, arch.head_dim
    per_group = arch.num_heads // g
    q, k, v = tensors
    tail = tuple(q.shape[1:])
    _check(pm.hf_names[0], q, (arch.num_heads * d, *tail))
    _check(pm.hf_names[1], k, (g * d, *tail))
    _check(pm.hf_names[2], v, (g * d, *tail))
    fused = torch.cat([q.reshape(g, per_group * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail)], dim=1)
    return fused.reshape(-1, *tail)


def full_to_hf(pm: ParamMap, full: torch.Tensor, arch: ModelArch) -> dict[str, torch.Tensor]:
    """The HF tensors of `pm` from its Megatron full tensor (inverse of `hf_to_full`)."""
    if pm.kind == QKV:
        g, d = arch.num_kv_heads, arch.head_dim
        per_group = arch.num_heads // g
        tail = tuple(full.shape[1:])
        grouped = full.reshape(g, (per_group + 2) * d, *tail)
        q, k, v = grouped.split([per_group * d, d, d], dim=1)
        return {n: t.reshape(-1, *tail) for n, t in zip(pm.hf_names, (q, k, v))}
    if pm.kind == GLU:
        return dict(zip(pm.hf_names, full.chunk(2, dim=0)))
    if pm.vocab:
        full = full[: arch.vocab_size]
    return {pm.hf_names[0]: full}


# ---- Megatron full <-> TP shards ---------------------------------------------------------------------------

def tp_shard(pm: ParamMap, full: torch.Tensor, tp: int, tp_rank: int, arch: ModelArch) -> torch.Tensor:
    """Rank `tp_rank`'s piece of `split_tp(pm, full, tp, arch)` without building the other pieces: a view of
    `full` where the piece is contiguous rows or columns, vocabulary zero-padding only for the rows it holds."""
    if pm.tp_dim is None or tp == 1 and not pm.vocab:
        return full
    if pm.kind == GLU:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    if pm.vocab:
        rows = arch.padded_vocab_size(tp) // tp
        piece = full[tp_rank * rows: (tp_rank + 1) * rows]
        if piece.shape[0] < rows:
            piece = torch.cat([piece, piece.new_zeros(rows - piece.shape[0], *piece.shape[1:])], dim=0)
        return piece
    return full.chunk(tp, dim=pm.tp_dim)[tp_rank]


def split_tp(pm: ParamMap, full: torch.Tensor, tp: int, arch: ModelArch) -> list[torch.Tensor]:
    """The `tp` shards of a Megatron full tensor (vocabulary rows zero-padded to a multiple of tp)."""
    return [tp_shard(pm, full, tp, r, arch) for r in range(tp)]


def merge_tp(pm: ParamMap, shards: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    """Inverse of `split_tp`: the Megatron full tensor (vocabulary padding removed)."""
    if pm.tp_dim is None:
        return shards[0]
    if pm.kind == GLU:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])], dim=0)
    full = torch.cat(shards, dim=pm.tp_dim)
    return full[: arch.vocab_size] if pm.vocab else full


# ---- pipeline stages -------------------------------------------------------------------------------------

def layers_per_stage(arch: ModelArch, pp: int) -> int:
    if arch.num_layers % pp:
        raise ValueError(f"num_layers {arch.num_layers} is not divisible by pp {pp}")
    return arch.num_layers // pp


def stages_of(pm: ParamMap, arch: ModelArch, pp: int, role: str = "policy") -> list[int]:
    """Pipeline stages that hold `pm`. With tied embeddings and pp > 1 the policy's last stage keeps its own
    copy of the embedding as `output_layer.weight` (megatron-core keeps the two in sync through the embedding
    group); the critic has no output layer, so no copy."""
    if pm.layer is not None:
        return [pm.layer // layers_per_stage(arch, pp)]
    if pm.name.startswith("embedding."):
        tied_copy = role == "policy" and arch.tie_word_embeddings and pp > 1
        return [0, pp - 1] if tied_copy else [0]
    return [pp - 1]


def experts_per_rank(arch: ModelArch, ep: int) -> int:
    if arch.num_experts % ep:
        raise ValueError(f"num_experts {arch.num_experts} is not divisible by ep {ep}")
    return arch.num_experts // ep


def ep_owner(pm: ParamMap, arch: ModelArch, ep: int) -> int | None:
    """The expert-parallel rank that holds `pm` (None: every EP rank does)."""
    return None if pm.expert is None else pm.expert // experts_per_rank(arch, ep)


def stage_local_name(pm: ParamMap, arch: ModelArch, pp: int, stage: int, ep: int = 1) -> str:
    """Name of `pm` inside the model of `stage` (local layer index; the tied-embedding copy on the last
    stage is called `output_layer.weight`; an expert has its local index on the EP rank that holds it)."""
    if pm.layer is not None:
        owner = ep_owner(pm, arch, ep)
        offset = 0 if owner is None else owner * experts_per_rank(arch, ep)
        return pm.local_name(stage * layers_per_stage(arch, pp), offset)
    if pm.name.startswith("embedding.") and stage != 0:
        return "output_layer.weight"
    return pm.name


def local_param_maps(arch: ModelArch, role: str, pp: int, pp_rank: int, ep: int = 1, ep_rank: int = 0
                     ) -> list[tuple[str, ParamMap]]:
    """(local name, ParamMap) of every parameter that pipeline stage `pp_rank`, expert-parallel rank `ep_rank`
    holds, in forward order."""
    return [(stage_local_name(pm, arch, pp, pp_rank, ep), pm) for pm in param_maps(arch, role)
            if pp_rank in stages_of(pm, arch, pp, role) and ep_owner(pm, arch, ep) in (None, ep_rank)]


def rank_shard(pm: ParamMap, full: torch.Tensor, arch: ModelArch, *, tp: int, tp_rank: int, etp: int = 1,
               etp_rank: int = 0) -> torch.Tensor:
    """This rank's piece of `pm`'s full tensor: experts split over the expert-TP ranks, the rest over TP."""
    if pm.expert is not None:
        return tp_shard(pm, full, etp, etp_rank, arch)
    return tp_shard(pm, full, tp, tp_rank, arch)


def shard_state_dict(full: dict[str, torch.Tensor], arch: ModelArch, *, role: str, tp: int, tp_rank: int,
                     pp: int, pp_rank: int, ep: int = 1, ep_rank: int = 0, etp: int = 1, etp_rank: int = 0
                     ) -> dict[str, torch.Tensor]:
    """The local state dict (parameters only) of rank (tp_rank, pp_rank, ep_rank, etp_rank) from a Megatron full
    state dict."""
    return {name: rank_shard(pm, full[pm.name], arch, tp=tp, tp_rank=tp_rank, etp=etp, etp_rank=etp_rank)
            for name, pm in local_param_maps(arch, role, pp, pp_rank, ep, ep_rank)}


def iter_local_shards(hf_get, arch: ModelArch, role: str, *, tp: int, tp_rank: int, pp: int, pp_rank: int,
                      ep: int = 1, ep_rank: int = 0, etp: int = 1, etp_rank: int = 0
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (local name, shard of this rank) one parameter at a time, calling `hf_get(name)` only for the HF
    tensors of the parameters this rank holds (this stage's layers, this EP rank's experts). Nothing is kept
    between yields (the caller drops each shard before asking for the next), so peak memory is one parameter's
    tensors."""
    for name, pm in local_param_maps(arch, role, pp, pp_rank, ep, ep_rank):
        full = hf_to_full(pm, {n: hf_get(n) for n in pm.hf_names}, arch)
        shard = rank_shard(pm, full, arch, tp=tp, tp_rank=tp_rank, etp=etp, etp_rank=etp_rank)
        del full
        yield name, shard
        del shard


def load_local_shards(params: dict[str, torch.Tensor], hf_get, arch: ModelArch, role: str, **layout: int) -> None:
    """Stream the HF weights of this rank (`layout`: tp, tp_rank, pp, pp_rank and, for MoE, ep, ep_rank, etp,
    etp_rank) into `params` (its local parameters by name), one parameter at a time, each cast to its parameter's
    dtype: the whole model never sits in host memory. Every parameter must be covered; checked before any tensor
    is read."""
    names = [name for name, _ in local_param_maps(arch, role, layout["pp"], layout["pp_rank"],
                                                    layout.get("ep", 1), layout.get("ep_rank", 0))]
    check_covers(params, names, role)
    with torch.no_grad():
        for name, shard in iter_local_shards(hf_get, arch, role, **layout):
            copy_shard(params[name], name, shard)
            del shard


def check_covers(params: dict[str, torch.Tensor], names, role: str) -> None:
    """Raise KeyError naming every parameter of `params` not in `names` and every name not in `params`."""
    missing, unexpected = sorted(set(params) - set(names)), sorted(set(names) - set(params))
    if missing or unexpected:
        raise KeyError(f"state does not fit the {role} model of this rank: missing {missing}, "
                       f"unexpected {unexpected}")


def copy_shard(param: torch.Tensor, name: str, shard: torch.Tensor) -> None:
    """`param.copy_(shard)` (cast to the parameter's dtype) after checking the shapes agree."""
    if tuple(param.shape) != tuple(shard.shape):
        raise ValueError(f"{name}: model shard has shape {tuple(param.shape)}, checkpoint shard {tuple(shard.shape)}")
    param.copy_(shard)


def iter_hf_to_full(hf_get, arch: ModelArch, role: str = "policy") -> Iterator[tuple[ParamMap, torch.Tensor]]:
    """Yield (ParamMap, Megatron full tensor) one parameter at a time; `hf_get(name)` loads one HF tensor."""
    for pm in param_maps(arch, role):
        yield pm, hf_to_full(pm, {n: hf_get(n) for n in pm.hf_names}, arch)


def hf_shapes(pm: ParamMap, arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """The shape `arch` requires of every HF tensor that `pm` is made of (to check a checkpoint's headers
    before reading any data)."""
    if pm.kind == QKV:
        d = arch.head_dim
        tail = (arch.hidden_size,) if pm.name.endswith("weight") else ()
        rows = (arch.num_heads * d, arch.num_kv_heads * d, arch.num_kv_heads * d)
        return {n: (r, *tail) for n, r in zip(pm.hf_names, rows)}
    if pm.kind == GLU:
        return {n: (_ffn(pm, arch), arch.hidden_size) for n in pm.hf_names}
    return {pm.hf_names[0]: _hf_shape(pm, arch)}
