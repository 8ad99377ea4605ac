"""Prompt data: datasets (JSONL / Parquet, plain and verl forms), a resumable sampler, the synthetic task."""
from vapo_megatron.data.datasets import (
    DatasetFormatError,
    PromptDataset,
    PromptLoader,
    PromptRecord,
    PromptSampler,
    TokenizedPrompt,
    load_prompt_records,
)

__all__ = [
    "DatasetFormatError",
    "PromptDataset",
    "PromptLoader",
    "PromptRecord",
    "PromptSampler",
    "TokenizedPrompt",
    "load_prompt_records",
]
