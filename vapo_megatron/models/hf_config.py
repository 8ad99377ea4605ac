"""Hugging Face config -> a neutral `ModelArch` -> megatron-core `TransformerConfig`.

`ModelArch` is the one place that knows a model's shape; conversion, the memory planner and the model
builders all read it, so HF field names appear only in :func:`arch_from_hf`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen2ForSequenceClassification": "qwen2",
    "Qwen2ForTokenClassification": "qwen2",
    "LlamaForCausalLM": "llama",
    "LlamaForSequenceClassification": "llama",
    "LlamaForTokenClassification": "llama",
    "MistralForCausalLM": "llama",
}


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelArch:
    """The shape of a decoder-only transformer: dense (Qwen2/Qwen2.5, Llama, Qwen3) or mixture-of-experts
    (Qwen3-MoE). Fields after `init_std` have defaults so that checkpoints written before they existed load."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    architecture: str = ""
    init_std: float = 0.02
    qk_norm: bool = False
    """Per-head RMSNorm of queries and keys before RoPE (Qwen3), weights of size head_dim."""
    num_experts: int = 0
    """Routed experts per MoE layer; 0: a dense model."""
    moe_topk: int = 0
    """Experts each token is routed to."""
    moe_ffn_hidden_size: int = 0
    """Hidden size of one expert's SwiGLU MLP (HF `moe_intermediate_size`)."""
    moe_norm_topk_prob: bool = False
    """Renormalise the top-k routing probabilities to sum to 1 (HF `norm_topk_prob`); False: the softmax over
    all experts, taken at the top k."""
    moe_layers: tuple[int, ...] = ()
    """Indices of the layers whose MLP is a MoE block (the others are dense, `ffn_hidden_size`)."""
    moe_aux_loss_coeff: float = 0.0
    """Coefficient of the router's load-balancing loss (HF `router_aux_loss_coef`)."""

    def __post_init__(self):
        object.__setattr__(self, "moe_layers", tuple(int(i) for i in self.moe_layers))  # JSON gives a list

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def padded_vocab_size(self, tp: int) -> int:
        """Vocabulary rounded up to a multiple of tp (megatron shards the vocabulary evenly). Padded rows are
        never sampled nor counted in log-probs: they are masked by vocab-parallel ops (true size kept)."""
        return -(-self.vocab_size // tp) * tp

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in (None, "default"):
        raise UnsupportedModelError(f"rope scaling type {rope_type!r} is not supported (only plain RoPE)")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def arch_from_hf(cfg: Any) -> ModelArch:
    """Read a transformers config (object or dict) into a ModelArch; raise naming unsupported features."""
    if isinstance(cfg, dict):
        from transformers import AutoConfig

        cfg = AutoConfig.for_model(**cfg)
    archs = list(getattr(cfg, "architectures", None) or [])
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    family = SUPPORTED_ARCHITECTURES.get(arch) if arch else {"qwen2": "qwen2", "llama": "llama",
                                                            "mistral": "llama"}.get(cfg.model_type)
    if family is None:
        raise UnsupportedModelError(
            f"unsupported architecture {archs or cfg.model_type!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", family == "llama"):
        raise UnsupportedModelError("sliding-window attention is not supported")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"activation {cfg.hidden_act!r} is not supported (SwiGLU/silu only)")
    if getattr(cfg, "mlp_bias", False):
        raise UnsupportedModelError("MLP biases are not supported")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    qkv_bias = True if family == "qwen2" else bool(getattr(cfg, "attention_bias", False))
    return ModelArch(
        family=family, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, head_dim=head_dim,
        ffn_hidden_size=cfg.intermediate_size, norm_eps=float(cfg.rms_norm_eps), rope_theta=_rope_theta(cfg),
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)), qkv_bias=qkv_bias,
        architecture=arch or "", init_std=float(getattr(cfg, "initializer_range", 0.02)),
    )


def load_arch(hf_dir: str | Path) -> ModelArch:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {hf_dir}")
    from transformers import AutoConfig

    try:
        return arch_from_hf(AutoConfig.from_pretrained(str(hf_dir)))
    except ValueError as exc:
        if isinstance(exc, UnsupportedModelError):
            raise
        raw = json.loads(path.read_text())
        raise UnsupportedModelError(f"cannot read {path} (model_type={raw.get('model_type')!r}, "
                                    f"architectures={raw.get('architectures')}): {exc}") from exc


RECOMPUTE_MODES = ("none", "selective", "full")


def recompute_fields(mode: str, num_layers: int = 1) -> dict[str, Any]:
    """TransformerConfig fields of an activation-recomputation mode: "full" recomputes whole transformer layers
    in uniform groups of `num_layers` (keeping only each group's input), "selective" only the core attention
    (megatron's default recompute_modules), "none" stores every activation."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute mode {mode!r} is unknown; valid: {', '.join(RECOMPUTE_MODES)}")
    if mode == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=num_layers)
    if mode == "selective":
        return dict(recompute_granularity="selective")
    return {}


def transformer_config(arch: ModelArch, parallel, *, params_dtype: torch.dtype = torch.float32,
                       recompute: str = "none", recompute_num_layers: int = 1, **overrides: Any):
    """The megatron-core TransformerConfig for `arch` under `parallel` (a ParallelConfig)."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    from vapo_megatron import platform

    on_gpu = platform.has_cuda()
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads, kv_channels=arch.head_dim, ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=arch.norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=arch.init_std,
        params_dtype=params_dtype, pipeline_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16, tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp, context_parallel_size=parallel.cp,
        sequence_parallel=parallel.sequence_parallel, attention_softmax_in_fp32=True,
        use_cpu_initialization=not on_gpu, bias_activation_fusion=on_gpu, masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        batch_p2p_sync=on_gpu,  # CPU: p2p_communication's batched path calls torch.cuda.synchronize
        deallocate_pipeline_outputs=on_gpu,
    )
    kwargs.update(recompute_fields(recompute, recompute_num_layers))
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
