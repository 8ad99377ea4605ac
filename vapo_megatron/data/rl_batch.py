"""Grouped rollouts -> the tensors one training step works on (one dict of whole-batch tensors, the same on
every rank; each engine takes its data-parallel slice)."""
from __future__ import annotations

import torch


def build_rl_batch(prompt_ids: list[list[int]], prompt_index: torch.Tensor, response_ids: list[list[int]],
                   rollout_logprobs: list[list[float]], *, pad_to_multiple: int = 8, pad_id: int = 0
                   ) -> dict[str, torch.Tensor]:
    """Concatenate each prompt with its response (right padded to S, a multiple of `pad_to_multiple`, which
    sequence parallelism needs) and index the response tokens: `resp_pos[i, j]` is the position whose output
    predicts response token j (prompt_len - 1 + j); `seq_lens[i]` counts row i's prompt + response tokens."""
    n = len(response_ids)
    plens = [len(prompt_ids[int(p)]) for p in prompt_index]
    rlens = [len(r) for r in response_ids]
    width = max(p + r for p, r in zip(plens, rlens))
    seq = -(-width // pad_to_multiple) * pad_to_multiple
    resp = max(1, max(rlens))
    input_ids = torch.full((n, seq), pad_id, dtype=torch.long)
    resp_pos = torch.zeros(n, resp, dtype=torch.long)
    resp_mask = torch.zeros(n, resp)
    logprobs = torch.zeros(n, resp)
    for i, (p, r) in enumerate(zip(plens, rlens)):
        input_ids[i, :p] = torch.tensor(prompt_ids[int(prompt_index[i])])
        if r:
            input_ids[i, p:p + r] = torch.tensor(response_ids[i])
            logprobs[i, :r] = torch.tensor(rollout_logprobs[i][:r])
        resp_pos[i] = (p - 1 + torch.arange(resp)).clamp(max=seq - 1)
        resp_mask[i, :r] = 1.0
    return dict(input_ids=input_ids, targets=torch.roll(input_ids, -1, dims=1), resp_pos=resp_pos,
                resp_mask=resp_mask, rollout_logprobs=logprobs, lengths=torch.tensor(rlens),
                seq_lens=torch.tensor([p + r for p, r in zip(plens, rlens)]),
                prompt_index=prompt_index.clone())
