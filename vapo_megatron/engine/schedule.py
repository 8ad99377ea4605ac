"""Forward/backward of many micro-batches through megatron-core's pipeline schedules.

Convention of this project: every loss arrives *already normalised by its global count* (tokens of the whole
optimizer step across DP ranks and micro-batches, see vapo_megatron.algorithms). So gradients must be summed,
never averaged, over micro-batches and DP ranks, and never rescaled by a token count afterwards. Megatron's
`calculate_per_token_loss=True` gives exactly the summing (DDP's gradient_scaling_factor = 1, no division by
num_microbatches); `finalize_grads_unscaled` drops the per-token rescale that would otherwise follow.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

from vapo_megatron.data.packing import packed_position_ids, real_token_mask
from vapo_megatron.data.rl_batch import MicroBatch
from vapo_megatron.models.moe import RoutingReplay, aux_loss_scale
from vapo_megatron.parallel.context import context_parallel_view, split_for_context_parallel
from vapo_megatron.parallel.layout import RoleGroups

_MASKS: dict[tuple[int, str], torch.Tensor] = {}


def causal_mask(seq_len: int, device=None) -> torch.Tensor:
    """Boolean [1, 1, S, S] mask, True above the diagonal (masked). Passed explicitly because megatron's
    default causal mask is built on "cuda"; with right padding it is also the correct padding mask."""
    key = (seq_len, str(device))
    if key not in _MASKS:
        _MASKS[key] = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), 1)[None, None]
    return _MASKS[key]


def position_ids(batch: int, seq_len: int, device=None) -> torch.Tensor:
    return torch.arange(seq_len, device=device)[None].expand(batch, seq_len)


def packed_seq_params(mb: MicroBatch, cp_group=None):
    """megatron-core's PackedSeqParams (THD) of a packed micro-batch: real and padded cumulative lengths (int32,
    on the batch's device), the longest slot (RoPE builds its table that long) and the role's CP group (RoPE and
    TE's attention split each slot over it)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu, cu_padded = (t.to(device=mb.input_ids.device, dtype=torch.int32) for t in (mb.cu_seqlens, mb.cu_seqlens_padded))
    longest = int((cu_padded[1:] - cu_padded[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_padded,
                           cu_seqlens_kv_padded=cu_padded, max_seqlen_q=longest, max_seqlen_kv=longest,
                           cp_group=cp_group)


def _sequence_shard(seq: int, sequence_parallel: bool, groups: RoleGroups) -> slice:
    """The positions this rank's MoE layers see: its sequence-parallel shard (the whole sequence without SP)."""
    tp, rank = groups.pg.tp.size(), groups.tp_rank
    return slice(rank * seq // tp, (rank + 1) * seq // tp) if sequence_parallel and tp > 1 else slice(None)


def finalize_grads_unscaled(model, num_tokens=None, *args, **kwargs):
    """finalize_model_grads without the division by the token count (see the module docstring). The schedules
    pass it the role's `pg_collection` (forward_backward hands it to them)."""
    return finalize_model_grads(model, None, *args, **kwargs)


def prepare_config(config) -> None:
    """Set the TransformerConfig fields that the schedules read for this project's loss convention."""
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_grads_unscaled


def _model_config(model: torch.nn.Module):
    """The TransformerConfig of a (DDP-wrapped) megatron model."""
    from megatron.core.utils import get_model_config

    return get_model_config(model)


LossFn = Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def forward_backward(model: torch.nn.Module | Sequence[torch.nn.Module],
                     micro_batches: Sequence[MicroBatch], loss_fn: LossFn | None, *, groups: RoleGroups,
                     forward_only: bool = False, output_fn: Callable[[torch.Tensor, MicroBatch], Any] | None = None,
                     routing_replay: RoutingReplay | None = None) -> list[Any]:
    """Run all micro-batches (`MicroBatch`es: `input_ids` [b, S] at least) through the schedule, in the role's
    process groups `groups` (a `BuiltModel` or `ModelEngine` holds them). Their shapes may differ only
    when the model config has `variable_seq_lengths` (pipeline stages then exchange each activation's shape).

    `loss_fn(output, micro_batch) -> (loss, metrics)`: output is the model's last-stage output (logits shard
    [b, S, V/tp] for a policy, values [b, S] for a critic; [1, T] of the stream for a packed micro-batch, which
    runs with megatron's `PackedSeqParams` and no mask). With context parallelism (cp > 1) the model sees
    this CP rank's share of each sequence, the output covers those positions only, and the micro-batch passed to
    `loss_fn` / `output_fn` is `context_parallel_view(mb)`: gather per-token results with
    `parallel.context.gather_sequence_of` (engine/objectives.py does) before reading response positions.

    The micro-batch passed to `loss_fn` / `output_fn` also carries `tp_group` (the role's tensor-parallel group,
    for the vocab-parallel log-probs). `groups` go to megatron's schedule and through it to finalize_model_grads.

    `routing_replay` (MoE): before each micro-batch's forward, the routers are set to the experts its
    `routed_experts` [b, S, num_moe_layers, k] ([1, T, ...] packed) names (models/moe.py RoutingReplay), or to
    their own routing when it has none. Not with context parallelism (refused), nor with full recomputation (the
    recomputed forward would replay the last micro-batch's choices; config validation refuses it).

    Returns, on the last pipeline stage, the list of per-micro-batch metrics dicts (or `output_fn(output, mb)`
    values when forward_only with output_fn); other stages get an empty list.
    """
    models = list(model) if isinstance(model, Sequence) else [model]
    if not all(isinstance(mb, MicroBatch) for mb in micro_batches):
        raise TypeError("forward_backward takes MicroBatch objects (RLBatch.micro_batch or MicroBatch(...))")
    b, seq = micro_batches[0].input_ids.shape
    results: list[Any] = []
    cp = groups.pg.cp.size()
    cp_rank = groups.cp_rank if cp > 1 else 0
    config = _model_config(models[0])
    if routing_replay is not None and cp > 1:
        raise NotImplementedError(f"routing replay with context parallelism (cp={cp}) is not supported")

    def step(data_iter, chunk):
        mb = next(data_iter)
        ids = mb.input_ids
        packed = packed_seq_params(mb, groups.pg.cp) if mb.packed else None
        pos = packed_position_ids(mb.cu_seqlens_padded.tolist(), ids.device) if mb.packed else \
            position_ids(*ids.shape, ids.device)
        # packed: attention reads cu_seqlens (no mask); cp > 1: the CP attention builds its own mask
        mask = causal_mask(ids.shape[1], ids.device) if cp == 1 and not mb.packed else None
        if cp > 1:  # this CP rank's chunks (of every sequence slot when packed, parallel/context.py)
            ids, pos = (split_for_context_parallel(t, cp, cp_rank, cu_seqlens_padded=mb.cu_seqlens_padded)
                        for t in (ids, pos))
            mb = context_parallel_view(mb, cp, cp_rank, groups.pg.cp)
        mb = mb.replace(tp_group=groups.pg.tp)
        if routing_replay is not None:
            routed = mb.routed_experts
            routing_replay.set(routed, _sequence_shard(ids.shape[1], config.sequence_parallel, groups),
                               real_token_mask(mb) if routed is not None else None)
        out = chunk(ids, pos, mask) if packed is None else chunk(ids, pos, mask, packed_seq_params=packed)

        def reduce(output):
            if output_fn is not None:
                results.append(output_fn(output, mb))
                return output.sum() * 0.0, torch.tensor(1), {}
            loss, metrics = loss_fn(output, mb)
            # every CP rank computes the same whole-sequence loss (see parallel/context.py): count it once
            return loss / cp, torch.tensor(1), metrics

        return out, reduce

    if config.num_moe_experts:  # the routers' load-balancing loss: mean over micro-batches and DP (models/moe.py)
        scale = aux_loss_scale(len(micro_batches), groups.dp_size)
        config.moe_grad_scale_func = lambda: torch.tensor(scale)
    schedule = get_forward_backward_func(pp_size=groups.pg.pp.size(), vp_size=None)
    stored = schedule(
        forward_step_func=step, data_iterator=iter(micro_batches), model=models,
        num_microbatches=len(micro_batches), seq_length=seq, micro_batch_size=b, forward_only=forward_only,
        p2p_communicator=P2PCommunicator(pp_group=groups.pg.pp, config=config),
        pg_collection=groups.pg)
    if routing_replay is not None:
        routing_replay.set(None)  # the routers route by themselves again after this call
    if not groups.is_last_stage:
        return []
    return results if output_fn is not None else list(stored)
