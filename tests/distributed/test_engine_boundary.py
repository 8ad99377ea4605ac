"""The engine boundary of issue 22 on 2 gloo ranks: the policy at PP=2 (rank 0 never computes the loss) and the
critic at DP=2. One `train_step` per role runs no object collective (the metric names are the objective's
schema, known on every rank, not gathered), returns exactly `metric_names(objective)` on every rank with the same
numbers, and a dict batch is refused with a TypeError naming `RLBatch`. A failure pinpoints a per-step names
collective that came back, a rank that reports other keys, or a second batch contract."""
from __future__ import annotations

import pytest

from vapo_megatron.models.tiny import save_tiny_hf_model
from vapo_megatron.testing.dist import run_distributed

pytestmark = pytest.mark.distributed
VOCAB = 128
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
                      "send_object_list", "recv_object_list")


def _body(hf_dir: str) -> dict:
    import torch.distributed as dist

    from vapo_megatron.config import AlgorithmConfig
    from vapo_megatron.engine.objectives import actor_objective, critic_objective, minibatch_counts
    from vapo_megatron.parallel.layout import ParallelConfig, RoleLayouts
    from vapo_megatron.testing.engines import build_engine, synthetic_rl_batch

    layouts = RoleLayouts(ParallelConfig(pp=2), ParallelConfig())
    engines = {role: build_engine(hf_dir, role, layouts) for role in ("policy", "critic")}
    batch = synthetic_rl_batch(4, VOCAB, seed=2)
    counts, alg = minibatch_counts(batch), AlgorithmConfig(positive_lm_coef=1.0)
    objectives = {"policy": actor_objective(alg, counts, VOCAB), "critic": critic_objective(alg, counts)}
    calls: dict[str, int] = {}
    originals = {name: getattr(dist, name) for name in OBJECT_COLLECTIVES}

    def counting(name):
        def wrapped(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return originals[name](*args, **kwargs)
        return wrapped

    out = {}
    for role, engine in engines.items():
        for name in OBJECT_COLLECTIVES:
            setattr(dist, name, counting(name))
        try:
            metrics = engine.train_step(batch, objectives[role])
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)
        out[role] = {"metrics": metrics, "names": engine.metric_names(objectives[role])}
    out["object_calls"] = calls
    try:
        engines["critic"].train_step({"input_ids": batch.input_ids}, objectives["critic"])
        out["dict_refused"] = ""
    except TypeError as e:
        out["dict_refused"] = str(e)
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return str(save_tiny_hf_model(tmp_path_factory.mktemp("hf") / "qwen2", "qwen2", seed=1))


def test_train_step_runs_no_object_collective_and_reports_a_fixed_schema(hf_dir):
    results = run_distributed(_body, 2, hf_dir, timeout=300)
    for rank, r in enumerate(results):
        assert r["object_calls"] == {}, f"rank {rank}: object collectives in train_step: {r['object_calls']}"
        for role in ("policy", "critic"):
            assert list(r[role]["metrics"]) == list(r[role]["names"]), (rank, role)
            assert all(k.startswith(f"{role}/") for k in r[role]["names"]), r[role]["names"]
            assert r[role]["metrics"] == results[0][role]["metrics"], f"rank {rank} {role}: other numbers"
        assert {"policy/pg_loss", "policy/nll_loss", "policy/grad_norm"} <= set(r["policy"]["names"])
        assert r["policy"]["metrics"]["policy/skipped"] == 0 and r["policy"]["metrics"]["policy/grad_norm"] > 0
        assert "RLBatch" in r["dict_refused"], r["dict_refused"]
