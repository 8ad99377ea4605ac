"""A slow, obviously-correct reference for rollout log-probs: one Hugging Face forward per response.

Used by tests and debugging to check that the rollout engine's log-probs are the model's (temperature 1)
log-probs, and that a weight push really changed the served model.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def hf_response_logprobs(model, prompt_ids: list[int], response_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each response token, the model's argmax at each response position), both [len(response)],
    from a float32 causal-LM forward over prompt + response."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    logprobs = model(ids).logits[0].float().log_softmax(-1)
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(response_ids))
    return logprobs[positions, torch.tensor(response_ids, dtype=torch.long)], logprobs[positions].argmax(-1)


def max_logprob_error(model, prompts: list[list[int]], output) -> float:
    """Largest |rollout log-prob - reference log-prob| over every token of a RolloutOutput."""
    worst = 0.0
    for i, response in enumerate(output.response_ids):
        if not response:
            continue
        reference, _ = hf_response_logprobs(model, prompts[int(output.prompt_index[i])], response)
        worst = max(worst, (torch.tensor(output.rollout_logprobs[i]) - reference).abs().max().item())
    return worst
