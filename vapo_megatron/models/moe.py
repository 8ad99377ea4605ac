"""Mixture-of-experts helpers on a built megatron model: its routers, the scale of their load-balancing loss,
and the routing counts the trainer reports.

The load-balancing loss. megatron's router attaches it to the routing probabilities (`MoEAuxLossAutoScaler`), so
its gradient is added in backward whatever the main loss is, scaled by `config.moe_grad_scale_func()`. This
project sums gradients over micro-batches and DP ranks (engine/schedule.py), and megatron's per-token-loss mode
(which that convention uses) would multiply the aux loss by the micro-batch's token count, expecting a division
by the global token count afterwards that this project does not do. So `prepare_routers` turns the router's
token factor off and `aux_loss_scale(M, dp)` = 1 / (M * dp) makes the summed gradient that of the aux loss
averaged over the M micro-batches and dp data-parallel ranks, megatron's own default (not per-token) scaling.
"""
from __future__ import annotations

import torch


def routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The TopKRouter of every MoE layer of this rank's model (through DDP wrappers), in layer order."""
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in model.modules() if isinstance(m, TopKRouter)]


def prepare_routers(model: torch.nn.Module) -> None:
    """Drop the router's per-token factor on the aux loss (module docstring); call once after building."""
    for router in routers(model):
        router.calculate_per_token_loss = False


def aux_loss_scale(num_micro_batches: int, dp_size: int) -> float:
    """The backward scale of the aux loss for one forward_backward call (module docstring)."""
    return 1.0 / (num_micro_batches * dp_size)


class RoutingCounter:
    """Counts, per MoE layer of this rank, the tokens routed to each expert (from the router's routing map), and
    the load-balancing loss `E/k * sum_e f_e * P_e` of each routed micro-batch (before its coefficient; computed
    on this rank's tokens), while `active`. A forward hook on each router: it reads the router's outputs and
    recomputes the softmax of its logits without gradient, changing nothing the model computes."""

    def __init__(self, model: torch.nn.Module, layer_ids: list[int], num_experts: int, device="cpu"):
        self.layer_ids = layer_ids  # global layer index of each local router
        self.num_experts, self.device = num_experts, device
        self.active = False
        self.reset()
        self._hooks = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(routers(model))]

    def reset(self) -> None:
        """Zero the counts; they stay on the device (no host sync per micro-batch)."""
        self.counts = torch.zeros(len(self.layer_ids), self.num_experts, dtype=torch.float64, device=self.device)
        self.aux_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.aux_n = 0

    def _hook(self, i: int):
        def hook(router, inputs, outputs):
            if not self.active:
                return
            _, routing_map = outputs
            with torch.no_grad():
                counts = routing_map.sum(0).to(self.counts)
                self.counts[i] += counts
                logits = torch.nn.functional.linear(inputs[0].reshape(-1, router.weight.shape[1]).float(),
                                                    router.weight.float())
                mean_prob = torch.softmax(logits, -1).mean(0).to(self.counts)
                frac = counts / counts.sum().clamp_min(1)
                self.aux_sum += self.num_experts * (frac * mean_prob).sum()  # = E/k sum f_e P_e with f per slot
                self.aux_n += 1
        return hook
