"""Token-level credit, made visible: the first wrong step of a response (a reward's ``first_error_span``) mapped
to response tokens, the advantage those tokens get against the rest of the wrong response (metrics), and the
responses picked for the credit picture (rendered by :mod:`vapo_megatron.report.credit_render`).

Characters to tokens: a reward sees the response decoded with ``skip_special_tokens=True``; the character offsets
of token k are found by decoding the prefixes ``ids[:k]`` the same way. That is robust for byte-level BPE (a
multi-byte character split over tokens is found through the replacement character that a prefix ending inside it
decodes to) and for character-level tokenizers: a span covers every token holding a byte of one of its characters.
It assumes that decoding a prefix gives a prefix of the text, which holds for both."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vapo_megatron.algorithms import first_error_credit
from vapo_megatron.data.rl_batch import RLBatch
from vapo_megatron.rewards.registry import first_error_span

TokenSpan = tuple[int, int]
"""``[first_token, end_token)`` of a response's first wrong step, in response-token positions."""
def _prefix_chars(tokenizer: Any, ids: Sequence[int], k: int, text: str, partial: bool) -> int:
    """How many characters of ``text`` the first ``k`` tokens complete (common prefix of their decoding), plus
    one if ``partial`` and they end inside a character (a trailing replacement character)."""
    decoded = tokenizer.decode(list(ids[:k]), skip_special_tokens=True)
    common = len(os.path.commonprefix([decoded, text]))
    return common + int(partial and decoded[common:common + 1] == "\ufffd")


def _first_prefix_reaching(tokenizer: Any, ids: Sequence[int], text: str, chars: int, partial: bool) -> int:
    """The smallest k with ``_prefix_chars(k) >= chars`` (binary search: the count grows with k); len(ids) + 1
    when none does."""
    lo, hi = 1, len(ids) + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _prefix_chars(tokenizer, ids, mid, text, partial) >= chars:
            hi = mid
        else:
            lo = mid + 1
    return lo


def char_span_to_tokens(tokenizer: Any, ids: Sequence[int], text: str, span: tuple[int, int]) -> TokenSpan | None:
    """Response-token positions ``[t0, t1)`` covering characters ``[start, end)`` of ``text`` (the decoding of
    ``ids``): every token that holds at least a byte of one of those characters. None when no token does."""
    start, end = span
    k0 = _first_prefix_reaching(tokenizer, ids, text, start + 1, True)  # the token starting character `start`
    k1 = _first_prefix_reaching(tokenizer, ids, text, end, False)       # the token completing character `end - 1`
    if k0 > len(ids):
        return None
    return k0 - 1, max(k0, min(k1, len(ids)))


def error_token_spans(tokenizer: Any, response_ids: Sequence[Sequence[int]], texts: Sequence[str],
                      extras: Sequence[dict[str, Any]]) -> list[TokenSpan | None]:
    """The first-wrong-step token span of every response whose reward returned a valid ``first_error_span``."""
    out: list[TokenSpan | None] = []
    for ids, text, extra in zip(response_ids, texts, extras):
        span = first_error_span(extra or {}, len(text))
        out.append(None if span is None else char_span_to_tokens(tokenizer, ids, text, span))
    return out


def error_token_mask(spans: Sequence[TokenSpan | None], mask: torch.Tensor) -> torch.Tensor:
    """``[B, R]`` bool: the tokens of each response's first wrong step (within ``mask``)."""
    out = torch.zeros(mask.shape, dtype=torch.bool)
    for i, span in enumerate(spans):
        if span is not None:
            out[i, span[0]:span[1]] = True
    return out & mask.bool()


def credit_metrics(batch: RLBatch) -> dict[str, float]:
    """``credit_first_error_adv`` / ``credit_rest_wrong_adv`` (mean advantage on the first wrong step's tokens /
    on the other tokens of the same wrong responses), ``credit_first_error_ratio`` (first / rest, only when rest
    < 0), ``credit_first_error_gap`` (per-response mean difference: 0 for value-free advantages) and
    ``credit_error_spans`` (wrong responses with a span); nothing when no wrong response has a span."""
    spans = batch.first_error_tokens if batch.has("first_error_tokens") else None
    if not spans:
        return {}
    wrong = ~batch.is_correct.bool()
    err = error_token_mask(spans, batch.resp_mask) & wrong[:, None]
    if not err.any():
        return {}
    c = first_error_credit(batch.advantages, batch.resp_mask, err)
    out = {"credit_first_error_adv": c["first"].item(), "credit_rest_wrong_adv": c["rest"].item(),
           "credit_first_error_ratio": c["ratio"].item(), "credit_first_error_gap": c["gap"].item(),
           "credit_error_spans": c["rows"].item()}
    if batch.has("old_values"):
        out.update(value_by_error(batch.old_values, batch.resp_mask, err, batch.is_correct.bool()))
    return out


def value_by_error(values: torch.Tensor, mask: torch.Tensor, err: torch.Tensor, correct: torch.Tensor
                   ) -> dict[str, float]:
    """Whether the values see the first mistake: their mean over the tokens of correct responses
    (``credit_value_correct``), of wrong responses with a span before it (``credit_value_before_error``) and from
    its first token on (``credit_value_from_error``). Where a mistake is decisive (no recovery), the true value from
    it on is 0, so a critic that sees it has ``from_error`` near 0 and below ``before_error``. NaN where a class
    has no token."""
    m = mask.bool()
    from_error = (err.cumsum(dim=1) > 0) & m
    before = m & err.any(dim=1, keepdim=True) & ~from_error
    v = values.detach().to(torch.float64)

    def mean(sel: torch.Tensor) -> float:
        return (v[sel].sum() / sel.sum()).item() if sel.any() else float("nan")

    return {"credit_value_correct": mean(m & correct[:, None]), "credit_value_before_error": mean(before),
            "credit_value_from_error": mean(from_error)}


def pick_responses(batch: RLBatch, count: int = 4) -> list[int]:
    """Rows worth showing: the first correct response, then wrong ones (those with a first-wrong-step span
    first), then anything else, up to ``count``; deterministic (batch order)."""
    correct = batch.is_correct.bool().tolist()
    spans = (batch.first_error_tokens if batch.has("first_error_tokens") else None) or [None] * len(correct)
    rows = [i for i, c in enumerate(correct) if c][:1]
    rows += [i for i, c in enumerate(correct) if not c and spans[i] is not None]
    rows += [i for i, c in enumerate(correct) if not c and spans[i] is None]
    rows += [i for i in range(len(correct)) if i not in rows]
    return rows[:count]


def write_credit_report(run_dir: str | os.PathLike, step: int, batch: RLBatch, tokenizer: Any,
                        count: int = 4) -> tuple[Path, Path]:
    """``<run_dir>/credit/step_XXXX.png`` and ``.html``: a few responses of this step's batch, their tokens
    coloured by advantage and by value; returns both paths. Rank 0 only (callers check)."""
    from vapo_megatron.report.credit_render import CreditRow, render_html, render_png

    rows = []
    spans = (batch.first_error_tokens if batch.has("first_error_tokens") else None) or [None] * batch.n
    for i in pick_responses(batch, count):
        n = int(batch.lengths[i])
        ids = batch.input_ids[i, batch.response_positions([i])[0, :n] + 1].tolist()
        values = batch.old_values[i, :n].tolist() if batch.has("old_values") else None
        rows.append(CreditRow(index=i, tokens=token_texts(tokenizer, ids), advantages=batch.advantages[i, :n]
                              .tolist(), values=values, score=float(batch.scores[i]),
                              correct=bool(batch.is_correct[i]), error_span=spans[i]))
    out = Path(run_dir) / "credit"
    out.mkdir(parents=True, exist_ok=True)
    return render_png(rows, out / f"step_{step:04d}.png", step), render_html(rows, out / f"step_{step:04d}.html", step)


def token_texts(tokenizer: Any, ids: Sequence[int], max_tokens: int = 600) -> list[str]:
    """The text each of the first ``max_tokens`` tokens adds to the decoded response (special tokens: their own
    name, so that an end-of-sequence token is visible)."""
    ids = list(ids[:max_tokens])
    out, previous = [], ""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=True)
        common = len(os.path.commonprefix([text, previous]))
        piece = text[common:] if len(text) > len(previous) else ""
        out.append(piece if piece else tokenizer.decode([ids[k - 1]], skip_special_tokens=False))
        previous = text if len(text) > len(previous) else previous
    return out
