"""Checkpoint conversion between Hugging Face and megatron-core layouts (whole tensors and TP/PP shards)."""
