"""The trainer side of weight sync: `export.iter_hf_tensors` of a sharded Megatron model gives back, bit for bit,
the HF tensors the model was built from, at TP=1 and under TP / expert-TP / EP / PP, with the TP shards moved
through shared memory (`ShmExchange`) and through the process group (`GlooExchange`). A failure pinpoints
the gather or the HF layout written from the shards (QKV regrouping, gate/up halves, vocabulary trim, row-
parallel columns), not vLLM."""
from __future__ import annotations

import pytest
import torch

from vapo_megatron.models.tiny import save_tiny_hf_model
from vapo_megatron.testing.dist import run_distributed

pytestmark = pytest.mark.distributed
COMMON = dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=96, vocab_size=101)
# vocab 101: odd, so TP=2 pads the vocabulary and the trim is exercised
FAMILIES = {"qwen2": {}, "llama": dict(tie_word_embeddings=False), "qwen3": {},
            "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, mlp_only_layers=[1])}


def _shm_room() -> bool:
    import os

    if not os.path.isdir("/dev/shm"):
        return False
    stat = os.statvfs("/dev/shm")
    return stat.f_bavail * stat.f_frsize >= 2 << 30  # the exchange wants 2 x ranks x 2 slots of 64 MB


def _compare(hf_dir: str, layouts: list[dict]) -> list[str]:
    import os

    from safetensors.torch import load_file

    from vapo_megatron.engine.build import build_model
    from vapo_megatron.engine.export import iter_hf_tensors
    from vapo_megatron.engine.gather import SHM_ENV, tp_exchange
    from vapo_megatron.models.hf_config import load_arch
    from vapo_megatron.parallel.layout import ParallelConfig, current_groups, initialize

    arch = load_arch(hf_dir)
    hf = load_file(f"{hf_dir}/model.safetensors")
    problems = []
    for layout in layouts:
        parallel = ParallelConfig(**layout)
        initialize(parallel)
        model = build_model(arch, parallel, "policy", hf_get=hf.__getitem__, ddp=False).model
        for shm in ("1", "0"):
            os.environ[SHM_ENV] = shm
            exchange = type(tp_exchange(current_groups("policy").pg.tp, torch.device("cpu"), 1 << 20)).__name__
            wanted = "ShmExchange" if shm == "1" and parallel.tp > 1 and _shm_room() else "GlooExchange"
            if exchange != wanted:
                problems.append(f"{layout} shm={shm}: TP shards went through {exchange}, not {wanted}")
            got = {name: t.clone() for name, t in iter_hf_tensors(model, arch)}
            expected = {n: t for n, t in hf.items() if not (arch.tie_word_embeddings and n == "lm_head.weight")}
            if sorted(got) != sorted(expected):
                problems.append(f"{layout} shm={shm}: names differ: {sorted(set(got) ^ set(expected))[:4]}")
            problems += [f"{layout} shm={shm}: {n} differs" for n in expected
                         if n in got and not torch.equal(got[n], expected[n])]
            # a bf16 export casts each element once, equal to casting the source
            bf16 = {name: t.clone() for name, t in iter_hf_tensors(model, arch, dtype=torch.bfloat16)}
            problems += [f"{layout} shm={shm}: {n} bf16 differs" for n in expected
                         if not torch.equal(bf16[n], expected[n].to(torch.bfloat16))]
    os.environ.pop(SHM_ENV)
    return problems


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gather")
    return {f: str(save_tiny_hf_model(root / f, f, seed=3, **COMMON, **kw)) for f, kw in FAMILIES.items()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_tensors_are_the_source_at_tp2(hf_dirs, family):
    if family == "qwen3_moe":  # megatron-core wants SP with TP for MoE
        layouts = [dict(tp=1), dict(tp=2, sequence_parallel=True), dict(ep=2), dict(etp=2)]
    else:
        layouts = [dict(tp=1), dict(tp=2)]
    problems = run_distributed(_compare, 2, hf_dirs[family], layouts, timeout=600)
    assert problems == [[], []]


def test_hf_tensors_are_the_source_at_tp2_pp2(hf_dirs):
    problems = run_distributed(_compare, 4, hf_dirs["qwen2"], [dict(tp=2, pp=2)], timeout=600)
    assert problems == [[]] * 4
