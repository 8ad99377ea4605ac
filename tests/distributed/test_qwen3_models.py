"""Qwen3 (QK-norm, head_dim independent of hidden/heads, no QKV bias) and Qwen3-MoE (top-k routing with
renormalised probabilities, a dense layer among MoE layers, experts split over EP ranks) in megatron-core on CPU.

The two conversion CLIs round-trip Qwen3 (tied, head_dim 64) and Qwen3-MoE (6 experts, top-3 without
renormalisation, decoder_sparse_step 2) bit-identically. One spawned run of 2 gloo ranks then checks that the
converted MoE checkpoint loads at EP2 and TP2 x EP2 with HF's logits, and, from the same HF weights streamed per
rank:
* the policy's logits equal `transformers`' logits (fp32) for Qwen3 at TP2, PP2, TP2+SP and for Qwen3-MoE at EP2,
  TP2 x EP2 (+SP, which megatron requires for MoE with TP), PP2 and expert-TP2; the critic's values equal the HF trunk's
  final hidden states times the score head;
* the gradients of a scalar loss on logits / values (each DP rank taking its share of the micro-batches) equal
  those of TP=PP=EP=1 (DP=2), so the all-to-all dispatch, the expert shards and their gradient reduction, the
  QK-norm gradient all-reduce and the load-balancing loss's scale (models/moe.py) are layout-independent;
* weight sync: a Qwen3-MoE policy at EP2 built from perturbed weights, pushed into vLLM in buckets (HF
  per-expert names into vLLM's fused-expert layout), gives vLLM log-probs equal to Megatron's (a Qwen3 policy
  too, on one rank: every rank of a run serves the same model).
A failure names the model, role and layout: a wrong expert placement or shard, a QK-norm mapped to the wrong
tensor, a routing that differs from HF's (norm_topk_prob), a lost expert in the sync.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vapo_megatron.models.tiny import save_tiny_hf_model
from vapo_megatron.testing.dist import run_distributed

pytestmark = pytest.mark.distributed
B, S, MICRO = 2, 16, 2
ATOL = 1e-5
DENSE_LAYOUTS = [(1, 1, False, 1, 1), (2, 1, False, 1, 1), (1, 2, False, 1, 1), (2, 1, True, 1, 1)]  # tp pp sp ep etp
MOE_LAYOUTS = [(1, 1, False, 1, 1), (1, 1, False, 2, 1), (2, 1, True, 2, 1), (1, 2, False, 1, 1),
               (1, 1, False, 1, 2)]
PROMPTS = [[1, 20, 21, 22, 23], [1, 40, 41]]
ROOT = Path(__file__).resolve().parents[2]
# Round-trip models: shapes not used above (head_dim 64 with 3 heads of hidden 96, tied; 6 experts, top-3 without
# renormalisation, MoE every second layer by decoder_sparse_step).
ROUND_TRIP = {
    "qwen3_tied": dict(family="qwen3", hidden_size=96, num_heads=3, num_kv_heads=1, head_dim=64,
                       intermediate_size=80, num_layers=3, tie_word_embeddings=True),
    "qwen3_moe_sparse": dict(family="qwen3_moe", hidden_size=64, num_heads=2, num_kv_heads=2, head_dim=64,
                             intermediate_size=72, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=40,
                             norm_topk_prob=False, decoder_sparse_step=2),
}
CKPT_LAYOUTS = [(1, 1, False, 2), (2, 1, True, 2)]  # the converted MoE checkpoint loads at EP2 and TP2 x EP2


def _inputs(vocab: int, micro: int = MICRO):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (micro, B, S), generator=g)
    return ids, torch.randn(micro, B, S, vocab, generator=g), torch.randn(micro, B, S, generator=g)


def _score(hidden: int) -> torch.Tensor:
    return torch.randn(1, hidden, generator=torch.Generator().manual_seed(3)) * 0.1


def _run_role(hf_dir: str, role: str, parallel, micro: int = MICRO) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from vapo_megatron.convert.hf_io import HFCheckpointReader
    from vapo_megatron.engine.build import build_model
    from vapo_megatron.models.hf_config import load_arch
    from vapo_megatron.testing.engines import weighted_outputs_and_grads

    arch = load_arch(hf_dir)
    reader, score = HFCheckpointReader(hf_dir), _score(arch.hidden_size)
    built = build_model(arch, parallel, role, hf_get=lambda n: score if n == "score.weight" else reader.get(n))
    ids, w_logits, w_values = _inputs(arch.vocab_size, micro)
    # each DP rank takes its share of the micro-batches, as in training (gradients are summed over DP ranks)
    mine = list(range(ps.get_data_parallel_rank(), micro, ps.get_data_parallel_world_size()))
    outputs, grads = weighted_outputs_and_grads(built, arch, role, ids, w_logits, w_values, mine)
    return {"outputs": dict(zip(mine, outputs)), "grads": grads if dist.get_rank() == 0 else None}


def _sync_report(hf_dir: str, parallel) -> dict:
    """The Megatron policy at `parallel`, built from perturbed weights, pushed into vLLM in buckets; max |vLLM -
    Megatron| log-prob on vLLM's greedy tokens. (Every rank serves the same model: vLLM creates its process
    groups per model, and ranks creating different groups would desynchronise torch's group creation.)"""
    from safetensors.torch import load_file

    from vapo_megatron.convert.mapping import iter_hf_to_full
    from vapo_megatron.engine.build import build_model
    from vapo_megatron.engine.export import iter_hf_tensors
    from vapo_megatron.models.hf_config import load_arch
    from vapo_megatron.parallel.layout import initialize
    from vapo_megatron.rollout.sampler import SamplingConfig
    from vapo_megatron.rollout.vllm_engine import RolloutEngine
    from vapo_megatron.testing.engines import megatron_response_logprobs

    engine = RolloutEngine(hf_dir, tensor_parallel_size=1, seed=0, max_model_len=64)  # before megatron's groups
    initialize(parallel)
    arch = load_arch(hf_dir)
    hf = load_file(f"{hf_dir}/model.safetensors")
    full = {pm.name: t + 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(9))
            for pm, t in iter_hf_to_full(hf.__getitem__, arch)}
    built = build_model(arch, parallel, "policy", full_state=full)
    buckets = engine.update_weights(iter_hf_tensors(built.model, arch), bucket_bytes=16 * 1024).buckets
    out = engine.generate(PROMPTS, SamplingConfig(n=1, temperature=0.0, max_tokens=8, seed=0))
    tokens = [p + r for p, r in zip(PROMPTS, out.response_ids)]
    meg = megatron_response_logprobs(built.model, arch, tokens, [len(p) for p in PROMPTS], out.lengths.tolist(),
                                     groups=built.groups)
    engine.shutdown()
    diff = max((m - torch.tensor(v)).abs().max().item() for m, v in zip(meg, out.rollout_logprobs))
    return dict(diff=diff, buckets=buckets)


def _load_checkpoint(ckpt_dir: str, parallel) -> torch.Tensor | None:
    """Logits of the policy loaded from a torch_dist checkpoint at `parallel` (TP-gathered; None off the last
    stage)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from vapo_megatron.convert.dist_ckpt import load_model, read_info
    from vapo_megatron.data.rl_batch import MicroBatch
    from vapo_megatron.engine.build import build_model
    from vapo_megatron.engine.schedule import forward_backward
    from vapo_megatron.parallel.layout import current_groups

    arch = read_info(ckpt_dir).arch
    model = build_model(arch, parallel, "policy", ddp=False).model
    load_model(model, ckpt_dir)
    model.eval()  # no load-balancing loss attached in eval

    def gather(out, mb):
        parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, out.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
        return torch.cat(parts, -1)[..., : arch.vocab_size]

    out = forward_backward(model, [MicroBatch(input_ids=_inputs(arch.vocab_size)[0][0])], None, forward_only=True,
                           output_fn=gather, groups=current_groups())
    return out[0] if out else None


def _body(dense_dir: str, moe_dir: str, moe_ckpt: str) -> dict:
    from vapo_megatron.parallel.layout import ParallelConfig, initialize

    results = {}
    for tp, pp, sp, ep in CKPT_LAYOUTS:
        parallel = ParallelConfig(tp=tp, pp=pp, sequence_parallel=sp, ep=ep)
        initialize(parallel)
        results["ckpt", tp, ep] = _load_checkpoint(moe_ckpt, parallel)
    for name, hf_dir, layouts in (("qwen3", dense_dir, DENSE_LAYOUTS), ("qwen3_moe", moe_dir, MOE_LAYOUTS)):
        for tp, pp, sp, ep, etp in layouts:
            parallel = ParallelConfig(tp=tp, pp=pp, sequence_parallel=sp, ep=ep, etp=etp)
            initialize(parallel)
            results[name, tp, pp, sp, ep, etp] = {role: _run_role(hf_dir, role, parallel)
                                                   for role in ("policy", "critic")}
    results["sync"] = _sync_report(moe_dir, ParallelConfig(ep=2))
    return results


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qwen3")


@pytest.fixture(scope="module")
def hf_models(root):
    common = dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=96)
    return (str(save_tiny_hf_model(root / "qwen3", "qwen3", seed=1, **common)),
            str(save_tiny_hf_model(root / "qwen3_moe", "qwen3_moe", seed=2, num_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=64, mlp_only_layers=[1], **common)))


def _cli(tool: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, str(ROOT / "tools" / tool), *args, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def cli_round_trip(root) -> Path:
    """HF -> Megatron -> HF of the ROUND_TRIP models through the two CLIs (the models side by side)."""
    for name, kwargs in ROUND_TRIP.items():
        save_tiny_hf_model(root / "hf" / name, seed=11, **kwargs)
    _wait([_cli("convert_hf_to_megatron.py", "--hf-dir", str(root / "hf" / n), "--out-dir", str(root / "meg" / n))
           for n in ROUND_TRIP])
    _wait([_cli("convert_megatron_to_hf.py", "--megatron-dir", str(root / "meg" / n), "--out-dir",
                str(root / "rt" / n), "--max-shard-size", "100KB") for n in ROUND_TRIP])
    return root


def _hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from vapo_megatron.convert.hf_io import HFCheckpointReader

    reader = HFCheckpointReader(hf_dir)
    return {n: reader.get(n) for n in reader.names()}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_cli_round_trip_is_bit_identical(cli_round_trip, name):
    """HF per-expert tensors -> Megatron local experts -> HF, QK-norms, tied embeddings: same names, dtypes and
    bits; config fields read back to the same ModelArch."""
    from vapo_megatron.models.hf_config import load_arch

    before, after = _hf_tensors(cli_round_trip / "hf" / name), _hf_tensors(cli_round_trip / "rt" / name)
    assert sorted(before) == sorted(after)
    for key, t in before.items():
        assert after[key].dtype == t.dtype and torch.equal(after[key], t), f"{name}: {key} changed"
    assert load_arch(cli_round_trip / "rt" / name) == load_arch(cli_round_trip / "hf" / name)


def _hf_reference(hf_dir: str, micro: int = MICRO) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = _inputs(model.config.vocab_size, micro)[0]
    with torch.no_grad():
        logits = torch.stack([model(ids[i]).logits for i in range(micro)])
        hidden = torch.stack([model.model(ids[i]).last_hidden_state for i in range(micro)])
    return {"policy": logits, "critic": hidden @ _score(model.config.hidden_size)[0]}


def _compare_grads(ref: dict, got: dict, what: str) -> None:
    assert got.keys() == ref.keys(), f"{what}: parameter sets differ"
    for name, g in got.items():
        r = ref[name]
        err = ((g - r).abs().max() / r.abs().max().clamp_min(1e-12)).item()
        assert err <= ATOL, f"{what}: grad of {name} differs from TP=PP=EP=1 (max error {err:.2e} of its largest)"


def _check_layouts(results: list[dict], name: str, hf_dir: str, layouts: list[tuple], micro: int = MICRO) -> None:
    """Every layout's outputs equal HF's and its gradients those of the first layout (TP=PP=EP=1)."""
    hf = _hf_reference(hf_dir, micro)
    ref = results[0][(name, *layouts[0])]
    for layout in layouts:
        what = f"{name} tp={layout[0]} pp={layout[1]} sp={layout[2]} ep={layout[3]} etp={layout[4]}"
        for role in ("policy", "critic"):
            outs = [(i, out) for r in results for i, out in r[(name, *layout)][role]["outputs"].items()]
            assert {i for i, _ in outs} == set(range(micro)), f"{what} {role}: micro-batches missing"
            for i, out in outs:
                torch.testing.assert_close(out, hf[role][i], atol=ATOL, rtol=0, msg=f"{what} {role}: != HF")
            _compare_grads(ref[role]["grads"], results[0][(name, *layout)][role]["grads"], f"{what} {role}")


def test_qwen3_and_moe_match_hf_and_tp1_at_every_layout(hf_models, cli_round_trip):
    dense_dir, moe_dir = hf_models
    moe_ckpt = cli_round_trip / "meg" / "qwen3_moe_sparse"
    results = run_distributed(_body, 2, dense_dir, moe_dir, str(moe_ckpt), timeout=900)
    hf_sparse = _hf_reference(str(cli_round_trip / "hf" / "qwen3_moe_sparse"))["policy"][0]
    for tp, _, _, ep in CKPT_LAYOUTS:
        for r in results:
            torch.testing.assert_close(r["ckpt", tp, ep], hf_sparse, atol=ATOL, rtol=0,
                                       msg=f"converted MoE checkpoint loaded at tp={tp} ep={ep}: logits != HF")
    for name, hf_dir, layouts in (("qwen3", dense_dir, DENSE_LAYOUTS), ("qwen3_moe", moe_dir, MOE_LAYOUTS)):
        _check_layouts(results, name, hf_dir, layouts)
    for rank, result in enumerate(results):
        rep = result["sync"]
        assert rep["buckets"] > 1
        assert rep["diff"] <= 1e-4, f"qwen3_moe ep2, rank {rank}: vLLM vs Megatron log-probs after the sync differ " \
                                    f"by {rep['diff']:.2e}"


def _dense_sync_body(hf_dir: str) -> dict:
    from vapo_megatron.parallel.layout import ParallelConfig

    return _sync_report(hf_dir, ParallelConfig())


def test_qwen3_dense_weight_sync_into_vllm(hf_models):
    """vLLM's qwen3 (QK-norm) loads the pushed HF tensors: its log-probs equal Megatron's."""
    rep = run_distributed(_dense_sync_body, 1, hf_models[0], timeout=600)[0]
    assert rep["buckets"] > 1
    assert rep["diff"] <= 1e-4, f"qwen3: vLLM vs Megatron log-probs after the sync differ by {rep['diff']:.2e}"


# four ranks: expert tensor parallelism together with EP, and EP / expert-TP under pipeline parallelism
MOE_LAYOUTS_4 = [(1, 1, False, 1, 1), (2, 1, True, 2, 2), (1, 2, False, 2, 1), (1, 2, False, 1, 2)]


def _body4(moe_dir: str) -> dict:
    from vapo_megatron.parallel.layout import ParallelConfig, initialize

    results = {}
    for tp, pp, sp, ep, etp in MOE_LAYOUTS_4:
        parallel = ParallelConfig(tp=tp, pp=pp, sequence_parallel=sp, ep=ep, etp=etp)
        initialize(parallel)
        results["qwen3_moe", tp, pp, sp, ep, etp] = {role: _run_role(moe_dir, role, parallel, micro=4)
                                                      for role in ("policy", "critic")}
    return results


@pytest.mark.slow
def test_moe_expert_tp_with_ep_and_under_pp_on_four_ranks(hf_models):
    """Qwen3-MoE at TP2 x EP2 x ETP2 (+SP), PP2 x EP2 and PP2 x ETP2 on 4 ranks: logits and values equal HF's,
    gradients equal TP=PP=EP=1's."""
    results = run_distributed(_body4, 4, hf_models[1], timeout=1800)
    _check_layouts(results, "qwen3_moe", hf_models[1], MOE_LAYOUTS_4, micro=4)
