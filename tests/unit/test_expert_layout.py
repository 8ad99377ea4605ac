"""engine/optim_resume.py `check_expert_layout`: which mixture-of-experts checkpoints may be resumed at any EP.

A failure pinpoints the test for the optimizer form of a checkpoint: every checkpoint whose experts have their own
optimizer (meta.json `expert_optimizer`, or saved at EP > 1 / expert TP != TP by earlier versions) loads at any EP;
an earlier version's EP=1 checkpoint (one optimizer for all parameters) is refused with one message, before
anything loads. The resume itself is tests/e2e/test_resume_layouts.py `test_resume_moe_ep1_to_ep2`."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from vapo_megatron.engine.optim_resume import check_expert_layout
from vapo_megatron.errors import CheckpointError


def _engines(is_moe: bool, ep: int) -> dict:
    return {"policy": SimpleNamespace(arch=SimpleNamespace(is_moe=is_moe), parallel=SimpleNamespace(ep=ep, etp=1))}


def _meta(**saved) -> dict:
    return {"roles": {"policy": {"tp": 1, "etp": 1, **saved}}}


@pytest.mark.parametrize("saved", [dict(ep=1, expert_optimizer=True), dict(ep=2, expert_optimizer=True),
                                   dict(ep=2), dict(ep=1, tp=2, etp=1), {}])
def test_checkpoints_with_an_expert_optimizer_load_at_any_ep(saved):
    for ep in (1, 2):
        check_expert_layout("ckpt", _meta(**saved), _engines(True, ep))


def test_an_earlier_single_optimizer_checkpoint_is_refused():
    for ep in (1, 2):
        with pytest.raises(CheckpointError, match=r"earlier version \(one optimizer for dense and expert parameters "
                                                  r"at ep=1, etp=1\)"):
            check_expert_layout("ckpt", _meta(ep=1), _engines(True, ep))
    check_expert_layout("ckpt", _meta(ep=1), _engines(False, 2))  # a dense role has one optimizer at any layout
