"""Layer specs: TransformerEngine on GPU when importable, megatron-core's local (plain torch) spec otherwise."""
from __future__ import annotations

import copy
import functools
import logging


class _DropGPTModelDeprecation(logging.Filter):
    """Drops megatron-core 0.19's "GPTModel IS DEPRECATED ... HybridModel" warning, printed at every build.
    This project stays on GPTModel on purpose (docs/architecture.md, "GPTModel or HybridModel"); every other
    record of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("GPTModel IS DEPRECATED")


@functools.cache
def quiet_gpt_model_deprecation() -> None:
    """Install the filter above once per process (called by the policy and critic builders)."""
    logging.getLogger("megatron.core.models.gpt.gpt_model").addFilter(_DropGPTModelDeprecation())


@functools.cache
def transformer_engine_available() -> bool:
    from vapo_megatron import platform

    if not platform.has_cuda():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def model_spec(config, *, pp_rank: int, use_te: bool | None = None):
    """What GPTModel takes as its layer spec for this pipeline stage: one layer spec for a dense model; for a
    mixture-of-experts model, the block of this stage's layers, each MoE or dense as `config.moe_layer_freq`
    says (megatron's even split of layers over stages, as `convert.mapping.layers_per_stage`)."""
    if not config.num_moe_experts:
        return gpt_layer_spec(use_te=use_te, qk_layernorm=config.qk_layernorm,
                              context_parallel=config.context_parallel_size > 1)
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te is None:
        use_te = transformer_engine_available()
    block = gpt_layer_specs.get_gpt_decoder_block_spec(config, use_te, normalization="RMSNorm", pp_rank=pp_rank)
    if not use_te:
        block.layer_specs = [_with_local_attention(s) for s in block.layer_specs]
    return block


def _with_local_attention(spec):
    """The local spec with models/thd_attention.py's core attention: it also takes packed (THD) batches, and for
    cp > 1 all-gathers keys and values."""
    from vapo_megatron.models.thd_attention import PackedDotProductAttention

    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    return spec


def gpt_layer_spec(*, use_te: bool | None = None, qk_layernorm: bool = False, context_parallel: bool = False):
    """The GPT layer spec. `use_te=None` picks TransformerEngine when it can run (its attention takes packed THD
    batches and, for cp > 1, does ring attention). Without TE the local spec's core attention is swapped for
    models/thd_attention.py's, which takes packed batches and, for cp > 1, all-gathers keys and values
    (models/cp_attention.py). `context_parallel` is kept for callers; the local attention reads cp from the
    config."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te is None:
        use_te = transformer_engine_available()
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    return _with_local_attention(spec)
