"""Context-parallel attention for megatron-core's local (plain torch) layer spec: all-gather keys and values.

megatron-core has context parallelism only in TransformerEngine's attention (ring attention over P2P, CUDA only);
its local `DotProductAttention` asserts cp == 1. Without TE (CPU, or a GPU without TE) this module gives the same
result by gathering the keys and values of the whole sequence from every CP rank (the "all-gather" CP of Llama 3's
training): each rank keeps only its queries (chunks r and 2cp-1-r of the sequence, parallel/context.py), so the
attention scores are [local_len, seq_len] per head instead of [seq_len, seq_len]. The K/V gather costs
2 * seq_len * kv_heads * head_dim per layer in memory, which is small next to activations for GQA models; ring
attention overlaps the same traffic with compute and is what the GPU path uses.

Backward: the gather's backward reduce-scatters the key/value gradients, so each rank's K/V receives the
gradients of every rank's queries. Tested against cp = 1 in tests/distributed/test_context_parallel.py.
"""
from __future__ import annotations

import copy
import functools

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention

from vapo_megatron.parallel.context import cp_causal_mask


@functools.lru_cache(maxsize=16)
def _mask(local_len: int, cp: int, rank: int, device: str) -> torch.Tensor:
    return cp_causal_mask(local_len, cp, rank, torch.device(device))


class AllGatherCPDotProductAttention(DotProductAttention):
    """megatron's DotProductAttention with keys and values gathered over the context-parallel group.

    The `attention_mask` argument is ignored: the causal mask over whole-sequence positions is built here from the
    CP layout (a query at position i sees keys at positions <= i), which with right padding is also the padding
    mask. Packed (THD) batches are handled by its subclass in models/thd_attention.py, the local spec's core
    attention."""

    def __init__(self, config, *args, pg_collection=None, **kwargs):
        self.cp_size = config.context_parallel_size
        local = copy.copy(config)  # DotProductAttention asserts cp == 1; it uses the config for nothing CP-related
        local.context_parallel_size = 1
        super().__init__(local, *args, pg_collection=pg_collection, **kwargs)
        self.cp_group = self.pg_collection.cp if self.cp_size > 1 else None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if self.cp_size == 1:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        # [s/cp, b, ng, hn] -> [s, b, ng, hn], shards in rank order (cp_key_positions gives their positions)
        key = gather_from_sequence_parallel_region(key.contiguous(), True, group=self.cp_group)
        value = gather_from_sequence_parallel_region(value.contiguous(), True, group=self.cp_group)
        mask = _mask(query.shape[0], self.cp_size, self.cp_group.rank(), str(query.device))
        return super().forward(query, key, value, mask, attn_mask_type, attention_bias, packed_seq_params)
