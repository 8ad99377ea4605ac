"""The bridge between the pools of separate placement (rollout/channel.py): which process group carries a
tensor. Messages and CPU weights go over gloo; a tensor on any other device than the bridge's weights device is
refused with both devices named, before any collective (a mismatch would hang both ends). The NCCL group itself
needs two GPUs (tests/gpu has none yet). A failure pinpoints `BridgeChannel.broadcast` or `tensor_backend`."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from vapo_megatron.rollout.channel import BridgeChannel, tensor_backend


@pytest.fixture
def bridge():
    return BridgeChannel(dist.HashStore(), 0, 1, 30.0, ["trainer rank 0"])


def test_a_cpu_machine_bridges_weights_over_gloo(bridge):
    assert tensor_backend(False) == "gloo"
    assert bridge.device == torch.device("cpu") and bridge.tensor_pg is bridge.pg
    t = torch.arange(5.0)
    bridge.broadcast(t, 0)
    assert torch.equal(t, torch.arange(5.0))
    assert bridge.broadcast_object({"v": 3}, 0) == {"v": 3}


def test_a_tensor_on_another_device_is_refused(bridge):
    with pytest.raises(ValueError, match="meta.*cannot cross this bridge.*weights on cpu"):
        bridge.broadcast(torch.empty(3, device="meta"), 0)
