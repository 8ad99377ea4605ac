"""Credit made visible: a reward's first-wrong-step character span -> response tokens (char and byte-level
tokenizers), the batch-level credit metrics, and the credit picture files."""
from __future__ import annotations

import math

import pytest
import torch

from vapo_megatron.data.rl_batch import RLBatch
from vapo_megatron.models.tiny import EOS, build_char_tokenizer
from vapo_megatron.report.credit import (
    char_span_to_tokens,
    credit_metrics,
    error_token_mask,
    error_token_spans,
    pick_responses,
    token_texts,
    write_credit_report,
)


@pytest.fixture(scope="module")
def char_tok():
    return build_char_tokenizer()


def _byte_level_tokenizer():
    """A byte-level BPE over all 256 bytes, no merges: a multi-byte character spans several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vapo_megatron.models.tiny import _bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode()[b] for b in range(256))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


def _span_by_bytes(text, span):
    """For tokenizers with one token per byte of the text: the tokens holding a byte of a character in span."""
    owner = [i for i, ch in enumerate(text) for _ in ch.encode()]
    hit = [k for k, c in enumerate(owner) if span[0] <= c < span[1]]
    return (hit[0], hit[-1] + 1) if hit else None


def test_char_span_to_tokens_char_tokenizer(char_tok):
    """Failure: the first wrong line's characters map to the wrong response tokens (char tokenizer, EOS at the
    end as in a rollout)."""
    text = "b=7+5=12\nc=12*2=25\n#### 25"
    ids = char_tok(text, add_special_tokens=False)["input_ids"] + char_tok.convert_tokens_to_ids([EOS])
    assert char_tok.decode(ids, skip_special_tokens=True) == text
    assert char_span_to_tokens(char_tok, ids, text, (9, 18)) == (9, 18)
    for span in [(0, 1), (0, len(text)), (17, 19), (len(text) - 1, len(text))]:
        assert char_span_to_tokens(char_tok, ids, text, span) == _span_by_bytes(text, span) == span


def test_char_span_to_tokens_byte_level_multibyte():
    """Failure: a character split over several byte tokens is not covered by all of them, or offsets after it
    shift (byte-level BPE: 'é' is 2 tokens, '€' 3)."""
    tok = _byte_level_tokenizer()
    text = "ab é=1\n€x=2"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode()) and tok.decode(ids) == text
    e = text.index("é")
    assert char_span_to_tokens(tok, ids, text, (e, e + 1)) == (3, 5)  # both bytes of é
    euro = text.index("€")
    assert char_span_to_tokens(tok, ids, text, (euro, euro + 2)) == (8, 12)  # 3 bytes of € and 'x'
    for span in [(0, 2), (e, len(text)), (e + 1, e + 3)]:
        assert char_span_to_tokens(tok, ids, text, span) == _span_by_bytes(text, span)


def test_error_token_spans_ignores_missing_and_malformed(char_tok):
    """Failure: a reward's missing, non-integer or out-of-range span crashes or is used."""
    texts = ["b=1", "b=2", "b=3", "b=4"]
    ids = [char_tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    extras = [{"first_error_span": [0, 3]}, {}, {"first_error_span": [2, 9]}, {"first_error_span": ["0", 1]}]
    assert error_token_spans(char_tok, ids, texts, extras) == [(0, 3), None, None, None]


def _batch():
    mask = torch.ones(3, 6)
    mask[2, 4:] = 0
    adv = torch.tensor([[0.5] * 6, [-0.1, -0.1, -2.0, -2.0, -0.1, -0.1], [-0.2, -1.0, -0.2, -0.2, 0, 0]])
    return RLBatch.from_tensors(torch.zeros(3, 8, dtype=torch.long), [2, 2, 2], mask, advantages=adv,
                                is_correct=torch.tensor([True, False, False]), scores=torch.tensor([1.0, 0.0, 0.0]),
                                first_error_tokens=[(0, 2), (2, 4), (1, 2)])


def test_credit_metrics_only_wrong_responses():
    """Failure: a correct response's span counts, or the means/ratio are not over the right tokens."""
    m = credit_metrics(_batch())
    assert m["credit_error_spans"] == 2
    assert m["credit_first_error_adv"] == pytest.approx((-2.0 * 2 - 1.0) / 3)
    assert m["credit_rest_wrong_adv"] == pytest.approx((-0.1 * 4 - 0.2 * 3) / 7)
    assert m["credit_first_error_ratio"] == pytest.approx(m["credit_first_error_adv"] / m["credit_rest_wrong_adv"])
    assert m["credit_first_error_gap"] == pytest.approx(((-2.0 + 0.1) + (-1.0 + 0.2)) / 2)
    assert "credit_value_from_error" not in m  # no values: no critic
    no_spans = _batch()
    no_spans.first_error_tokens = [None] * 3
    assert credit_metrics(no_spans) == {}
    mask = error_token_mask([(0, 2), None, (3, 9)], _batch().resp_mask)
    assert mask.sum() == 3 and not mask[2, 4:].any()


def test_values_before_and_from_the_first_error():
    """Failure: the critic's mean value is taken over the wrong tokens (a correct response's, padding, or the
    wrong side of the first error). Reference: the tokens listed by hand."""
    batch = _batch()
    batch.old_values = torch.arange(18, dtype=torch.float32).reshape(3, 6) / 10
    m = credit_metrics(batch)
    assert m["credit_value_correct"] == pytest.approx(sum(range(0, 6)) / 60)
    # row 1: error (2, 4) -> before 6, 7; from 8..11; row 2: error (1, 2), valid 12..15 -> before 12; from 13..15
    assert m["credit_value_before_error"] == pytest.approx((6 + 7 + 12) / 30)
    assert m["credit_value_from_error"] == pytest.approx((8 + 9 + 10 + 11 + 13 + 14 + 15) / 70)


def test_pick_responses_prefers_correct_then_wrong_with_span():
    batch = _batch()
    batch.first_error_tokens = [None, None, (1, 2)]
    assert pick_responses(batch, 2) == [0, 2]
    assert pick_responses(batch, 5) == [0, 2, 1]


def test_credit_report_files(tmp_path, char_tok):
    """Failure: the picture is not written, or the HTML does not carry every shown token and its numbers."""
    texts = ["b=7+5=12\n#### 12", "b=7+5=13\n#### 13"]
    prompt = char_tok("a=7; b=a+5; b=?", add_special_tokens=False)["input_ids"]
    rows = [prompt + char_tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    n = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
    resp_mask = torch.zeros(2, 16)
    for i, t in enumerate(texts):
        resp_mask[i, :len(t)] = 1
    batch = RLBatch.from_tensors(input_ids, [len(prompt)] * 2, resp_mask,
                                 advantages=torch.linspace(-1, 1, 2 * 16).reshape(2, 16),
                                 old_values=torch.rand(2, 16), scores=torch.tensor([1.0, 0.0]),
                                 is_correct=torch.tensor([True, False]), first_error_tokens=[None, (0, 8)])
    png, html = write_credit_report(tmp_path, 7, batch, char_tok)
    assert png == tmp_path / "credit" / "step_0007.png" and png.stat().st_size > 5000
    page = html.read_text()
    assert page.count("<span") == 2 * (16 + 16) and "response 1: wrong" in page and "outline" in page
    assert token_texts(char_tok, rows[0][len(prompt):]) == list(texts[0])
    assert not math.isnan(float(batch.advantages.sum()))
