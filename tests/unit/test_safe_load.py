"""Checkpoint files do not run code when loaded: a crafted pickle whose __reduce__ writes a marker file is refused
(marker absent) in trainer_state.pt, in a torch_dist .metadata file and in a torch_dist byte object (_extra_state).
Each case first shows that torch's own loading would run it, so the test can fail. A failure pinpoints
convert/safe_load.py or a torch.load in engine/checkpoint.py without weights_only."""
from __future__ import annotations

import io
import os
import random

import pytest
import torch
import torch.distributed.checkpoint as dcp

from vapo_megatron.convert.safe_load import load_torch_file, restricted_dcp_load
from vapo_megatron.engine.checkpoint import capture_rng_state, restore_rng_state
from vapo_megatron.errors import UnsafeCheckpointError


class Malicious:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_trainer_state_with_code_is_refused(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "trainer_state.pt"
    torch.save({"step": 3, "x": Malicious(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="trust_checkpoints"):
        load_torch_file(path)
    assert not marker.exists(), "loading trainer_state.pt ran code"
    load_torch_file(path, trust=True)  # what torch.load(weights_only=False) did before: the code runs
    assert marker.exists()


def test_rng_and_trainer_state_load_with_weights_only(tmp_path):
    """The files the trainer writes hold only tensors and plain values (numpy's state included)."""
    np = pytest.importorskip("numpy")
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(load_torch_file(tmp_path / "rng.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


class _RawBytesPlanner(dcp.DefaultSavePlanner):
    """Writes a BytesIO's content as is, as megatron-core's MCoreSavePlanner does for its ShardedObjects (which
    are torch.save'd into the BytesIO): the stored bytes are then a pickle torch.load reads on load."""

    def transform_object(self, write_item, object):
        return object


def _save_dcp(path, obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    dcp.save({"weight": torch.arange(4.0), "extra": buf}, checkpoint_id=str(path), no_dist=True,
             planner=_RawBytesPlanner())


def test_torch_dist_byte_object_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _save_dcp(tmp_path / "ckpt", [Malicious(marker)])
    target = {"weight": torch.zeros(4), "extra": io.BytesIO()}
    with pytest.raises(UnsafeCheckpointError, match="extra"), restricted_dcp_load():
        dcp.load(target, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    assert not marker.exists(), "a torch_dist _extra_state ran code"
    dcp.load(target, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)  # torch's own loading runs it
    assert marker.exists()


def test_torch_dist_metadata_with_code_is_refused_and_a_clean_one_loads(tmp_path):
    clean = {"weight": torch.zeros(4), "extra": io.BytesIO()}
    _save_dcp(tmp_path / "ckpt", [{"note": "plain", "step": torch.tensor(3.0)}])
    with restricted_dcp_load():
        dcp.load(clean, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    assert torch.equal(clean["weight"], torch.arange(4.0))

    marker = tmp_path / "pwned"
    import pickle

    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(Malicious(marker)))
    with pytest.raises(UnsafeCheckpointError, match="os.system|posix.system"), restricted_dcp_load():
        dcp.load({"weight": torch.zeros(4)}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    assert not marker.exists(), "a torch_dist .metadata file ran code"


def test_truncated_metadata_is_damaged_not_unsafe(tmp_path):
    """Issue 23: a truncated .metadata was reported as an unsafe pickle with advice to trust the checkpoint."""
    from vapo_megatron.errors import CheckpointError

    _save_dcp(tmp_path / "ckpt", [{"note": "plain"}])
    meta = tmp_path / "ckpt" / ".metadata"
    os.truncate(meta, meta.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="is damaged: it does not unpickle") as info, restricted_dcp_load():
        dcp.load({"weight": torch.zeros(4)}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    assert "trust_checkpoints" not in str(info.value)


@pytest.mark.parametrize("force", ["1", None])
def test_legacy_common_pt_never_runs_even_when_torch_is_told_to_unpickle(tmp_path, monkeypatch, force):
    """Issue 23: megatron-core's loader reads a legacy common.pt with torch.load and no weights_only, so with
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 a planted one ran its code. Inside restricted_dcp_load it is loaded
    weights_only=True, whatever the environment says; outside, megatron's own call runs it (shown first)."""
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    _save_dcp(tmp_path / "ckpt", [{"note": "plain"}])
    (tmp_path / "ckpt" / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1, '
                                                     '"common_backend": "torch", "common_backend_version": 1}')
    marker = tmp_path / "pwned"
    torch.save({"args": Malicious(marker)}, tmp_path / "ckpt" / "common.pt")
    if force:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", force)
        load_common_state_dict(str(tmp_path / "ckpt"))  # megatron's own loading
        assert marker.exists(), "the probe is not real: megatron's loader did not run the planted pickle"
        marker.unlink()
    with pytest.raises(UnsafeCheckpointError, match="common.pt"), restricted_dcp_load():
        load_common_state_dict(str(tmp_path / "ckpt"))
    assert not marker.exists(), "a planted common.pt ran code"
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") == force, "the environment was not restored"
