"""Model shapes by name, from the published config.json of each model, so that planning works on a machine that
has not downloaded the checkpoint.

Qwen2.5 base models by size ("7B", "qwen2.5-32b"): 0.5B/1.5B/3B tie the output layer to the embedding and use a
151,936-token vocabulary; 7B and up are untied with 152,064.

Qwen3 ("Qwen3-8B", "qwen3-30b-a3b", case-insensitive): dense 8B and 32B, mixture-of-experts 30B-A3B and 235B-A22B.
Their config.json fields are kept as published (the dicts below) and read into a ModelArch with the rules of
Hugging Face's modelling code (QK-norm, explicit head_dim, no QKV bias; a layer is MoE unless listed in
`mlp_only_layers` or off the `decoder_sparse_step` pattern); tests/unit/test_planning_moe.py counts the parameters
of Hugging Face's own models built from the same dicts on the meta device."""
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


# Qwen/Qwen3-*/config.json on the Hugging Face hub: the fields that set the shape.
_QWEN3_COMMON = dict(vocab_size=151936, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960,
                     tie_word_embeddings=False, attention_bias=False, hidden_act="silu", initializer_range=0.02)
_QWEN3_MOE = dict(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, router_aux_loss_coef=0.001,
                  num_experts_per_tok=8, num_experts=128)
QWEN3_CONFIGS: dict[str, dict] = {
    "Qwen3-8B": dict(_QWEN3_COMMON, model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=4096,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, intermediate_size=12288),
    "Qwen3-32B": dict(_QWEN3_COMMON, model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=5120,
                      num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8, intermediate_size=25600),
    "Qwen3-30B-A3B": dict(_QWEN3_COMMON, **_QWEN3_MOE, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                          hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          intermediate_size=6144, moe_intermediate_size=768),
    "Qwen3-235B-A22B": dict(_QWEN3_COMMON, **_QWEN3_MOE, model_type="qwen3_moe",
                            architectures=["Qwen3MoeForCausalLM"], hidden_size=4096, num_hidden_layers=94,
                            num_attention_heads=64, num_key_value_heads=4, intermediate_size=12288,
                            moe_intermediate_size=1536),
}


def preset_names() -> list[str]:
    """The Qwen2.5 sizes ("0.5B" ... "72B")."""
    return list(_QWEN25)


def qwen3_preset_names(moe: bool | None = None) -> list[str]:
    """The Qwen3 presets: all, only the mixture-of-experts ones (moe=True) or only the dense ones (moe=False)."""
    return [name for name, c in QWEN3_CONFIGS.items() if moe is None or ("num_experts" in c) == moe]


def qwen3_arch_from_config(cfg: dict) -> ModelArch:
    """A ModelArch from the fields of a Qwen3 or Qwen3-MoE config.json: the same reading as for a checkpoint's
    config (models/hf_config.py arch_from_hf, Hugging Face's rules for the layer types)."""
    return arch_from_hf(dict(cfg))


def qwen3_arch(name: str) -> ModelArch:
    """The ModelArch of a Qwen3 preset ("Qwen3-30B-A3B", "qwen3-30b-a3b")."""
    by_key = {k.lower(): k for k in QWEN3_CONFIGS}
    if name.lower() not in by_key:
        raise KeyError(f"unknown Qwen3 preset {name!r}; known: {', '.join(QWEN3_CONFIGS)}")
    return qwen3_arch_from_config(QWEN3_CONFIGS[by_key[name.lower()]])


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
    """A preset name (Qwen2.5 size or Qwen3 preset), an HF model directory or a path to its config.json."""
    path = Path(spec)
    if path.is_file():
        return arch_from_hf(json.loads(path.read_text(encoding="utf-8")))
    if path.is_dir():
        return load_arch(path)
    if spec.lower().startswith("qwen3-"):
        return qwen3_arch(spec)
    return qwen25_arch(spec)
