"""Packed-sequence (THD) core attention for megatron-core's local (plain torch) layer spec.

megatron-core's local `DotProductAttention` refuses `packed_seq_params` (only TransformerEngine's attention takes
the THD layout). Without TE (CPU, or a GPU without TE) this module honours the packing: the stream [T, heads, dim]
is cut at `cu_seqlens_padded` and each sequence slot attends causally to itself only, through torch's
`scaled_dot_product_attention`; so a packed micro-batch gives the same outputs as the same rows padded
(tests/distributed/test_packing.py). Cost is sum_i L_i^2 instead of m x S^2 for m rows padded to S.

Under context parallelism each sequence slot is split into 2 x cp chunks (parallel/context.py:
`packed_cp_positions`); keys and values are all-gathered over the CP group as in models/cp_attention.py, and a
query sees the keys of its own sequence at positions <= its own.

Padding inside a slot (the slot is the sequence rounded up to 2 x cp) sits after the real tokens, so causal
attention keeps it away from every real token; the stream's final padding segment is a slot of its own.
Unpadded (BSHD) calls go to the parent classes unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from vapo_megatron.models.cp_attention import AllGatherCPDotProductAttention, _mask


def attend(q, k, v, keep, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """Attention of one sequence: q [Lq, np, hn] against k, v [Lk, np, hn] -> [Lq, np, hn]; causal when `keep`
    (True = attend, [Lq, Lk]) is None."""
    # [1, np, L, hn]: torch's fused CPU (flash) kernel takes 4-d inputs only; 3-d falls back to the math kernel,
    # which materialises the [np, Lq, Lk] scores (measured: 2x the step time and memory of the fused kernel)
    q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout, is_causal=keep is None,
                                         scale=scale)
    return out[0].transpose(0, 1)


def packed_causal_attention(query, key, value, cu_seqlens_padded: list[int], scale: float,
                            dropout: float = 0.0) -> torch.Tensor:
    """THD attention without context parallelism: query, key, value [T, np, hn] (key/value heads already
    repeated for grouped-query attention), each slot [a, b) of `cu_seqlens_padded` causal within itself.
    Returns [T, np * hn]. tests/gpu/test_thd_attention_cuda.py compares TransformerEngine's THD attention with it."""
    # torch.split, not slicing: a slice's backward writes a zero tensor of the whole stream per sequence
    lens = [b - a for a, b in zip(cu_seqlens_padded[:-1], cu_seqlens_padded[1:])]
    out = [attend(q, k, v, None, scale, dropout)
           for q, k, v in zip(*(x.split(lens) for x in (query, key, value)))]
    return torch.cat(out).reshape(query.shape[0], -1)


class PackedDotProductAttention(AllGatherCPDotProductAttention):
    """The local spec's core attention: padded batches as megatron's DotProductAttention (or the all-gather CP
    attention), packed (THD) batches per sequence slot."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported with packed sequences")
        cu = packed_seq_params.cu_seqlens_q_padded
        slots = (cu if cu is not None else packed_seq_params.cu_seqlens_q).tolist()
        dropout = self.attention_dropout.p if self.training else 0.0
        if self.cp_size == 1:
            return packed_causal_attention(query, *self._repeat_kv(key, value), slots, self.softmax_scale, dropout)
        return self._attend_cp(query, key, value, slots, dropout)

    def _repeat_kv(self, key, value):
        """[t, ng, hn] -> [t, np, hn]: grouped-query attention repeats each key/value head for its queries."""
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups == 1:
            return key, value
        return tuple(x.repeat_interleave(groups, dim=1) for x in (key, value))

    def _attend(self, q, k, v, keep, dropout: float) -> torch.Tensor:
        return attend(q, k, v, keep, self.softmax_scale, dropout)

    def _attend_cp(self, query, key, value, slots: list[int], dropout: float) -> torch.Tensor:
        """Queries of this CP rank against the gathered keys of their own sequence. Each rank holds slot
        [a, b)'s chunks at [a/cp, b/cp) of its local stream; the gather lays the ranks' streams end to end."""
        cp, local = self.cp_size, query.shape[0]
        key = gather_from_sequence_parallel_region(key.contiguous(), True, group=self.cp_group)
        value = gather_from_sequence_parallel_region(value.contiguous(), True, group=self.cp_group)
        key, value = self._repeat_kv(key, value)
        lens = [(b - a) // cp for a, b in zip(slots[:-1], slots[1:])]
        # [cp * local, ...] -> per slot [cp, len, ...] (split, not slicing: see packed_causal_attention)
        keys, values = (x.view(cp, local, *x.shape[1:]).split(lens, dim=1) for x in (key, value))
        out = []
        for q, k, v in zip(query.split(lens), keys, values):
            keep = ~_mask(q.shape[0], cp, self.cp_group.rank(), str(query.device))[0, 0]
            out.append(self._attend(q, k.flatten(0, 1), v.flatten(0, 1), keep, dropout))
        return torch.cat(out).reshape(local, -1)
