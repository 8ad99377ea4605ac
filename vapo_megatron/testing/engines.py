"""Real engines and RL batches for the engine tests (called inside `run_distributed` bodies).

    layouts = RoleLayouts(ParallelConfig(tp=2), ParallelConfig())
    actor = build_engine(hf_dir, "policy", layouts)
    batch = synthetic_rl_batch(8, vocab=128, seed=3)
    actor.train_step(batch, actor_objective(AlgorithmConfig(), minibatch_counts(batch), 128))
"""
from __future__ import annotations

import torch

from vapo_megatron.data.rl_batch import MicroBatch, RLBatch


def engine_pieces(**settings) -> tuple:
    """(OptimConfig, Execution) from flat test settings (`lr=`, `micro_batch_size=`, `pack_sequences=`, ...):
    each name goes to the piece that has the field; tests default to lr 1e-3, no weight decay and micro-batches
    of 2 rows. An unknown name raises TypeError."""
    import dataclasses

    from vapo_megatron.config import OptimConfig
    from vapo_megatron.engine.model_engine import Execution

    settings = {"lr": 1e-3, "weight_decay": 0.0, "micro_batch_size": 2, **settings}
    optim_names = {f.name for f in dataclasses.fields(OptimConfig)}
    exec_names = {f.name for f in dataclasses.fields(Execution)}
    unknown = set(settings) - optim_names - exec_names
    if unknown:
        raise TypeError(f"engine_pieces: unknown settings {sorted(unknown)}")
    return (OptimConfig(**{k: v for k, v in settings.items() if k in optim_names}),
            Execution(**{k: v for k, v in settings.items() if k in exec_names}))


def build_engine(hf_dir: str, role: str, layouts, *, routing_replay: bool = False, **settings):
    """A ModelEngine for `role` with the weights of the HF model in `hf_dir` (critic: trunk + a fixed
    N(0, 0.02) value head), in `layouts`' layout for that role; `settings` as `engine_pieces` takes them."""
    from vapo_megatron.convert.hf_io import HFCheckpointReader
    from vapo_megatron.engine.model_engine import ModelEngine
    from vapo_megatron.models.hf_config import load_arch

    arch = load_arch(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    score = torch.randn(1, arch.hidden_size, generator=torch.Generator().manual_seed(5)) * 0.02

    def get(name):
        return score if name == "score.weight" else reader.get(name)

    optim, execution = engine_pieces(**settings)
    return ModelEngine(role, arch, layouts, optim, execution, get, routing_replay=routing_replay)


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
                               seq: int = 16, *, groups):
    """The policy's log-probs of each row's response tokens (rows `tokens` = prompt + response, right-padded to
    `seq`), on the last pipeline stage (None elsewhere): what vLLM's rollout log-probs are compared with."""
    from vapo_megatron.engine.schedule import forward_backward
    from vapo_megatron.parallel.vocab_parallel import megatron_vocab_logprobs_entropy

    ids = torch.zeros(len(tokens), seq, dtype=torch.long)
    for i, t in enumerate(tokens):
        ids[i, : len(t)] = torch.tensor(t)
    targets = torch.roll(ids, -1, dims=1)

    def output_fn(logits, mb):
        lp, _ = megatron_vocab_logprobs_entropy(logits, mb.targets, arch.vocab_size)
        return lp.detach()

    out = forward_backward(model, [MicroBatch(input_ids=ids, targets=targets)], None, forward_only=True,
                           output_fn=output_fn, groups=groups)
    if not out:
        return None
    # logits at position t score token t+1: the response token j sits at prompt_len + j
    return [out[0][i, p - 1: p - 1 + r] for i, (p, r) in enumerate(zip(prompt_lens, resp_lens))]


def weighted_outputs_and_grads(built, arch, role: str, ids, w_logits, w_values, rows: list[int]):
    """The parallel-equivalence probe of a built model: for micro-batches `ids[i]` (i in `rows`), the forward
    outputs (the policy's logits gathered over TP and cut to the vocabulary; the critic's values) and the whole
    gradients (every rank) of sum(outputs x weights), `w_logits[i]` (this TP rank's vocabulary shard) for the
    policy, `w_values[i]` for the critic. Returns (outputs per row of `rows`, on the last pipeline stage; full
    gradients by HF-mapped name)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from vapo_megatron.engine.gather import full_state_dict
    from vapo_megatron.engine.schedule import forward_backward

    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    w_pad = torch.nn.functional.pad(w_logits, (0, arch.padded_vocab_size(tp_size) - arch.vocab_size))
    micro = [MicroBatch(input_ids=ids[i]) for i in rows]
    weights = [w_values[i] if role == "critic" else w_pad[i].chunk(tp_size, -1)[tp_rank] for i in rows]

    def gather_output(out, mb):
        if role == "critic":
            return out.detach().clone()
        parts = [torch.empty_like(out) for _ in range(tp_size)]
        dist.all_gather(parts, out.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
        return torch.cat(parts, -1)[..., : arch.vocab_size]

    outputs = forward_backward(built.model, micro, None, forward_only=True, output_fn=gather_output,
                               groups=built.groups)
    pending = iter(weights)  # the schedule computes the losses in micro-batch order

    def loss_fn(out, mb):
        loss = (out * next(pending)).sum()
        return loss, {"loss": loss.detach()}

    built.model.zero_grad_buffer()
    forward_backward(built.model, micro, loss_fn, groups=built.groups)
    return outputs, full_state_dict(built.model, arch, role, getter=lambda p: p.main_grad)
