"""Routing replay in the trainer's Megatron model (models/moe.py RoutingReplay, engine/schedule.py): given the
experts each token must use, the Qwen3-MoE policy at EP2 and at TP2 x EP2 + SP gives the logits of Hugging Face's
model forced to route exactly so (the obviously-correct reference: HF's router patched to return the given
experts, with the softmax of their logits as weights, which is `norm_topk_prob`'s renormalised top-k), and the
routers' routing map holds exactly the given experts. With the switch ignored (no replay) the logits follow the
model's own routing instead and differ from the reference. A failure pinpoints the token order of the replayed
indices ([S, b] in megatron, the sequence-parallel shard), the layer columns, or a replay that was dropped.

The engine (engine/model_engine.py, `routing_replay=True`, as `algorithm.routing_replay` builds the policy): given a
batch whose `routed_experts` differ from the model's own choice, its forward log-probs equal HF's forced to the
same experts, padded and packed, and its train step replays every real token in every MoE layer
(`moe_replayed_tokens`); the same engine built without the switch gives other log-probs, and a replay engine
refuses a batch without `routed_experts`.

Recording (rollout/routing.py): the experts recorded from vLLM for every token are HF's own top-k for it. The
trainer-level run with the switch on is in tests/distributed/test_trainer_moe.py."""
from __future__ import annotations

import pytest
import torch

from vapo_megatron.models.tiny import save_tiny_hf_model
from vapo_megatron.testing.dist import run_distributed

pytestmark = pytest.mark.distributed
B, S, E, K = 2, 16, 4, 2
LAYOUTS = [(1, False, 2), (2, True, 2)]  # (tp, sp, ep) on 2 ranks


def _ids() -> torch.Tensor:
    return torch.randint(3, 128, (B, S), generator=torch.Generator().manual_seed(5))


def _forced_routing(num_moe_layers: int) -> torch.Tensor:
    """[B, S, layers, K] distinct experts per token, unlike what the random router would pick."""
    return _forced((B, S), num_moe_layers, 11)


N_ROWS = 4


def _rl_batch():
    from vapo_megatron.testing.engines import synthetic_rl_batch

    return synthetic_rl_batch(N_ROWS, 128, seed=7, prompt_len=(3, 9), resp_len=(4, 14))


def _forced(shape: tuple[int, ...], num_moe_layers: int, seed: int) -> torch.Tensor:
    """[*shape, layers, K] distinct experts per token, unlike what the random router would pick."""
    g, n = torch.Generator().manual_seed(seed), int(torch.tensor(shape).prod()) * num_moe_layers
    return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n)]).view(*shape, num_moe_layers, K)


def _engine_body(hf_dir: str, routed: torch.Tensor) -> dict:
    """The policy engine at EP2 with and without the switch, padded and packed."""
    from vapo_megatron.config import AlgorithmConfig
    from vapo_megatron.engine.objectives import actor_objective, minibatch_counts, response_logprobs
    from vapo_megatron.parallel.layout import ParallelConfig, RoleLayouts
    from vapo_megatron.testing.engines import build_engine

    layouts = RoleLayouts(ParallelConfig(ep=2), ParallelConfig(ep=2))
    batch = _rl_batch()
    out = {}
    for name, kw in {"padded": dict(pack_sequences=False, micro_batch_size=1),
                     "packed": dict(pack_sequences=True, micro_batch_tokens=40)}.items():
        for switch in (True, False):
            engine = build_engine(hf_dir, "policy", layouts, routing_replay=switch, **kw)
            if switch:
                try:
                    engine.forward(batch, lambda o, mb: response_logprobs(o, mb, 128)[0])
                    out[name, "refusal"] = None
                except ValueError as e:
                    out[name, "refusal"] = str(e)
            batch.routed_experts = routed
            logprobs = engine.forward(batch, lambda o, mb: response_logprobs(o, mb, 128)[0])
            metrics = engine.train_step(batch, actor_objective(AlgorithmConfig(), minibatch_counts(batch), 128))
            out[name, switch] = dict(logprobs=logprobs, metrics=metrics)
            batch = _rl_batch()
    return out


def _body(hf_dir: str, routed: torch.Tensor, engine_routed: torch.Tensor) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from vapo_megatron.convert.hf_io import HFCheckpointReader
    from vapo_megatron.data.rl_batch import MicroBatch
    from vapo_megatron.engine.build import build_model
    from vapo_megatron.engine.schedule import forward_backward
    from vapo_megatron.models.hf_config import load_arch
    from vapo_megatron.models.moe import RoutingCounter, RoutingReplay
    from vapo_megatron.parallel.layout import ParallelConfig, current_groups, initialize

    arch, results = load_arch(hf_dir), {}
    for tp, sp, ep in LAYOUTS:
        parallel = ParallelConfig(tp=tp, sequence_parallel=sp, ep=ep)
        initialize(parallel)
        model = build_model(arch, parallel, "policy", hf_get=HFCheckpointReader(hf_dir).get, ddp=False,
                            moe_enable_routing_replay=True).model
        replay = RoutingReplay(model, list(arch.moe_layers), arch.moe_layers)
        counter = RoutingCounter(model, list(arch.moe_layers), arch.num_experts)

        def gather(out, mb):
            parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
            dist.all_gather(parts, out.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
            return torch.cat(parts, -1)[..., : arch.vocab_size]

        for switch in (True, False):
            counter.reset()
            counter.active = True
            out = forward_backward(model, [MicroBatch(input_ids=_ids(), routed_experts=routed)], None,
                                   forward_only=True, output_fn=gather, routing_replay=replay if switch else None,
                                   groups=current_groups())
            counter.active = False
            counts = counter.counts.clone()
            dist.all_reduce(counts, group=ps.get_tensor_model_parallel_group())  # SP: each TP rank its shard
            results[tp, switch] = dict(logits=out[0], counts=counts)
        replay.set(None)
    results["engine"] = _engine_body(hf_dir, engine_routed)
    return results


def _hf_forced_logits(hf_dir: str, routed: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    ids = _ids() if ids is None else ids
    b, s = ids.shape
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    moe_layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    for column, i in enumerate(moe_layers):
        gate = model.model.layers[i].mlp.gate
        chosen = routed[:, :, column, :].reshape(b * s, K)  # HF's token order: [B, S] flattened

        def forward(hidden, gate=gate, chosen=chosen):
            logits = torch.nn.functional.linear(hidden.reshape(-1, gate.hidden_dim), gate.weight)
            weights = torch.softmax(logits.gather(1, chosen).float(), -1).to(logits.dtype)
            return logits, weights, chosen

        gate.forward = forward
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return str(save_tiny_hf_model(tmp_path_factory.mktemp("hf") / "moe", "qwen3_moe", seed=3, hidden_size=64,
                                  num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=96, num_experts=E,
                                  num_experts_per_tok=K, norm_topk_prob=True, mlp_only_layers=[1]))


@pytest.fixture(scope="module")
def spawned(hf_dir):
    """One 2-rank run for the model-level and the engine-level checks."""
    from vapo_megatron.models.hf_config import load_arch

    layers = len(load_arch(hf_dir).moe_layers)
    routed, engine_routed = _forced_routing(layers), _forced(tuple(_rl_batch().input_ids.shape), layers, 13)
    return routed, engine_routed, run_distributed(_body, 2, hf_dir, routed, engine_routed, timeout=900)


def test_replayed_routing_equals_hf_forced_to_the_same_experts(hf_dir, spawned):
    from vapo_megatron.models.hf_config import load_arch

    arch = load_arch(hf_dir)
    routed, _, results = spawned
    reference = _hf_forced_logits(hf_dir, routed)
    expected_counts = torch.stack([torch.bincount(routed[:, :, c].flatten(), minlength=E)
                                   for c in range(len(arch.moe_layers))]).double()
    for tp, sp, ep in LAYOUTS:
        for rank, r in enumerate(results):
            on, off = r[tp, True], r[tp, False]
            what = f"tp={tp} sp={sp} ep={ep} rank {rank}"
            torch.testing.assert_close(on["logits"], reference, atol=1e-5, rtol=0, msg=f"{what}: replay != HF")
            assert torch.equal(on["counts"], expected_counts), f"{what}: routers did not use the replayed experts"
            assert (off["logits"] - reference).abs().max() > 1e-3, f"{what}: own routing equals the forced one"


def _record_body(hf_dir: str, sequences: list[list[int]]) -> list[torch.Tensor]:
    from vapo_megatron.rollout.routing import record_routing
    from vapo_megatron.rollout.vllm_engine import RolloutEngine

    engine = RolloutEngine(hf_dir, tensor_parallel_size=1, seed=0, max_model_len=64)
    try:
        return record_routing(engine, sequences)
    finally:
        engine.shutdown()


def test_vllm_routing_is_recorded_per_token(hf_dir):
    """The experts recorded from vLLM for every position of two sequences are HF's own top-k for those tokens
    (as sets: the order within the top k is not part of the routing)."""
    from transformers import AutoModelForCausalLM

    sequences = [_ids()[0, :11].tolist(), _ids()[1].tolist()]
    recorded = run_distributed(_record_body, 1, hf_dir, sequences, timeout=600)[0]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for seq, rec in zip(sequences, recorded):
        hf_choice = []
        hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o, out=hf_choice: out.append(o[2]))
                 for layer in model.model.layers if hasattr(layer.mlp, "gate")]
        with torch.no_grad():
            model(torch.tensor([seq]))
        for h in hooks:
            h.remove()
        assert rec.shape == (len(seq), len(hf_choice), K)
        for column, choice in enumerate(hf_choice):
            assert torch.equal(rec[:, column].long().sort(-1).values, choice.sort(-1).values), \
                f"layer column {column}: vLLM's recorded experts differ from HF's"


def test_engine_replays_the_batch_routing_padded_and_packed(hf_dir, spawned):
    """ModelEngine with routing_replay: forward log-probs equal HF forced to the batch's `routed_experts`; the train
    step replays every real token in every MoE layer; without the switch the log-probs follow the model's own
    routing; a batch without `routed_experts` is refused."""
    from vapo_megatron.models.hf_config import load_arch

    arch = load_arch(hf_dir)
    _, routed, results = spawned
    batch = _rl_batch()
    logits = _hf_forced_logits(hf_dir, routed, batch.input_ids)
    token_logp = torch.log_softmax(logits, -1).gather(2, batch.targets[..., None])[..., 0]  # [n, S]
    reference = token_logp.gather(1, batch.resp_pos)  # [n, R]: response token j at prompt_len - 1 + j
    mask = batch.resp_mask.bool()
    real_tokens = int(batch.seq_lens.sum()) * len(arch.moe_layers)
    for rank, r in enumerate(results):
        for name in ("padded", "packed"):
            on, off = r["engine"][name, True], r["engine"][name, False]
            what = f"rank {rank}, {name}"
            torch.testing.assert_close(on["logprobs"][mask], reference[mask], atol=1e-5, rtol=0,
                                       msg=f"{what}: replayed log-probs != HF forced to the same experts")
            assert (off["logprobs"][mask] - reference[mask]).abs().max() > 1e-3, f"{what}: switch has no effect"
            assert on["metrics"]["policy/moe_replayed_tokens"] == real_tokens, (what, on["metrics"], real_tokens)
            assert on["metrics"]["policy/moe_replay_changed_frac"] > 0.2, (what, on["metrics"])
            assert "policy/moe_replayed_tokens" not in off["metrics"], what
            assert "no routed_experts" in (r["engine"][name, "refusal"] or ""), (what, r["engine"][name, "refusal"])
