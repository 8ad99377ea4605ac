"""Training checkpoints on 2 gloo ranks: policy at TP=2 (plain megatron optimizer) and critic at TP=1 x DP=2
(distributed optimizer), i.e. two layouts in one checkpoint.

Run A trains 4 steps on a fixed batch (step 1 trains only the critic, like value pretraining, so the policy's
optimizer is still empty at the first save), saving after steps 1, 2 and 4 (keep_last=3), then is killed in
the middle of the save of "step 5" (after the first role was written). Run B, a fresh spawn, checks the error
paths, loads the newest complete checkpoint (step 4: equal to A's final weights and Adam state), then loads
step 1 and trains steps 2-4 again: losses, grad norms, LRs, weights and Adam state must equal A's (exact
resume, including Adam's per-parameter `step`, the LR warmup position and the RNG streams). Its save of step 6
with keep_last=2 removes the crashed tmp directory and rotates steps 1 and 2 away."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vapo_megatron.testing.dist import DistributedTestError, run_distributed

pytestmark = pytest.mark.distributed

N, S, R, VOCAB = 4, 16, 8, 128
KILL_CODE = 17


def _build(hf_dir: str):
    from vapo_megatron.parallel.layout import ParallelConfig, RoleLayouts
    from vapo_megatron.testing.engines import build_engine

    layouts = RoleLayouts(ParallelConfig(tp=2), ParallelConfig(tp=1), seed=1234)
    common = dict(lr=1e-2, warmup_steps=3, micro_batch_size=2)
    return {"policy": build_engine(hf_dir, "policy", layouts, **common),
            "critic": build_engine(hf_dir, "critic", layouts, use_distributed_optimizer=True, **common)}


def _batch():
    from vapo_megatron.data.rl_batch import RLBatch

    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (N, S), generator=gen)
    mask = torch.ones(N, R)
    mask[1, 5:] = 0
    return RLBatch.from_tensors(ids, [S - R] * N, mask, returns=torch.randn(N, R, generator=gen))


def _objectives(tokens: float) -> dict:
    """The test's losses, normalised by the mini-batch's token count `tokens`."""
    from vapo_megatron.engine.objectives import Objective, response_logprobs, response_values

    def policy_loss(logits, mb):
        lp, _ = response_logprobs(logits, mb, VOCAB)
        loss = -(lp * mb.resp_mask).sum() / tokens
        return loss, {"loss": loss.detach()}

    def critic_loss(values, mb):
        v = response_values(values, mb)
        loss = 0.5 * ((v - mb.returns) ** 2 * mb.resp_mask).sum() / tokens
        return loss, {"loss": loss.detach()}

    return {"policy": Objective(policy_loss, ("loss",)), "critic": Objective(critic_loss, ("loss",))}


def _train(engines: dict, batch, step: int) -> dict:
    objectives = _objectives(float(batch.resp_mask.sum()))
    out = {}
    for role in ("critic", "policy"):
        if role == "policy" and step == 1:
            continue  # "value pretraining": the policy's optimizer has no state yet
        m = engines[role].train_step(batch, objectives[role])
        assert m[f"{role}/skipped"] == 0
        out[role] = (m[f"{role}/loss"], m[f"{role}/grad_norm"], m[f"{role}/lr"])
    return out


def _snapshot(engines: dict) -> dict:
    """This rank's weights and Adam state (moments and per-parameter step), in optimizer order."""
    out = {}
    for role, eng in engines.items():
        opt_state = []
        for o in getattr(eng.optimizer, "chained_optimizers", [eng.optimizer]):
            for group in o.optimizer.param_groups:
                for p in group["params"]:
                    st = o.optimizer.state[p]
                    opt_state.append({k: v.detach().clone() for k, v in st.items()})
        out[role] = {"weights": {n: p.detach().clone() for n, p in eng.model.named_parameters()},
                     "optimizer": opt_state, "steps_taken": eng.steps_taken}
    return out


def _draws() -> list:
    import random

    import numpy as np

    return [torch.rand(3), random.random(), float(np.random.rand())]


def _state(step: int) -> dict:
    return {"step": step, "seed_counter": 100 + step, "nonfinite_in_row": 0, "loader": {"sampler": {"pos": step}}}


def _run_a(hf_dir: str, run_dir: str, out_dir: str):
    """4 steps with saves after 1, 2, 4; then dies in the middle of a save."""
    import multiprocessing

    import torch.distributed as dist

    from vapo_megatron.engine import checkpoint as ckpt

    engines, batch, hist = _build(hf_dir), _batch(), []
    draws = None
    for step in range(1, 5):
        hist.append(_train(engines, batch, step))
        if step in (1, 2, 4):
            ckpt.save_checkpoint(run_dir, step, engines, _state(step), keep_last=3)
        if step == 1:
            draws = _draws()
    torch.save({"hist": hist, "draws": draws, "final": _snapshot(engines)},
               Path(out_dir) / f"a_rank{dist.get_rank()}.pt")

    original = ckpt._save_role

    def dying(engine, role_dir):
        original(engine, role_dir)
        for child in multiprocessing.active_children():  # dist_checkpointing's Manager, started by this rank
            child.kill()
        os._exit(KILL_CODE)  # like SIGKILL: no cleanup, no finally blocks

    ckpt._save_role = dying
    ckpt.save_checkpoint(run_dir, 5, engines, _state(5), keep_last=2)


def _run_b(hf_dir: str, run_dir: str):
    from vapo_megatron.engine import checkpoint as ckpt

    engines = _build(hf_dir)
    errors = {}
    for name, path, subset in (("missing", Path(run_dir) / "elsewhere", engines),
                               ("incomplete", next(ckpt.checkpoints_root(run_dir).glob("*.tmp-*")), engines),
                               ("roles", run_dir, {"policy": engines["policy"]})):
        try:
            ckpt.load_checkpoint(path, subset)
        except (FileNotFoundError, ckpt.CheckpointError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"

    state4 = ckpt.load_checkpoint(run_dir, engines)  # the newest complete one
    after_crash = _snapshot(engines)
    state1 = ckpt.load_checkpoint(ckpt.checkpoints_root(run_dir) / "step_00000001", engines)
    steps_after_load = {r: e.steps_taken for r, e in engines.items()}
    draws = _draws()
    batch = _batch()
    hist = [_train(engines, batch, step) for step in range(2, 5)]
    final = _snapshot(engines)
    ckpt.save_checkpoint(run_dir, 6, engines, _state(6), keep_last=2)
    return {"errors": errors, "state4": state4, "state1": state1, "after_crash": after_crash,
            "steps_after_load": steps_after_load, "draws": draws, "hist": hist, "final": final}


def _assert_snapshots_equal(a: dict, b: dict, what: str) -> None:
    for role in a:
        assert a[role]["steps_taken"] == b[role]["steps_taken"], (what, role)
        for name, t in a[role]["weights"].items():
            torch.testing.assert_close(b[role]["weights"][name], t, rtol=0, atol=1e-6,
                                       msg=lambda m, n=name, r=role: f"{what}: {r} {n}: {m}")
        assert len(a[role]["optimizer"]) == len(b[role]["optimizer"]), (what, role)
        for i, (sa, sb) in enumerate(zip(a[role]["optimizer"], b[role]["optimizer"])):
            assert sorted(sa) == sorted(sb), (what, role, i, sorted(sa), sorted(sb))
            for k in sa:
                torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-6,
                                           msg=lambda m, k=k, r=role, i=i: f"{what}: {r} state {i} {k}: {m}")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from vapo_megatron.models.tiny import save_tiny_hf_model

    out = tmp_path_factory.mktemp("tiny") / "model"
    save_tiny_hf_model(out, "qwen2", seed=0, hidden_size=64, num_layers=2, intermediate_size=128)
    return out


def test_save_kill_resume_rotate(hf_dir, tmp_path):
    from vapo_megatron.engine import checkpoint as ckpt

    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(DistributedTestError, match=f"exited with code {KILL_CODE}"):
        run_distributed(_run_a, 2, str(hf_dir), str(run_dir), str(out_dir), timeout=600)

    root = ckpt.checkpoints_root(run_dir)
    names = sorted(p.name for p in root.iterdir())
    tmp_dirs = [n for n in names if ".tmp-" in n]
    assert len(tmp_dirs) == 1 and tmp_dirs[0].startswith("step_00000005.tmp-"), names
    assert not (root / tmp_dirs[0] / ckpt.DONE_FILE).exists() and (root / tmp_dirs[0] / "critic").is_dir()
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step_00000001", "step_00000002",
                                                                 "step_00000004"], names
    assert ckpt.latest_checkpoint(run_dir) == root / "step_00000004"
    assert (root / ckpt.LATEST_FILE).read_text().strip() == "step_00000004"

    b = run_distributed(_run_b, 2, str(hf_dir), str(run_dir), timeout=600)
    a = [torch.load(out_dir / f"a_rank{r}.pt", weights_only=False) for r in range(2)]
    errors = b[0]["errors"]
    assert errors["missing"] == f"FileNotFoundError: no checkpoint in {run_dir / 'elsewhere' / 'checkpoints'}"
    assert errors["incomplete"].startswith("CheckpointError: checkpoint") and "incomplete" in errors["incomplete"]
    assert errors["roles"].startswith("CheckpointError") and "['critic', 'policy']" in errors["roles"]
    for r in range(2):
        ra, rb = a[r], b[r]
        assert rb["state4"] == _state(4) and rb["state1"] == _state(1)
        _assert_snapshots_equal(ra["final"], rb["after_crash"], f"rank {r}: step-4 checkpoint after the crash")
        assert rb["steps_after_load"] == {"policy": 0, "critic": 1}
        torch.testing.assert_close(rb["draws"][0], ra["draws"][0], rtol=0, atol=0)
        assert rb["draws"][1:] == ra["draws"][1:], "python/numpy RNG not restored"
        assert len(rb["hist"]) == 3
        for step, (ha, hb) in enumerate(zip(ra["hist"][1:], rb["hist"]), start=2):
            assert sorted(ha) == sorted(hb) == ["critic", "policy"]
            for role in ("policy", "critic"):
                for what, x, y in zip(("loss", "grad_norm", "lr"), ha[role], hb[role]):
                    assert abs(x - y) <= 1e-6, f"rank {r} step {step} {role} {what}: {x} (uninterrupted) vs {y}"
        _assert_snapshots_equal(ra["final"], rb["final"], f"rank {r}: after resume from step 1 + 3 steps")
    # the losses moved: the comparison above is not trivially between two untrained models
    assert a[0]["hist"][1]["policy"][0] != a[0]["hist"][3]["policy"][0]
    assert a[0]["hist"][0]["critic"][0] != a[0]["hist"][3]["critic"][0]

    names = sorted(p.name for p in root.iterdir())
    assert names == [ckpt.LATEST_FILE, "step_00000004", "step_00000006"], names
    assert (root / ckpt.LATEST_FILE).read_text().strip() == "step_00000006"
    assert ckpt.latest_checkpoint(run_dir) == root / "step_00000006"
