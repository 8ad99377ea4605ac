"""Policy logits, critic values and the gradients of a scalar loss on them are the same at every parallel
layout (TP, PP, SP, TP x PP + SP) as at TP=PP=1, from the same weights. A failure pinpoints a layout bug:
a wrong shard of a fused tensor, a missing gradient all-reduce (the SP norm trap), a PP stage hand-off.
The models load their weights the way the trainer does (streamed per rank from the safetensors files), and at
every layout those weights are checked bit-identical to slicing a whole in-memory Megatron state dict: a failure
there pinpoints the streaming loader (a wrong TP piece, stage, tied copy or dtype)."""
from __future__ import annotations

import pytest
import torch

from vapo_megatron.models.tiny import save_tiny_hf_model
from vapo_megatron.testing.dist import run_distributed

pytestmark = pytest.mark.distributed
B, S, MICRO = 2, 16, 2
ATOL = 1e-5  # outputs: absolute; gradients: relative to the tensor's largest entry (float32 sums of ~1e3 terms)


def _inputs(vocab: int):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (MICRO, B, S), generator=g)
    w_logits = torch.randn(MICRO, B, S, vocab, generator=g)
    w_values = torch.randn(MICRO, B, S, generator=g)
    return ids, w_logits, w_values


def _body(hf_dir: str, roles: tuple[str, ...], tp: int, pp: int, sp: bool) -> dict:
    from vapo_megatron.parallel.layout import ParallelConfig, initialize

    parallel = ParallelConfig(tp=tp, pp=pp, sequence_parallel=sp)
    initialize(parallel)
    return {role: _run_role(hf_dir, role, parallel) for role in roles}


def _run_role(hf_dir: str, role: str, parallel) -> dict:
    import torch.distributed as dist
    from safetensors.torch import load_file

    from vapo_megatron.convert.hf_io import HFCheckpointReader
    from vapo_megatron.convert.mapping import iter_hf_to_full
    from vapo_megatron.engine.build import build_model, load_full_state
    from vapo_megatron.models.hf_config import load_arch
    from vapo_megatron.testing.engines import weighted_outputs_and_grads

    arch = load_arch(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    score = torch.randn(1, arch.hidden_size, generator=torch.Generator().manual_seed(3)) * 0.1

    def hf_get(name):  # a reward-model-like score head for the critic
        return score if name == "score.weight" else reader.get(name)

    built = build_model(arch, parallel, role, hf_get=hf_get)
    hf = load_file(f"{hf_dir}/model.safetensors") | {"score.weight": score}
    from_full = build_model(arch, parallel, role, ddp=False).model  # the pre-streaming way: whole state dict
    load_full_state(from_full, {pm.name: t for pm, t in iter_hf_to_full(hf.__getitem__, arch, role)}, arch, role)
    streamed = dict(built.model.module.named_parameters())
    differ = [n for n, p in from_full.named_parameters()
              if p.dtype != streamed[n].dtype or not torch.equal(p, streamed[n])]
    ids, w_logits, w_values = _inputs(arch.vocab_size)
    outputs, grads = weighted_outputs_and_grads(built, arch, role, ids, w_logits, w_values, list(range(MICRO)))
    return {"outputs": torch.stack(outputs) if outputs else None, "grads": grads if dist.get_rank() == 0 else None,
            "streamed_differ": differ}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "qwen2": str(save_tiny_hf_model(root / "qwen2", "qwen2", seed=1)),
        "llama_tied": str(save_tiny_hf_model(root / "llama", "llama", seed=2, tie_word_embeddings=True)),
    }


ROLES = ("policy", "critic")
_REFERENCE: dict = {}


def _reference(hf_dir: str):
    if hf_dir not in _REFERENCE:
        _REFERENCE[hf_dir] = run_distributed(_body, 1, hf_dir, ROLES, 1, 1, False)[0]
    return _REFERENCE[hf_dir]


def _compare(ref, results, what):
    for rank, r in enumerate(results):
        assert r["streamed_differ"] == [], f"{what}: rank {rank} streamed weights differ from the full-dict load"
    outs = [r["outputs"] for r in results if r["outputs"] is not None]
    assert outs, "no rank returned outputs"
    for out in outs:
        torch.testing.assert_close(out, ref["outputs"], atol=ATOL, rtol=0, msg=f"{what}: outputs differ")
    grads = results[0]["grads"]
    assert grads.keys() == ref["grads"].keys()
    for name, g in grads.items():
        r = ref["grads"][name]
        err = ((g - r).abs().max() / r.abs().max().clamp_min(1e-12)).item()
        assert err <= ATOL, f"{what}: grad of {name} differs (max error {err:.2e} of its largest entry)"


LAYOUTS = [  # (world, tp, pp, sp)
    (2, 2, 1, False),
    (2, 1, 2, False),
    (2, 2, 1, True),
    (4, 2, 2, True),
]


@pytest.mark.parametrize("world,tp,pp,sp", LAYOUTS, ids=["tp2", "pp2", "tp2sp", "tp2pp2sp"])
def test_layout_matches_tp1(hf_models, world, tp, pp, sp):
    """Policy (Qwen2: QKV bias, untied) and critic, both roles built in the same ranks."""
    hf_dir = hf_models["qwen2"]
    ref = _reference(hf_dir)
    results = run_distributed(_body, world, hf_dir, ROLES, tp, pp, sp)
    for role in ROLES:
        _compare(ref[role], [r[role] for r in results], f"{role} tp={tp} pp={pp} sp={sp}")


@pytest.mark.parametrize("world,tp,pp,sp", [(2, 1, 2, False), (4, 2, 2, True)], ids=["pp2", "tp2pp2sp"])
def test_tied_embeddings_layout_matches_tp1(hf_models, world, tp, pp, sp):
    """Tied input/output embeddings split across pipeline stages (Llama-style, no QKV bias)."""
    hf_dir = hf_models["llama_tied"]
    ref = _reference(hf_dir)["policy"]
    results = run_distributed(_body, world, hf_dir, ("policy",), tp, pp, sp)
    _compare(ref, [r["policy"] for r in results], f"tied tp={tp} pp={pp} sp={sp}")
