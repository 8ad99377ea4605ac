"""The router metric `moe_aux_loss` (models/moe.py load_balancing_loss, what RoutingCounter sums per micro-batch)
is megatron-core's own switch load-balancing loss with coefficient 1, for top-k routing of random logits at several
expert counts and k, balanced and skewed. A failure pinpoints a missing 1/k (per token instead of per slot) or a
mean taken over the wrong axis."""
from __future__ import annotations

import pytest
import torch

from vapo_megatron.models.moe import load_balancing_loss


@pytest.mark.parametrize("tokens, experts, k, skew", [(64, 4, 2, 0.0), (50, 8, 2, 3.0), (37, 6, 3, 1.0),
                                                      (128, 16, 1, 2.0)])
def test_aux_loss_metric_equals_megatrons_switch_loss(tokens, experts, k, skew):
    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func

    g = torch.Generator().manual_seed(tokens + experts)
    logits = torch.randn(tokens, experts, generator=g, dtype=torch.float64) + skew * torch.linspace(0, 1, experts,
                                                                                                   dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    routing_map = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, probs.topk(k, -1).indices, True)
    counts = routing_map.sum(0).double()
    reference = switch_load_balancing_loss_func(probs, counts, tokens, k, experts, 1.0)
    torch.testing.assert_close(load_balancing_loss(counts, probs.mean(0)), reference, rtol=1e-12, atol=0)
