"""Token log-probs and entropy from vocabulary-parallel logits, without gathering the vocabulary.

Each TP rank holds logits for a contiguous slice of the vocabulary. Three all-reduces over the TP group give
the global max, the global sum of exponentials and the target logit; entropy needs one more (the sum of
p log p over the shard). Memory: the forward allocates at most about two shard-sized tensors (the
probabilities, kept for backward, and one temporary), which `benchmarks/bench_vocab_parallel.py` measures.

Entries past `vocab_size` (padding so that the vocabulary divides by TP) are excluded: probability exactly 0,
never a target. Logits are divided by `temperature` first, so the log-probs are those of the distribution the
rollout engine sampled from at that temperature.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, vocab_size, temperature, group):
        local_v = logits.shape[-1]
        probs = logits.to(torch.float32, copy=True)  # becomes the probabilities, in place, below
        if temperature != 1.0:
            probs.div_(temperature)
        pad_from = max(0, min(local_v, vocab_size - vocab_start))
        if pad_from < local_v:
            probs[..., pad_from:] = float("-inf")
        global_max = _all_reduce(probs.max(dim=-1, keepdim=True).values, dist.ReduceOp.MAX, group)
        probs.sub_(global_max)
        in_shard = (targets >= vocab_start) & (targets < vocab_start + pad_from)
        local_idx = (targets - vocab_start).clamp(0, local_v - 1)
        target_logit = probs.gather(-1, local_idx.unsqueeze(-1)).squeeze(-1) * in_shard
        target_logit = _all_reduce(target_logit, dist.ReduceOp.SUM, group)
        probs.exp_()
        sum_exp = _all_reduce(probs.sum(dim=-1), dist.ReduceOp.SUM, group)
        log_z = sum_exp.log()
        probs.div_(sum_exp.unsqueeze(-1))
        plogp = _all_reduce(torch.special.xlogy(probs, probs).sum(dim=-1), dist.ReduceOp.SUM, group)
        entropy = -plogp
        logprobs = target_logit - log_z
        ctx.save_for_backward(probs, local_idx, in_shard, entropy)
        ctx.temperature = temperature
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        probs, local_idx, in_shard, entropy = ctx.saved_tensors
        g_lp = grad_logprobs if grad_logprobs is not None else torch.zeros_like(entropy)
        g_h = grad_entropy if grad_entropy is not None else torch.zeros_like(entropy)
        # d logp / dz = onehot - p;  dH / dz = -p (log p + H);  both times 1/temperature.
        grad = probs * (-(g_lp + g_h * entropy)).unsqueeze(-1)
        probs.xlogy_(probs)  # p log p in place: probs are not needed any more
        grad.addcmul_(probs, g_h.unsqueeze(-1), value=-1.0)
        grad.scatter_add_(-1, local_idx.unsqueeze(-1), (g_lp * in_shard).unsqueeze(-1))
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        return grad, None, None, None, None, None


def vocab_parallel_logprobs_entropy(logits: torch.Tensor, targets: torch.Tensor, *, vocab_start: int = 0,
                                    vocab_size: int | None = None, temperature: float = 1.0, group=None
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of `targets` and entropy of the softmax, from this rank's logits shard.

    logits: [..., V/tp] holding global vocabulary ids [vocab_start, vocab_start + V/tp); targets: [...] global
    ids; vocab_size: the true vocabulary (padding beyond it is excluded); group: the TP process group (None =
    unsharded). Returns fp32 (logprobs, entropy) of shape [...], identical on every TP rank, differentiable
    with respect to the shard."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    vocab_size = vocab_size if vocab_size is not None else vocab_start + logits.shape[-1]
    return _VocabParallelLogprobEntropy.apply(logits, targets, vocab_start, vocab_size, temperature, group)


def megatron_vocab_logprobs_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                                    temperature: float = 1.0, tp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`vocab_parallel_logprobs_entropy` with megatron's vocab split (TP rank r holds the r-th equal slice) over
    the tensor-parallel group `tp_group` (None: megatron's global one, for single-layout scripts)."""
    if tp_group is None:
        from megatron.core import parallel_state as ps

        tp_group = ps.get_tensor_model_parallel_group()
    rank = dist.get_rank(tp_group) if dist.get_world_size(tp_group) > 1 else 0
    return vocab_parallel_logprobs_entropy(
        logits, targets, vocab_start=rank * logits.shape[-1], vocab_size=vocab_size, temperature=temperature,
        group=tp_group)
