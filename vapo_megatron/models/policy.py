"""The policy: a megatron-core GPTModel built from a ModelArch (parallelism comes from the config)."""
from __future__ import annotations

from vapo_megatron.models.hf_config import ModelArch
from vapo_megatron.models.specs import gpt_layer_spec, quiet_gpt_model_deprecation


def build_policy(arch: ModelArch, config, *, pre_process: bool = True, post_process: bool = True,
                 pg_collection=None, use_te: bool | None = None):
    """A GPTModel for this pipeline stage. Its output is vocabulary-parallel logits [B, S, V/tp]."""
    from megatron.core.models.gpt import GPTModel

    quiet_gpt_model_deprecation()
    spec = gpt_layer_spec(use_te=use_te, context_parallel=config.context_parallel_size > 1)
    return GPTModel(
        config, spec, vocab_size=arch.padded_vocab_size(config.tensor_model_parallel_size),
        max_sequence_length=arch.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_word_embeddings, position_embedding_type="rope",
        rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
        pg_collection=pg_collection,
    )
