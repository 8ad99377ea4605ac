"""Prompt datasets: both row forms in JSONL and Parquet, error messages, length filtering, and the sampler."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vapo_megatron.data.datasets import (
    DatasetFormatError,
    PromptDataset,
    PromptLoader,
    PromptSampler,
    load_prompt_records,
)

PLAIN_ROWS = [
    {"prompt": "a=3; b=a+4; b=?", "ground_truth": "7", "num_steps": 1},
    {"prompt": "What is 1/2 + 1/2?", "ground_truth": 1, "data_source": "toy"},
]
VERL_ROWS = [
    {"data_source": "gsm8k", "prompt": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "2+2?"}],
     "ability": "math", "reward_model": {"style": "rule", "ground_truth": "4"}, "extra_info": {"index": 17}},
]


@pytest.fixture(scope="module")
def tokenizer():
    from vapo_megatron.models.tiny import build_char_tokenizer

    return build_char_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Every row gets every column (null where it has no value), as in a real Parquet file.
    columns = list(dict.fromkeys(k for row in rows for k in row))
    pq.write_table(pa.Table.from_pylist([{k: row.get(k) for k in columns} for row in rows]), path)
    return path


def check_records(records) -> None:
    plain, plain2, verl = records
    assert plain.messages == [{"role": "user", "content": "a=3; b=a+4; b=?"}]
    assert plain.ground_truth == "7" and plain.data_source == "" and plain.metadata["num_steps"] == 1
    assert plain2.ground_truth == "1" and plain2.data_source == "toy"
    assert verl.messages[0] == {"role": "system", "content": "Be brief."} and verl.messages[1]["content"] == "2+2?"
    assert verl.ground_truth == "4" and verl.data_source == "gsm8k"
    assert verl.metadata["ability"] == "math" and verl.metadata["extra_info"] == {"index": 17}
    assert verl.metadata["reward_model"] == {"style": "rule"}
    assert [r.index for r in records] == [0, 1, 2]


def test_jsonl_both_forms(tmp_path):
    """A failure pinpoints reading JSONL rows of the plain or the verl form into PromptRecord (messages,
    ground truth as string, data source, metadata, running index over several files)."""
    a = write_jsonl(tmp_path / "a.jsonl", PLAIN_ROWS + [""])
    b = write_jsonl(tmp_path / "b.jsonl", VERL_ROWS)
    check_records(load_prompt_records([a, b]))


def test_parquet_both_forms(tmp_path):
    """A failure pinpoints reading Parquet (list<struct> chat columns, nulls for columns a row lacks)."""
    a = write_parquet(tmp_path / "a.parquet", PLAIN_ROWS[:1] + [dict(PLAIN_ROWS[1], ground_truth="1")])
    b = write_parquet(tmp_path / "b.parquet", VERL_ROWS)
    check_records(load_prompt_records([a, b]))
    # A mixed file: pyarrow fills missing columns with nulls, which must count as absent.
    mixed = write_parquet(tmp_path / "mixed.parquet", [dict(PLAIN_ROWS[0], prompt=[{"role": "user", "content": "q"}]),
                                                       VERL_ROWS[0]])
    records = load_prompt_records(mixed)
    assert [r.ground_truth for r in records] == ["7", "4"]
    assert [r.data_source for r in records] == ["", "gsm8k"]


@pytest.mark.parametrize("line, expected", [
    ('{"prompt": "x", "ground_truth": "1"', "invalid JSON (Expecting ',' delimiter at column "),
    ('{"prompt": "x', "invalid JSON (Invalid control character at column "),  # was "character at at column"
    ('{"ground_truth": "1"}', "missing 'prompt'"),
    ('{"prompt": "x"}', "missing 'ground_truth'"),
    ('{"prompt": 3, "ground_truth": "1"}', "'prompt' must be a string or a non-empty list"),
    ('{"prompt": [], "ground_truth": "1"}', "non-empty list"),
    ('{"prompt": [{"role": "user"}], "ground_truth": "1"}', "prompt message 0 needs a string 'content'"),
    ('{"prompt": "x", "ground_truth": ["1"]}', "'ground_truth' must be a string or a number, got list"),
    ('{"prompt": "x", "reward_model": "1"}', "'reward_model' must be an object"),
    ('{"prompt": "x", "ground_truth": "1", "data_source": 5}', "'data_source' must be a string"),
    ('[1, 2]', "a row must be a JSON object"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, expected):
    """A failure pinpoints validation of one kind of malformed row, or an error message that does not name
    the file, the 1-based line and the problem."""
    path = write_jsonl(tmp_path / "bad.jsonl", [PLAIN_ROWS[0], "", line])
    with pytest.raises(DatasetFormatError) as e:
        load_prompt_records(path)
    assert f"{path}:3:" in str(e.value) and expected in str(e.value)


def test_malformed_parquet_names_row(tmp_path):
    """A failure pinpoints Parquet error messages (file and 0-based row number)."""
    path = write_parquet(tmp_path / "bad.parquet", [{"prompt": "x", "ground_truth": "1"},
                                                     {"prompt": "y", "ground_truth": None}])
    with pytest.raises(DatasetFormatError, match=r"bad\.parquet: row 1: missing 'ground_truth'"):
        load_prompt_records(path)


def test_missing_file_and_suffix(tmp_path):
    """A failure pinpoints the errors for a missing file or an unsupported suffix."""
    with pytest.raises(FileNotFoundError, match="prompt data file not found: .*nope.jsonl"):
        load_prompt_records(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"suffix must be one of \('.jsonl', '.parquet'\)"):
        load_prompt_records(tmp_path / "x.csv")


def test_tokenised_with_chat_template_and_too_long_dropped(tmp_path, tokenizer):
    """A failure pinpoints chat-template rendering (generation prompt, no extra special tokens) or the
    dropping and counting of prompts longer than max_prompt_length."""
    rows = [{"prompt": "x" * n, "ground_truth": "1"} for n in (1, 10, 11, 30)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    # "<|im_start|>user\n" (1 + 5 tokens), "<|im_end|>\n" (2), "<|im_start|>assistant\n" (1 + 10).
    overhead = 19
    dataset = PromptDataset.from_files(path, tokenizer, max_prompt_length=overhead + 10)
    assert dataset.num_dropped_too_long == 2
    assert [len(item.record.messages[0]["content"]) for item in dataset] == [1, 10]
    item = dataset[1]
    assert item.text == "<|im_start|>user\n" + "x" * 10 + "<|im_end|>\n<|im_start|>assistant\n"
    assert item.input_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert len(item.input_ids) == overhead + 10 and tokenizer.decode(item.input_ids) == item.text
    with pytest.raises(ValueError, match="no prompt is left"):
        PromptDataset.from_files(path, tokenizer, max_prompt_length=overhead)


def test_sampler_epochs_are_permutations_and_deterministic():
    """A failure pinpoints epoch shuffling: every epoch must visit each prompt at most once, differ between
    epochs, and be identical for the same seed (and different for another seed)."""
    sampler = PromptSampler(10, 3, seed=7)
    first = [sampler.next_batch() for _ in range(6)]
    assert sampler.batches_per_epoch == 3 and all(len(b) == 3 for b in first)
    epoch0, epoch1 = sum(first[:3], []), sum(first[3:], [])
    assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9 and epoch0 != epoch1
    again = PromptSampler(10, 3, seed=7)
    assert [again.next_batch() for _ in range(6)] == first
    other = PromptSampler(10, 3, seed=8)
    assert [other.next_batch() for _ in range(6)] != first
    ordered = PromptSampler(5, 2, shuffle=False, drop_last=False)
    assert [ordered.next_batch() for _ in range(4)] == [[0, 1], [2, 3], [4], [0, 1]]


@pytest.mark.parametrize("stop_after", [0, 1, 3, 4, 7])
def test_sampler_resume_is_exact(stop_after):
    """A failure pinpoints state_dict/load_state_dict: a sampler restored from a state saved after any number of
    batches (mid-epoch and at an epoch boundary) must yield exactly what the uninterrupted one yields."""
    reference = PromptSampler(11, 4, seed=3)
    expected = [reference.next_batch() for _ in range(stop_after + 6)]
    run = PromptSampler(11, 4, seed=3)
    for _ in range(stop_after):
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))  # must survive a round trip through a checkpoint file
    resumed = PromptSampler(11, 4, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(6)] == expected[stop_after:]


def test_sampler_refuses_changed_settings_and_small_data():
    """A failure pinpoints the checks that stop a resume from silently sampling different prompts."""
    state = PromptSampler(11, 4, seed=3).state_dict()
    with pytest.raises(ValueError, match="num_prompts: saved 11, now 12"):
        PromptSampler(12, 4, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        PromptSampler(3, 4)


def test_loader_yields_prompts_and_resumes(tmp_path, tokenizer):
    """A failure pinpoints PromptLoader: batches of TokenizedPrompt in sampler order, and exact resume."""
    rows = [{"prompt": f"q{i}", "ground_truth": str(i)} for i in range(7)]
    dataset = PromptDataset.from_files(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer, 64)
    loader = PromptLoader(dataset, 2, seed=1)
    batches = [loader.next_batch() for _ in range(5)]
    assert all(len(b) == 2 for b in batches) and loader.epoch == 1
    resumed = PromptLoader(dataset, 2, seed=1)
    probe = PromptLoader(dataset, 2, seed=1)
    [probe.next_batch() for _ in range(2)]
    resumed.load_state_dict(probe.state_dict())
    assert [[p.record.index for p in resumed.next_batch()] for _ in range(3)] == \
        [[p.record.index for p in b] for b in batches[2:]]
