"""Real engines and RL batches for the engine tests (called inside `run_distributed` bodies).

    layouts = RoleLayouts(ParallelConfig(tp=2), ParallelConfig())
    actor = build_engine(hf_dir, "policy", layouts)
    batch = synthetic_rl_batch(8, vocab=128, seed=3)
    actor.train_step(batch, actor_loss_fn(AlgorithmConfig(), minibatch_counts(batch), 128))
"""
from __future__ import annotations

import torch

from vapo_megatron.data.rl_batch import RLBatch


def build_engine(hf_dir: str, role: str, layouts, **engine_kwargs):
    """A ModelEngine for `role` with the weights of the HF model in `hf_dir` (critic: trunk + a fixed
    N(0, 0.02) value head), in `layouts`' layout for that role."""
    from vapo_megatron.convert.hf_io import HFCheckpointReader
    from vapo_megatron.engine.model_engine import ModelEngine
    from vapo_megatron.models.hf_config import load_arch

    arch = load_arch(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    score = torch.randn(1, arch.hidden_size, generator=torch.Generator().manual_seed(5)) * 0.02

    def get(name):
        return score if name == "score.weight" else reader.get(name)

    kwargs = {"lr": 1e-3, "micro_batch_size": 2, **engine_kwargs}
    return ModelEngine(role, arch, layouts.configs[role], layouts, hf_get=get, **kwargs)


def synthetic_rl_batch(n: int, vocab: int, *, seed: int, prompt_len: tuple[int, int] = (3, 12),
                       resp_len: tuple[int, int] = (1, 20), pad_to_multiple: int = 8,
                       lengths: list[int] | None = None) -> RLBatch:
    """`n` prompt+response rows of random lengths, built by the trainer's `build_rl_batch`, with the per-token
    fields of a PPO step (old log-probs near the policy's, advantages, returns, old values, is_correct).
    `lengths` fixes the response lengths (and so the row order of long and short rows)."""
    from vapo_megatron.data.rl_batch import build_rl_batch

    g = torch.Generator().manual_seed(seed)
    plens = torch.randint(prompt_len[0], prompt_len[1] + 1, (n,), generator=g).tolist()
    rlens = lengths or torch.randint(resp_len[0], resp_len[1] + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(3, vocab, (p,), generator=g).tolist() for p in plens]
    responses = [torch.randint(3, vocab, (r,), generator=g).tolist() for r in rlens]
    logprobs = [(-torch.rand(r, generator=g) * 5).tolist() for r in rlens]
    batch = build_rl_batch(prompts, torch.arange(n), responses, logprobs, pad_to_multiple=pad_to_multiple)
    r = batch.resp_mask.shape[1]
    batch.old_logprobs = batch.rollout_logprobs - 0.05 * torch.rand(n, r, generator=g)
    batch.advantages = torch.randn(n, r, generator=g) * batch.resp_mask
    batch.returns = torch.randn(n, r, generator=g) * batch.resp_mask
    batch.old_values = torch.randn(n, r, generator=g) * batch.resp_mask
    batch.is_correct = torch.rand(n, generator=g) > 0.5
    return batch


def megatron_response_logprobs(model, arch, tokens: list[list[int]], prompt_lens: list[int], resp_lens: list[int],
                               seq: int = 16):
    """The policy's log-probs of each row's response tokens (rows `tokens` = prompt + response, right-padded to
    `seq`), on the last pipeline stage (None elsewhere): what vLLM's rollout log-probs are compared with."""
    from vapo_megatron.engine.schedule import forward_backward
    from vapo_megatron.parallel.vocab_parallel import megatron_vocab_logprobs_entropy

    ids = torch.zeros(len(tokens), seq, dtype=torch.long)
    for i, t in enumerate(tokens):
        ids[i, : len(t)] = torch.tensor(t)
    targets = torch.roll(ids, -1, dims=1)

    def output_fn(logits, mb):
        lp, _ = megatron_vocab_logprobs_entropy(logits, mb["targets"], arch.vocab_size)
        return lp.detach()

    out = forward_backward(model, [dict(input_ids=ids, targets=targets)], None, forward_only=True,
                           output_fn=output_fn)
    if not out:
        return None
    # logits at position t score token t+1: the response token j sits at prompt_len + j
    return [out[0][i, p - 1: p - 1 + r] for i, (p, r) in enumerate(zip(prompt_lens, resp_lens))]
