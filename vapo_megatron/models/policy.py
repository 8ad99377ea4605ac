"""The policy: a megatron-core GPTModel built from a ModelArch (parallelism comes from the config)."""
from __future__ import annotations

from vapo_megatron.models.hf_config import ModelArch
from vapo_megatron.models.specs import model_spec, quiet_gpt_model_deprecation


def build_policy(arch: ModelArch, config, *, pre_process: bool = True, post_process: bool = True,
                 pg_collection=None, use_te: bool | None = None):
    """A GPTModel for this pipeline stage. Its output is vocabulary-parallel logits [B, S, V/tp]."""
    from megatron.core.models.gpt import GPTModel

    quiet_gpt_model_deprecation()
    spec = model_spec(config, pp_rank=_pp_rank(pg_collection), use_te=use_te)
    return GPTModel(
        config, spec, vocab_size=arch.padded_vocab_size(config.tensor_model_parallel_size),
        max_sequence_length=arch.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_word_embeddings, position_embedding_type="rope",
        rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
        pg_collection=pg_collection,
    )


def _pp_rank(pg_collection) -> int:
    """This stage's pipeline rank (from the role's groups; megatron's globals when none are passed)."""
    if pg_collection is not None:
        return pg_collection.pp.rank()
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_rank()
