"""The critic: the policy's trunk (embedding, decoder, final norm) with a scalar value head as its output
layer. No vocabulary projection is ever built: at 32B that would be ~0.8B unused parameters per critic."""
from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import build_module

from vapo_megatron.models.hf_config import ModelArch
from vapo_megatron.models.policy import _pp_rank
from vapo_megatron.models.specs import model_spec, quiet_gpt_model_deprecation


class CriticModel(GPTModel):
    """GPTModel built without its output layer; the last pipeline stage keeps the final norm and adds
    `value_head` (Linear(hidden, 1, bias=False), the layout of HF's `score` head), giving values [B, S]."""

    def __init__(self, arch: ModelArch, config, *, pre_process: bool, post_process: bool, pg_collection=None,
                 use_te: bool | None = None):
        quiet_gpt_model_deprecation()
        super().__init__(
            config, model_spec(config, pp_rank=_pp_rank(pg_collection), use_te=use_te),
            vocab_size=arch.padded_vocab_size(config.tensor_model_parallel_size),
            max_sequence_length=arch.max_position_embeddings, pre_process=pre_process, post_process=False,
            share_embeddings_and_output_weights=False, position_embedding_type="rope",
            rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
            pg_collection=pg_collection)
        self.is_value_stage = post_process
        if post_process:
            # GPTModel(post_process=False) leaves the decoder without its final norm; add it back.
            self.decoder.post_process = True
            self.decoder.final_layernorm = build_module(
                self.decoder.submodules.layer_norm, config=config, hidden_size=config.hidden_size,
                eps=config.layernorm_epsilon)
            self.value_head = torch.nn.Linear(config.hidden_size, 1, bias=False, dtype=config.params_dtype)
            with torch.no_grad():  # documented init: N(0, init_std), as every other projection
                self.value_head.weight.normal_(0.0, config.init_method_std)
            # With SP the head sees only this rank's sequence shard, so its gradient is a partial sum
            # that finalize_model_grads must all-reduce over TP (the tag that asks for it).
            self.value_head.weight.sequence_parallel = config.sequence_parallel

    def forward(self, input_ids, position_ids, attention_mask, **kwargs):
        hidden = super().forward(input_ids, position_ids, attention_mask, **kwargs)
        if not self.is_value_stage:
            return hidden
        values = self.value_head(hidden)  # [S/tp or S, B, 1]
        if self.config.sequence_parallel:
            # Gather the scalars (not the hidden states): 1/hidden of the traffic. Backward splits the
            # gradient back to each rank's own positions.
            values = tensor_parallel.gather_from_sequence_parallel_region(
                values, tensor_parallel_output_grad=False, group=self.pg_collection.tp)
        return values.squeeze(-1).transpose(0, 1).float().contiguous()


def build_critic(arch: ModelArch, config, *, pre_process: bool = True, post_process: bool = True,
                 pg_collection=None, use_te: bool | None = None):
    """The critic for this pipeline stage: values [B, S] (fp32; S = this CP rank's positions when cp > 1) on
    the last stage, hidden states elsewhere."""
    return CriticModel(arch, config, pre_process=pre_process, post_process=post_process,
                       pg_collection=pg_collection, use_te=use_te)
