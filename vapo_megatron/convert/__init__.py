"""Checkpoint conversion between Hugging Face and megatron-core layouts (whole tensors and TP/PP shards).

mapping: HF <-> Megatron names, fused layouts, TP/PP shards (pure). hf_io: streaming safetensors read/write.
atomic: output directories that appear only when complete. dist_ckpt: torch_dist save/load (collective, and
streaming single-process). hf_to_megatron / megatron_to_hf: the converters behind tools/convert_*.py.
"""
