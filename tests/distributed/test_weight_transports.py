"""Weight transports (rollout/transports/): the bucketed broadcast from one source rank to the other ranks of a
group delivers bit-identical tensors (float32 and bfloat16, buckets of several tensors and a tensor larger than
a bucket), records the policy version, and an interrupted push leaves every receiver's previous weights and
version in place. A failure pinpoints the transport (header, offsets, dtypes, session protocol), not the trainer's
gather (tests/distributed/test_weight_gather.py) nor vLLM (tests/unit/test_rollout_vllm_engine.py)."""
from __future__ import annotations

import pytest
import torch

from vapo_megatron.testing.dist import run_distributed

pytestmark = pytest.mark.distributed


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model.embed_tokens.weight": torch.randn(97, 64, generator=g),
            "model.layers.0.self_attn.q_proj.bias": torch.randn(64, generator=g),
            "model.layers.0.mlp.up_proj.weight": torch.randn(96, 64, generator=g).to(torch.bfloat16),
            "model.layers.0.input_layernorm.weight": torch.randn(3, generator=g),  # 12 bytes: offsets realign
            "model.norm.weight": torch.randn(64, generator=g).to(torch.bfloat16),
            "lm_head.weight": torch.randn(97, 64, generator=g)}


def _body(bucket_bytes: int):
    import torch.distributed as dist

    from vapo_megatron.rollout.transports.broadcast import BroadcastTransport
    from vapo_megatron.rollout.transports.memory import MemoryTransport
    from vapo_megatron.rollout.weight_sync import push_weights

    rank = dist.get_rank()
    sink = None if rank == 0 else MemoryTransport()
    transport = BroadcastTransport(dist.group.WORLD, src=0, receiver=sink)
    report = {}
    if rank == 0:
        report["stats"] = push_weights(transport, _weights(1).items(), bucket_bytes, version=7)

        def failing():
            yield from list(_weights(2).items())[:3]
            raise RuntimeError("trainer died mid-push")

        with pytest.raises(RuntimeError, match="mid-push"):
            push_weights(transport, failing(), bucket_bytes, version=8)
        return report
    report["first"] = transport.receive()
    first = dict(sink.weights), sink.version
    report["second"] = transport.receive()
    report["equal"] = sorted(first[0]) == sorted(_weights(1)) and all(
        t.dtype == _weights(1)[n].dtype and torch.equal(t, _weights(1)[n]) for n, t in first[0].items())
    report["versions"] = (first[1], sink.version)
    report["kept"] = sink.weights is first[0] or all(torch.equal(sink.weights[n], first[0][n]) for n in first[0])
    return report


@pytest.mark.parametrize("bucket_bytes", [4096, 1 << 20])
def test_broadcast_delivers_bit_identical_weights_and_versions(bucket_bytes):
    results = run_distributed(_body, 3, bucket_bytes, timeout=300)
    stats = results[0]["stats"]
    assert stats.version == 7 and stats.tensors == 6
    assert stats.buckets == (3 if bucket_bytes == 4096 else 1)  # 4 KiB: embed | bias + up | norms + head
    for r in results[1:]:
        version, nbytes, _ = r["first"]
        assert version == 7 and nbytes == stats.bytes
        assert r["equal"], "received tensors differ from the source's"
        assert r["second"] is None, "an interrupted push must be reported as incomplete"
        assert r["versions"] == (7, 7) and r["kept"], "an interrupted push replaced the receiver's weights"
