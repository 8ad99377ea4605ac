"""Qwen2.5 base-model shapes by name, from the published config.json of each size, so that planning works on a
machine that has not downloaded the checkpoint. 0.5B/1.5B/3B tie the output layer to the embedding and use a
151,936-token vocabulary; 7B and up are untied with 152,064."""
from __future__ import annotations

import json
from pathlib import Path

from vapo_megatron.models.hf_config import ModelArch, arch_from_hf, load_arch

# name: (hidden, layers, heads, kv_heads, intermediate, vocab, tied, rms_eps, max_position_embeddings)
_QWEN25 = {
    "0.5B": (896, 24, 14, 2, 4864, 151936, True, 1e-6, 32768),
    "1.5B": (1536, 28, 12, 2, 8960, 151936, True, 1e-6, 131072),
    "3B": (2048, 36, 16, 2, 11008, 151936, True, 1e-6, 32768),
    "7B": (3584, 28, 28, 4, 18944, 152064, False, 1e-6, 131072),
    "14B": (5120, 48, 40, 8, 13824, 152064, False, 1e-5, 131072),
    "32B": (5120, 64, 40, 8, 27648, 152064, False, 1e-5, 131072),
    "72B": (8192, 80, 64, 8, 29568, 152064, False, 1e-5, 131072),
}


def preset_names() -> list[str]:
    return list(_QWEN25)


def qwen25_arch(name: str) -> ModelArch:
    """The ModelArch of Qwen2.5-<name> ("32B", "qwen2.5-32b" and "Qwen2.5-32B" all work)."""
    key = name.upper().removeprefix("QWEN2.5-")
    if key not in _QWEN25:
        raise KeyError(f"unknown model name {name!r}; known Qwen2.5 sizes: {', '.join(_QWEN25)} "
                       "(or give a directory / config.json path)")
    hidden, layers, heads, kv, ffn, vocab, tied, eps, max_pos = _QWEN25[key]
    return ModelArch(family="qwen2", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                     num_kv_heads=kv, head_dim=hidden // heads, ffn_hidden_size=ffn, norm_eps=eps,
                     rope_theta=1e6, max_position_embeddings=max_pos, tie_word_embeddings=tied, qkv_bias=True,
                     architecture="Qwen2ForCausalLM")


def resolve_arch(spec: str) -> ModelArch:
    """A preset name, an HF model directory or a path to its config.json."""
    path = Path(spec)
    if path.is_file():
        return arch_from_hf(json.loads(path.read_text(encoding="utf-8")))
    if path.is_dir():
        return load_arch(path)
    return qwen25_arch(spec)
