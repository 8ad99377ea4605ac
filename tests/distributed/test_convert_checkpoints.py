"""HF <-> megatron-core torch_dist conversion, end to end.

* HF -> Megatron -> HF is bit-identical (Qwen2 untied with QKV bias; Llama tied, no bias, GQA; Llama MQA;
  bf16 stays bf16), and the critic keeps a reward model's `score` head or draws a fresh one.
* The streamed checkpoint has exactly the keys, shapes and chunks of megatron-core's own save.
* The converted checkpoint loads at TP=1, TP=2, PP=2 and TP=2 x PP=2 + SP, and the policy's logits (the
  critic's values) equal those of `transformers` on the original model.
* A checkpoint saved by a TP=2 x PP=2 model converts (through the CLI) to a HF model with that model's logits.

A failure pinpoints the direction and layout: a wrong fused layout, a lost bias or tied copy, a key or
offset that megatron would not read back at another layout.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vapo_megatron.models.tiny import save_tiny_hf_model
from vapo_megatron.testing.dist import run_distributed

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-5
LAYOUTS = [(1, 1, False), (2, 1, False), (1, 2, False), (2, 2, True)]  # (tp, pp, sp) on 4 ranks
# Loaded at every layout (TP=2 needs num_kv_heads divisible by 2). A vocabulary of 127 is padded to 128 at
# TP=2: megatron must read the 127 stored rows into the larger embedding.
POLICIES = ["qwen2", "llama_tied", "qwen2_v127"]
ROUND_TRIP = ["qwen2", "llama_tied", "llama_mqa", "qwen2_bf16", "qwen2_v127"]


def _ids() -> torch.Tensor:
    return torch.randint(3, 127, (2, 16), generator=torch.Generator().manual_seed(5))


def _convert_all(root: str) -> dict:
    """One process: every HF -> Megatron -> HF conversion, plus the checks that need megatron."""
    from vapo_megatron.convert.hf_to_megatron import convert_hf_to_megatron
    from vapo_megatron.convert.megatron_to_hf import convert_megatron_to_hf

    r = Path(root)
    for name in ROUND_TRIP:
        convert_hf_to_megatron(r / "hf" / name, r / "meg" / name, progress=False)
        convert_megatron_to_hf(r / "meg" / name, r / "rt" / name, max_shard_bytes=400_000, progress=False)
    for name, src in [("critic_rm", "reward_model"), ("critic_fresh", "qwen2")]:
        convert_hf_to_megatron(r / "hf" / src, r / "meg" / name, role="critic", seed=4, progress=False)
        convert_megatron_to_hf(r / "meg" / name, r / "rt" / name, progress=False)
    # a plain megatron-core checkpoint: no vapo_checkpoint.json, config and tokenizer from the HF directory
    shutil.copytree(r / "meg" / "qwen2", r / "meg" / "qwen2_raw",
                    ignore=shutil.ignore_patterns("vapo_checkpoint.json", "hf_assets"))
    convert_megatron_to_hf(r / "meg" / "qwen2_raw", r / "rt" / "qwen2_raw", hf_assets=r / "hf" / "qwen2",
                           role="policy", progress=False)
    return {"same_as_megatron_save": _compare_with_megatron_save(r), "shape_error": _load_wrong_model(r)}


def _tp1_model(arch, role):
    from vapo_megatron.engine.build import build_model
    from vapo_megatron.parallel.layout import ParallelConfig, initialize

    initialize(ParallelConfig())
    return build_model(arch, ParallelConfig(), role, ddp=False).model


def _compare_with_megatron_save(r: Path) -> list[str]:
    """Load the streamed checkpoint into a real model, save it with megatron-core, compare the metadata."""
    import pickle

    from megatron.core import dist_checkpointing

    from vapo_megatron.convert.dist_ckpt import load_model, read_info

    problems = []
    for name in ("qwen2", "critic_rm"):
        info = read_info(r / "meg" / name)
        model = _tp1_model(info.arch, info.role)
        load_model(model, r / "meg" / name)
        ref = r / "ref" / name
        ref.mkdir(parents=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(ref))
        ours, theirs = (pickle.loads((d / ".metadata").read_bytes()).state_dict_metadata
                        for d in (r / "meg" / name, ref))
        if {k: repr(v) for k, v in ours.items()} != {k: repr(v) for k, v in theirs.items()}:
            problems.append(name)
    return problems


def _load_wrong_model(r: Path) -> str:
    from vapo_megatron.convert.dist_ckpt import load_model, read_info

    model = _tp1_model(read_info(r / "meg" / "llama_mqa").arch, "policy")  # one KV head: smaller QKV
    try:
        load_model(model, r / "meg" / "qwen2")
    except ValueError as exc:
        return str(exc)
    return "no error"


def _outputs(model, ids, role):
    """Whole-vocabulary logits (or values) on last-stage ranks, None elsewhere."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from vapo_megatron.data.rl_batch import MicroBatch
    from vapo_megatron.engine.schedule import forward_backward
    from vapo_megatron.parallel.layout import current_groups

    tp = ps.get_tensor_model_parallel_world_size()

    def gather(out, mb):
        if role == "critic":
            return out.detach().clone()
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
        return torch.cat(parts, -1)

    outs = forward_backward(model, [MicroBatch(input_ids=ids)], None, forward_only=True, output_fn=gather,
                            groups=current_groups())
    return outs[0] if outs else None


def _layouts(root: str, ids: torch.Tensor) -> dict:
    """Four ranks: load the converted checkpoints at every layout; at TP2 x PP2 + SP also save a perturbed
    policy (the checkpoint a training run would write)."""
    from vapo_megatron.convert.dist_ckpt import load_model, read_info
    from vapo_megatron.engine.build import build_model
    from vapo_megatron.parallel.layout import ParallelConfig, initialize

    r, results = Path(root), {}
    for tp, pp, sp in LAYOUTS:
        parallel = ParallelConfig(tp=tp, pp=pp, sequence_parallel=sp)
        initialize(parallel)
        for name in POLICIES + (["critic_rm"] if (tp, pp) == (2, 2) else []):
            info = read_info(r / "meg" / name)
            model = build_model(info.arch, parallel, info.role, ddp=False).model
            load_model(model, r / "meg" / name)
            out = _outputs(model, ids, info.role)
            results[(name, tp, pp, sp)] = None if out is None else out[..., : info.arch.vocab_size]
        if (tp, pp) == (2, 2):
            results["perturbed"] = _perturb("qwen2", parallel, r, ids)
    return results


def _perturb(model_name: str, parallel, r: Path, ids: torch.Tensor):
    from vapo_megatron.convert.dist_ckpt import load_model, read_info, save_model
    from vapo_megatron.engine.build import build_model, load_full_state
    from vapo_megatron.engine.gather import full_state_dict

    info = read_info(r / "meg" / model_name)
    model = build_model(info.arch, parallel, "policy", ddp=False).model
    load_model(model, r / "meg" / model_name)
    full = full_state_dict(model, info.arch, "policy")
    gen = torch.Generator().manual_seed(11)  # identical on every rank: replicated tensors stay equal
    for name in sorted(full):
        full[name] = full[name] + 0.05 * torch.randn(full[name].shape, generator=gen)
    load_full_state(model, full, info.arch, "policy")
    save_model(model, r / "meg" / "perturbed", arch=info.arch, role="policy", hf_assets=r / "hf" / model_name)
    out = _outputs(model, ids, "policy")
    return None if out is None else out[..., : info.arch.vocab_size]


# ---- fixtures: HF models, conversions, layouts (each spawn once per module) ---------------------------------

@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from transformers import AutoConfig, Qwen2ForSequenceClassification

    root = tmp_path_factory.mktemp("convert")
    hf = root / "hf"
    save_tiny_hf_model(hf / "qwen2", "qwen2", seed=1)
    save_tiny_hf_model(hf / "llama_tied", "llama", seed=2, tie_word_embeddings=True, num_kv_heads=2)
    save_tiny_hf_model(hf / "llama_mqa", "llama", seed=3, tie_word_embeddings=False, num_kv_heads=1)
    save_tiny_hf_model(hf / "qwen2_bf16", "qwen2", seed=4, dtype=torch.bfloat16)
    save_tiny_hf_model(hf / "qwen2_v127", "qwen2", seed=7, vocab_size=127)
    cfg = AutoConfig.from_pretrained(hf / "qwen2", num_labels=1, architectures=["Qwen2ForSequenceClassification"])
    torch.manual_seed(6)
    rm = Qwen2ForSequenceClassification.from_pretrained(hf / "qwen2", config=cfg)  # trunk + new score head
    rm.save_pretrained(hf / "reward_model")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (hf / "reward_model" / f).write_bytes((hf / "qwen2" / f).read_bytes())
    return root


@pytest.fixture(scope="module")
def converted(root) -> dict:
    return run_distributed(_convert_all, 1, str(root))[0]


@pytest.fixture(scope="module")
def layouts(root, converted) -> list[dict]:
    return run_distributed(_layouts, 4, str(root), _ids())


def _hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from vapo_megatron.convert.hf_io import HFCheckpointReader

    reader = HFCheckpointReader(hf_dir)
    return {n: reader.get(n) for n in reader.names()}


def _hf_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def _hf_values(rm_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Per-token values of a reward model's trunk + score head (what the critic computes)."""
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return (rm.model(ids).last_hidden_state @ rm.score.weight.T)[..., 0]


# ---- tests -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip_is_bit_identical(root, converted, name):
    from vapo_megatron.models.hf_config import load_arch

    before, after = _hf_tensors(root / "hf" / name), _hf_tensors(root / "rt" / name)
    assert sorted(before) == sorted(after)
    for n, t in before.items():
        assert after[n].dtype == t.dtype and torch.equal(after[n], t), n
    assert load_arch(root / "rt" / name) == load_arch(root / "hf" / name)
    assert (root / "rt" / name / "tokenizer.json").read_bytes() == (root / "hf" / name / "tokenizer.json").read_bytes()


def test_plain_megatron_checkpoint_exports_with_hf_assets(root, converted):
    before, after = _hf_tensors(root / "hf" / "qwen2"), _hf_tensors(root / "rt" / "qwen2_raw")
    assert sorted(before) == sorted(after) and all(torch.equal(after[n], t) for n, t in before.items())
    assert (root / "rt" / "qwen2_raw" / "tokenizer.json").is_file()


def test_critic_keeps_reward_head_and_exports_token_classifier(root, converted):
    from transformers import AutoModelForTokenClassification

    rm, out = _hf_tensors(root / "hf" / "reward_model"), _hf_tensors(root / "rt" / "critic_rm")
    assert sorted(out) == sorted(set(rm) | {"score.bias"})
    assert all(torch.equal(out[n], t) for n, t in rm.items()) and not out["score.bias"].any()
    ids = _ids()
    model = AutoModelForTokenClassification.from_pretrained(root / "rt" / "critic_rm").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[..., 0], _hf_values(root / "hf" / "reward_model", ids))


def test_critic_without_score_head_gets_fresh_head(root, converted):
    src, out = _hf_tensors(root / "hf" / "qwen2"), _hf_tensors(root / "rt" / "critic_fresh")
    assert "lm_head.weight" not in out and out["score.weight"].shape == (1, 128)
    assert all(torch.equal(out[n], t) for n, t in src.items() if n != "lm_head.weight")
    assert 0.01 < out["score.weight"].std().item() < 0.03  # N(0, initializer_range=0.02)


def test_streamed_checkpoint_equals_megatron_save(converted):
    assert converted["same_as_megatron_save"] == []


def test_loading_into_wrong_model_names_tensor(converted):
    msg = converted["shape_error"]
    assert "linear_qkv.weight" in msg and "(4, 256, 128)" in msg and "(4, 192, 128)" in msg, msg


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("tp,pp,sp", LAYOUTS, ids=["tp1", "tp2", "pp2", "tp2pp2sp"])
def test_policy_logits_match_transformers(root, layouts, name, tp, pp, sp):
    ref = _hf_logits(root / "hf" / name, _ids())
    outs = [res[(name, tp, pp, sp)] for res in layouts if res[(name, tp, pp, sp)] is not None]
    assert len(outs) == 4 // pp
    for out in outs:
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_critic_values_match_reward_model_at_tp2pp2sp(root, layouts):
    ref = _hf_values(root / "hf" / "reward_model", _ids())
    outs = [res[("critic_rm", 2, 2, True)] for res in layouts if res[("critic_rm", 2, 2, True)] is not None]
    assert outs
    for out in outs:
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_tp2pp2_checkpoint_exports_through_cli(root, layouts):
    out_dir = root / "perturbed_hf"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_megatron_to_hf.py"), "--megatron-dir",
                           str(root / "meg" / "perturbed"), "--out-dir", str(out_dir), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = [res["perturbed"] for res in layouts if res["perturbed"] is not None]
    ref = _hf_logits(out_dir, _ids())
    assert expected
    for out in expected:
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert not torch.allclose(ref, _hf_logits(root / "hf" / "qwen2", _ids()), atol=1e-3)  # weights did move
