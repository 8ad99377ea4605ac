"""Step boundaries of a response and the token values they give (pure, no engine).

A boundary ``b`` is a response position: the state is the prompt plus the first ``b`` response tokens, and
``V(b)`` is the expected final reward from there. Position 0 (the prompt alone) is always a boundary. A step runs
from its boundary to the next; its tokens take its value, the value the critic would predict at that position
(``values[t] = V(s_t)``, read before token ``t``).
"""
from __future__ import annotations

from collections.abc import Collection, Sequence

import torch


def step_boundaries(response_ids: Sequence[int], *, delimiter_ids: Collection[int] = (), every_tokens: int = 0,
                    every_step: int = 1, max_steps: int = 16) -> list[int]:
    """Sorted boundaries of one response: 0, then the position after each delimiter token (or every
    ``every_tokens`` tokens when no delimiter ids are given), never the response's end (nothing follows it).
    ``every_step`` keeps every j-th boundary after the first; beyond ``max_steps`` they are thinned evenly (the
    first always kept)."""
    if every_step < 1 or max_steps < 1:
        raise ValueError(f"every_step {every_step} and max_steps {max_steps} must be >= 1")
    length = len(response_ids)
    if delimiter_ids:
        ids = set(delimiter_ids)
        inner = [i + 1 for i, tok in enumerate(response_ids) if tok in ids and i + 1 < length]
    elif every_tokens >= 1:
        inner = list(range(every_tokens, length, every_tokens))
    else:
        raise ValueError("step boundaries need delimiter ids or every_tokens >= 1")
    kept = [0] + inner[every_step - 1::every_step]
    if len(kept) > max_steps:
        picks = torch.linspace(0, len(kept) - 1, max_steps).round().long().tolist()
        kept = [kept[i] for i in sorted(set(picks))]
    return kept


def boundary_token_values(boundaries: Sequence[int], values: Sequence[float], final: float, length: int,
                          width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(value, next_value)``, each ``[width]`` float32: token ``t < length`` of the step that starts at boundary
    ``b_j`` gets ``V(b_j)`` and ``V(b_{j+1})`` (``final``, the response's reward, for the last step); 0 beyond
    ``length``."""
    if len(boundaries) != len(values) or not boundaries or boundaries[0] != 0:
        raise ValueError(f"boundaries must start at 0 and match the values: {list(boundaries)}, {list(values)}")
    value, nxt = torch.zeros(width), torch.zeros(width)
    ends = [*boundaries[1:], length]
    following = [*values[1:], final]
    for start, end, v, n in zip(boundaries, ends, values, following):
        value[start:end] = v
        nxt[start:end] = n
    return value, nxt


def delimiter_token_ids(tokenizer, delimiter: str) -> frozenset[int]:
    """Every token id whose text contains ``delimiter`` (a BPE vocabulary merges newlines into tokens such as
    ``".\\n\\n"``; each of those ends a step)."""
    vocab = getattr(tokenizer, "vocab_size", None) or len(tokenizer)
    size = max(vocab, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
    return frozenset(i for i, text in enumerate(texts) if delimiter in text)
