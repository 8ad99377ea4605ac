"""Recording the experts vLLM routes each token to (for routing replay in the trainer, models/moe.py).

vLLM's own capture (`enable_return_routed_experts`) needs its Model Runner V2, which needs Triton: not on CPU.
Here a capture hook is set on every MoE router of the engine's model (`BaseRouter.set_capture_fn`, called with
the top-k expert ids of every token the router sees), and each finished sequence is run once more as a prefill
of all its tokens, so the hook sees every position in order. Deviation, written here where it happens: the
routing is recorded by that prefill with the same weights, not during the decode steps that sampled the tokens;
the two compute the same router logits up to floating-point summation order.

The worker-side functions run inside the engine's worker through `LLM.collective_rpc(fn)`.
"""
from __future__ import annotations

import torch


def begin_routing_capture(worker) -> int:
    """Hook every MoE router of the worker's model (in layer order); returns the number of MoE layers."""
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    captured: list[list[torch.Tensor]] = []
    for module in worker.model_runner.get_model().modules():
        router = getattr(module, "router", None)
        if isinstance(router, BaseRouter):
            chunks: list[torch.Tensor] = []
            captured.append(chunks)
            router.set_capture_fn(lambda ids, chunks=chunks: chunks.append(ids.to(torch.int16).cpu().clone()))
    worker.vapo_routing = captured
    return len(captured)


def end_routing_capture(worker) -> list[torch.Tensor]:
    """Remove the hooks; per MoE layer, the expert ids of every token routed since `begin` [tokens, k]."""
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    for module in worker.model_runner.get_model().modules():
        router = getattr(module, "router", None)
        if isinstance(router, BaseRouter):
            router.set_capture_fn(None)
    captured, worker.vapo_routing = worker.vapo_routing, None
    return [torch.cat(chunks) for chunks in captured]


def record_routing(engine, sequences: list[list[int]]) -> list[torch.Tensor]:
    """For each token sequence (prompt + response), the experts the engine's model routes each of its tokens to:
    [len(seq), num_moe_layers, k] int16, one prefill per sequence (the prefix cache is reset first, so every
    position is computed)."""
    from vllm import SamplingParams

    out = []
    params = SamplingParams(max_tokens=1, temperature=0.0)
    for seq in sequences:
        engine.llm.reset_prefix_cache()
        engine.llm.collective_rpc(begin_routing_capture)
        engine.llm.generate([{"prompt_token_ids": list(seq)}], params, use_tqdm=False)
        layers = engine.llm.collective_rpc(end_routing_capture)[0]
        out.append(torch.stack(layers, dim=1)[: len(seq)])
    engine.llm.reset_prefix_cache()
    return out


def record_routing_distributed(engine, input_ids: torch.Tensor, seq_lens: torch.Tensor, num_experts: int,
                               group=None) -> torch.Tensor:
    """The experts of every token of a batch (`input_ids` [n, S] right padded, `seq_lens` [n] real tokens) as the
    batch's `routed_experts` [n, S, num_moe_layers, k]: uint8 when `num_experts` <= 256, else int16. Each vLLM
    engine of `group` records a contiguous share of the rows (as `generate_distributed` shares prompts), and every
    rank returns the whole tensor. Padding positions name experts 0..k-1 (distinct, as a router would; no loss
    reads them).

    Memory: n x S x layers x k bytes on every rank (Qwen3-30B-A3B, 48 layers x top-8: 384 bytes per token)."""
    import torch.distributed as dist

    from vapo_megatron.rollout.sampler import engine_replica, shard_bounds

    n = input_ids.shape[0]
    sequences = [input_ids[i, :int(seq_lens[i])].tolist() for i in range(n)]
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dp_rank, dp_size = engine_replica(dist.get_rank(group), dist.get_world_size(group),
                                          engine.tensor_parallel_size)
        start, stop = shard_bounds(n, dp_size, dp_rank)
        local = record_routing(engine, sequences[start:stop])
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, local, group=group)
        recorded = [t for part in gathered[::engine.tensor_parallel_size] for t in part]
    else:
        recorded = record_routing(engine, sequences)
    layers, k = recorded[0].shape[1:]
    dtype = torch.uint8 if num_experts <= 256 else torch.int16
    out = torch.arange(k, dtype=dtype).expand(n, input_ids.shape[1], layers, k).clone()
    for i, r in enumerate(recorded):
        out[i, :r.shape[0]] = r.to(dtype)
    return out
