"""Separate placement on CPU ranks (rank 0 trains, rank 1 runs only vLLM, weights by the broadcast transport over
the bridge). k = 0: the same samples and metrics as colocated at the same seeds, also at trainer TP=2 with vLLM
TP=1 and TP=2 (one engine over two rollout ranks). k = 1: every trained batch at most 1 version old, and logged.
A rollout rank that dies or hangs stops the run with RolloutRankError. A failure pinpoints rollout/placement.py
(the split), rollout/async_pool.py (the protocol) or rollout/channel.py."""
from __future__ import annotations

import json
import math
import time

import pytest

from vapo_megatron.testing.assets import tiny_task_assets
from vapo_megatron.testing.dist import DistributedTestError, run_distributed

pytestmark = pytest.mark.distributed


def _colocated_body(overrides):
    from vapo_megatron.config import load_config
    from vapo_megatron.train.loop import Trainer

    return Trainer(load_config(None, overrides)).run()


def _separate_body(overrides, fault=None, resume=False):
    from vapo_megatron.config import load_config
    from vapo_megatron.rollout.async_pool import RolloutServer, serve_rollouts
    from vapo_megatron.rollout.placement import split_world
    from vapo_megatron.train.loop import Trainer

    cfg = load_config(None, overrides)
    pools = split_world(cfg)
    if pools.role == "rollout":
        if fault:
            kind, at = fault
            answer = RolloutServer._answer

            def faulty(self, batch):
                if batch == at:
                    if kind == "die":
                        import os
                        os._exit(3)
                    time.sleep(3600)
                return answer(self, batch)

            RolloutServer._answer = faulty
        return serve_rollouts(cfg, pools)
    return Trainer(cfg, resume=resume, pools=pools).run()


def _record_samples():
    """Make this process's `RolloutEngine.generate` keep what its engine sampled (before any gather over ranks),
    and the vLLM TP size and rank it ran at. Returns the list it fills: one
    (tp size, tp rank, {(prompt, sample): (tokens, logprobs)}) per call."""
    from vapo_megatron.rollout.vllm_engine import RolloutEngine

    calls, generate = [], RolloutEngine.generate

    def recording(self, prompt_token_ids, params, *, prompt_offset=0):
        from vllm.distributed import parallel_state

        out = generate(self, prompt_token_ids, params, prompt_offset=prompt_offset)
        calls.append((parallel_state.get_tensor_model_parallel_world_size(),
                      parallel_state.get_tensor_model_parallel_rank(),
                      {(p, s): (tokens, logprobs) for p, s, tokens, logprobs in zip(
                          out.prompt_index.tolist(), out.sample_index.tolist(), out.response_ids,
                          out.rollout_logprobs)}))
        return out

    RolloutEngine.generate = recording
    return calls


def _recorded(body, *args):
    calls = _record_samples()
    return {"result": body(*args), "calls": calls}


def _samples_by_call(ranks, vllm_tp):
    """The ranks' recorded calls merged into one {(prompt, sample): (tokens, logprobs)} per call. Every recorded
    engine ran at `vllm_tp`, and the TP peers of one engine sampled exactly the same tokens and log-probs."""
    merged = []
    for r in ranks:
        for i, (tp, _, samples) in enumerate(r["calls"]):
            assert tp == vllm_tp, (tp, vllm_tp)
            if i == len(merged):
                merged.append({})
            for key, value in samples.items():
                assert merged[i].setdefault(key, value) == value, f"call {i}, sample {key}: TP peers differ"
    assert {tuple(sorted({c[1] for c in r["calls"]})) for r in ranks} == {(t,) for t in range(vllm_tp)}
    return merged


def _assert_same_samples(calls_a, calls_b):
    assert len(calls_a) == len(calls_b), (len(calls_a), len(calls_b))
    for i, (a, b) in enumerate(zip(calls_a, calls_b)):
        assert a.keys() == b.keys(), i
        for key in a:
            (tokens_a, lp_a), (tokens_b, lp_b) = a[key], b[key]
            assert tokens_a == tokens_b, f"batch {i + 1}, sample {key}: {tokens_b} vs {tokens_a}"
            assert len(lp_a) == len(lp_b) == len(tokens_a), key
            differ = [(t, y, x) for t, (x, y) in enumerate(zip(lp_a, lp_b))
                      if not abs(y - x) <= 1e-5 * max(1.0, abs(x))]
            assert not differ, f"batch {i + 1}, sample {key}: log-probs (position, separate, colocated) {differ}"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_task_assets(tmp_path_factory.mktemp("assets"), num_val=8)


def _overrides(assets, run_dir, *extra):
    return [f"model.hf_dir={assets / 'model'}", "model.dtype=float32", "rollout.num_prompts=4", "rollout.n=2",
            "rollout.max_prompt_length=64", "rollout.max_response_length=16", "rollout.cpu_kv_cache_bytes=134217728",
            "train.steps=2", "train.mini_batch_size=4", "train.micro_batch_size=2", "algorithm.value_pretrain_steps=1",
            "actor_optim.lr=1e-3", "critic_optim.lr=1e-3", f"data.train_files=[{assets / 'data' / 'train.jsonl'}]",
            "reward.name=synthetic", f"checkpoint.run_dir={run_dir}", "logging.progress_bar=false",
            "logging.tensorboard=false", "checkpoint.export_hf_at_end=false", *extra]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_metrics(run_a, run_b, last_a, steps):
    rows_a, rows_b = _rows(run_a), _rows(run_b)
    assert len(rows_a) == len(rows_b) == steps
    compared = [k for k, v in last_a.items() if isinstance(v, float) and not k.startswith("t_")]
    assert {"policy/pg_loss", "critic/value_loss", "reward_mean", "rollout_logprob_diff"} <= set(compared)
    for ra, rb in zip(rows_a, rows_b):
        differ = [f"step {ra['step']} {k}: {rb.get(k)} vs {ra[k]}" for k in compared if k in ra
                  and not (math.isnan(ra[k]) and math.isnan(rb[k]))
                  and not abs(rb[k] - ra[k]) <= 1e-5 * max(1.0, abs(ra[k]))]
        assert not differ, differ
        assert rb["staleness_max"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("vllm_tp", [1, 2])
def test_separate_sync_equals_colocated_trainer_tp2(assets, tmp_path, vllm_tp):
    """Trainer TP=2 (policy and critic) on 2 ranks. vLLM TP=1: colocated, 2 engines (one per trainer rank);
    separate, 1 rollout rank (world 3). vLLM TP=2: colocated, one engine over both trainer ranks; separate, one
    engine over rollout ranks 2-3 (world 4), each fed the whole tensors by the broadcast transport and keeping its
    shard. Value pretraining, then 2 PPO steps: batch 3 is sampled after a weight push. Every batch's samples
    (tokens exactly, log-probs to 1e-5) and every step's metrics (1e-5) equal colocated's, the TP peers of an
    engine sampled the same tokens, and each rollout rank generated and answered each batch once."""
    extra = ("policy_parallel.tp=2", "critic_parallel.tp=2", f"rollout.vllm_tensor_parallel={vllm_tp}")
    colocated = run_distributed(_recorded, 2, _colocated_body, _overrides(assets, tmp_path / "a", *extra),
                                timeout=1200)
    sep = run_distributed(_recorded, 2 + vllm_tp, _separate_body, _overrides(
        assets, tmp_path / "b", *extra, "rollout.placement=separate", f"rollout.rollout_ranks={vllm_tp}"),
        timeout=1200)
    _assert_same_metrics(tmp_path / "a", tmp_path / "b", colocated[0]["result"], 3)
    assert not any(r["calls"] for r in sep[:2]), "the trainer pool has no engine"
    _assert_same_samples(_samples_by_call(colocated, vllm_tp), _samples_by_call(sep[2:], vllm_tp))
    assert all(r["result"]["generated"] == 3 and r["result"]["answered"] == 3 for r in sep[2:]), sep[2:]


@pytest.mark.parametrize("k", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_resume_with_samples_in_flight(assets, tmp_path, k):
    """Run 3 steps saving after each; drop the last checkpoint and resume from step 2. k = 0: the run first equals
    colocated at the same seeds (every step's metrics within 1e-5, each batch generated and answered once), and
    step 3 resumed is the same step again (samples, rewards, losses, gradient norms). k = 1: batch 3, in flight at
    the checkpoint, is generated again from the same prompts (the trainer checks their fingerprint) and trained
    once."""
    import shutil

    run_dir = tmp_path / "run"
    common = ("algorithm.tis_cap=2.0", "checkpoint.save_every=1", "checkpoint.keep_last=5")
    overrides = _overrides(assets, run_dir, "rollout.placement=separate", "rollout.rollout_ranks=1",
                           f"rollout.max_staleness={k}", *common)
    full = run_distributed(_separate_body, 2, overrides, None, False, timeout=600)
    if k == 0:  # staleness 0: the same samples and metrics as colocated
        colocated = run_distributed(_colocated_body, 1, _overrides(assets, tmp_path / "colocated", *common),
                                    timeout=600)[0]
        _assert_same_metrics(tmp_path / "colocated", run_dir, colocated, 3)
        assert full[1]["generated"] == 3 and full[1]["answered"] == 3, full[1]
    shutil.rmtree(run_dir / "checkpoints" / "step_00000003")
    resumed = run_distributed(_separate_body, 2, overrides, None, True, timeout=600)
    assert full[0]["step"] == resumed[0]["step"] == 3
    assert [r["step"] for r in _rows(run_dir)] == [1, 2, 3], "the resumed run rewrites the rows after its checkpoint"
    assert resumed[1]["generated"] == resumed[1]["answered"] == 3, resumed[1]  # batch 3 once, nothing past it
    assert resumed[0]["staleness_max"] == 0  # regenerated by the checkpoint's policy
    if k == 0:
        compared = [key for key, v in full[0].items() if isinstance(v, float) and not key.startswith("t_")]
        assert {"policy/pg_loss", "critic/value_loss", "policy/grad_norm", "reward_mean"} <= set(compared)
        differ = [f"{key}: {resumed[0][key]} vs {full[0][key]}" for key in compared
                  if not (math.isnan(full[0][key]) and math.isnan(resumed[0][key]))
                  and not abs(resumed[0][key] - full[0][key]) <= 1e-6 * max(1.0, abs(full[0][key]))]
        assert not differ, differ


@pytest.mark.parametrize("k", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_bounded_staleness(assets, tmp_path, k):
    run_dir = tmp_path / "run"
    results = run_distributed(_separate_body, 2, _overrides(
        assets, run_dir, "rollout.placement=separate", "rollout.rollout_ranks=1", f"rollout.max_staleness={k}",
        "algorithm.tis_cap=2.0", "train.steps=4"), timeout=900)
    rows = _rows(run_dir)
    stale = [r["staleness_max"] for r in rows]
    assert max(stale) <= k, stale
    assert stale[-1] == k, f"steps late in the run should train on k={k}-old samples: {stale}"
    for r in rows:
        assert math.isfinite(r["policy/pg_loss"] if "policy/pg_loss" in r else 0.0)
        assert r["behaviour_weight_mean"] > 0
    assert results[1]["generated"] == len(rows)  # never ahead past the last step


def _stopped_body(overrides):
    from vapo_megatron.errors import CriticNotReadyError

    try:
        return _separate_body(overrides)
    except CriticNotReadyError as e:
        return {"stopped": str(e)}


def test_unready_critic_stop_ends_both_pools(assets, tmp_path):
    """algorithm.critic_unready=stop (the default) with separate placement: value pretraining ends at its cap below
    an unreachable threshold; the trainer saves, tells the rollout pool to stop and raises CriticNotReadyError;
    the rollout rank returns at once (not after rollout.rollout_timeout_s, here 300 s)."""
    run_dir = tmp_path / "run"
    start = time.monotonic()
    trainer, pool = run_distributed(_stopped_body, 2, _overrides(
        assets, run_dir, "rollout.placement=separate", "rollout.rollout_ranks=1", "rollout.rollout_timeout_s=300",
        "algorithm.value_pretrain_ev_threshold=1000", "algorithm.critic_unready=stop"), timeout=600)
    assert "cap at step 1" in trainer["stopped"] and "critic_unready=stop" in trainer["stopped"], trainer
    assert pool["generated"] >= 1 and pool["answered"] == 1, pool
    assert (run_dir / "checkpoints" / "step_00000001" / "DONE").exists()
    assert time.monotonic() - start < 250, "the rollout rank waited for its timeout"


def test_rollout_rank_hang_stops_the_run(assets, tmp_path):
    """The rollout rank stops answering at step 2: the trainer raises RolloutRankError naming it within
    rollout.rollout_timeout_s (20 s), and the harness ends every rank."""
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as e:
        run_distributed(_separate_body, 2, _overrides(assets, tmp_path / "run", "rollout.placement=separate",
                                                      "rollout.rollout_ranks=1", "rollout.rollout_timeout_s=20"),
                        ("hang", 2), timeout=300)
    text = str(e.value)
    assert "RolloutRankError" in text and "hung" in text, text[-2000:]
    assert time.monotonic() - start < 280


def _die_rank(rank: int, port: int, overrides: list[str], out: str) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch.distributed as dist

    from vapo_megatron import platform
    from vapo_megatron.errors import RolloutRankError

    platform.setup()
    dist.init_process_group(platform.dist_backend(), rank=rank, world_size=2)
    start = time.monotonic()
    try:
        _separate_body(overrides, ("die", 2))
    except RolloutRankError as e:
        with open(out, "w") as f:
            json.dump({"error": str(e), "seconds": time.monotonic() - start}, f)
        os._exit(0)
    os._exit(1)


def test_rollout_rank_death_stops_the_run(assets, tmp_path):
    """The rollout rank dies (exit 3) at step 2: the trainer raises RolloutRankError saying so (gloo sees the
    closed connection at once) and exits; no process is left. Own launcher: run_distributed stops at the first
    rank that exits, before the trainer's error arrives."""
    import multiprocessing as mp

    from vapo_megatron.platform import free_port

    out = tmp_path / "trainer_error.json"
    overrides = _overrides(assets, tmp_path / "run", "rollout.placement=separate", "rollout.rollout_ranks=1",
                           "rollout.rollout_timeout_s=120")
    ctx, port = mp.get_context("spawn"), free_port()
    procs = [ctx.Process(target=_die_rank, args=(r, port, overrides, str(out))) for r in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=400)
        assert [p.exitcode for p in procs] == [0, 3], [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    result = json.loads(out.read_text())
    assert "died" in result["error"] and "rollout rank 1" in result["error"], result
    assert not any(p.is_alive() for p in procs)
