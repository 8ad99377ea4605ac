"""On a CUDA machine with TransformerEngine: TE's packed (THD) attention gives the CPU path's result.

1. TE's `DotProductAttention` (qkv_format "thd", padding_causal, bf16) on a packed stream of mixed-length
   sequences equals `models/thd_attention.py: packed_causal_attention` (the CPU attention, float32) on the same
   inputs, within bf16 rounding.
2. The engines with the TE layer spec (bf16): policy log-probs and critic values of a packed batch equal the same
   batch padded (TE's causal attention with a mask), within bf16 rounding.
Skips without CUDA or TE. A failure pinpoints the GPU side of packing: TE reading cu_seqlens differently from the
CPU attention (part 1), or PackedSeqParams / THD RoPE / TE's THD path through GPTModel (part 2)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from vapo_megatron.models.tiny import save_tiny_hf_model
from vapo_megatron.testing.dist import run_distributed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                                 reason="needs TransformerEngine")]
VOCAB = 128


def test_te_thd_attention_equals_cpu_packed_attention():
    from transformer_engine.pytorch import DotProductAttention

    from vapo_megatron.models.thd_attention import packed_causal_attention

    heads, dim, lengths = 4, 64, [37, 5, 128, 64, 1, 300]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(int(cu[-1]), heads, dim, generator=g) for _ in range(3))
    expected = packed_causal_attention(q, k, v, cu.tolist(), scale=dim ** -0.5)
    te = DotProductAttention(heads, dim, qkv_format="thd", attn_mask_type="padding_causal")
    dev = [x.to("cuda", torch.bfloat16) for x in (q, k, v)]
    got = te(*dev, cu_seqlens_q=cu.cuda(), cu_seqlens_kv=cu.cuda(), max_seqlen_q=max(lengths),
             max_seqlen_kv=max(lengths))
    diff = (got.float().cpu().reshape(expected.shape) - expected).abs().max().item()
    print(f"TE THD attention vs CPU packed attention: max |diff| {diff:.3e}")
    assert diff < 3e-2, diff


def _engines_body(hf_dir: str) -> dict:
    from vapo_megatron.engine.objectives import response_logprobs, response_values
    from vapo_megatron.parallel.layout import ParallelConfig, RoleLayouts
    from vapo_megatron.testing.engines import build_engine, synthetic_rl_batch

    layouts = RoleLayouts(ParallelConfig(), ParallelConfig())
    batch = synthetic_rl_batch(8, VOCAB, seed=2, lengths=[40, 3, 17, 64, 1, 9, 33, 20])
    out = {}
    for pack in (False, True):
        kw = dict(params_dtype=torch.bfloat16, pack_sequences=pack, micro_batch_tokens=128)
        actor, critic = build_engine(hf_dir, "policy", layouts, **kw), build_engine(hf_dir, "critic", layouts, **kw)
        out[pack] = (actor.forward(batch, lambda o, mb: response_logprobs(o, mb, VOCAB)[0]).cpu(),
                     critic.forward(batch, lambda o, mb: response_values(o, mb)).cpu())
    mask = batch.resp_mask
    return {name: ((out[False][i] - out[True][i]) * mask).abs().max().item()
            for i, name in enumerate(("logprobs", "values"))}


@pytest.mark.distributed
def test_te_engines_packed_equal_padded(tmp_path):
    hf_dir = str(save_tiny_hf_model(tmp_path / "qwen2", "qwen2", seed=1, hidden_size=256, num_heads=4))
    diffs = run_distributed(_engines_body, 1, hf_dir, timeout=600)[0]
    print(f"TE engines, packed vs padded (bf16): {diffs}")
    assert diffs["logprobs"] < 5e-2 and diffs["values"] < 5e-2, diffs
