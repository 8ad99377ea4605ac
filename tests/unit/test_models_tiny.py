"""The tiny char tokenizer must give the same ids in memory and after a save / load through AutoTokenizer (what
vLLM and the trainer use). A failure here means prompts reach the model tokenised differently from the
supervised warm start (transformers 5 loads any `qwen2` tokenizer as Qwen2Tokenizer; a word-level vocabulary then
loses every space and newline, and the demo cannot learn)."""
from __future__ import annotations

import pytest

from vapo_megatron.models.tiny import CHARACTERS, build_char_tokenizer, save_tiny_hf_model

TEXT = "".join(CHARACTERS) + " a=7; b=a+5;\nb=?  \n\n#### 12"


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_saved_tokenizer_matches_in_memory(tmp_path, family):
    from transformers import AutoTokenizer

    save_tiny_hf_model(tmp_path, family)
    mem, loaded = build_char_tokenizer(), AutoTokenizer.from_pretrained(tmp_path)
    ids = mem.encode(TEXT, add_special_tokens=False)
    assert len(ids) == len(TEXT), "not one token per character"
    assert loaded.encode(TEXT, add_special_tokens=False) == ids
    assert loaded.decode(ids) == TEXT == mem.decode(ids)
    messages = [{"role": "user", "content": TEXT}]
    chat_mem = mem.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat_loaded = loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat_mem == chat_loaded
    assert loaded(chat_loaded, add_special_tokens=False)["input_ids"] == mem(chat_mem, add_special_tokens=False)[
        "input_ids"]
    assert mem.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == loaded.convert_tokens_to_ids(
        ["<|im_start|>", "<|im_end|>"])


def test_vocabulary_is_padded_and_characters_distinct():
    tok = build_char_tokenizer(128)
    assert len(tok) == 128
    ids = [tok.encode(c, add_special_tokens=False) for c in CHARACTERS]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(CHARACTERS)
