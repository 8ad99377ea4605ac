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


def tag_expert_parameters(model: torch.nn.Module) -> None:
    """Tag every routed expert's parameters as expert-parallel (`allreduce = False`, megatron's tag) at any EP;
    call before the DDP wrapper, which reads it.

    Why: megatron tags them only when they are expert-parallel (EP > 1 or expert TP != TP;
    tensor_parallel/layers.py `use_expert_pgs`), and `get_megatron_optimizer` gives tagged parameters an optimizer
    of their own (a ChainedOptimizer: dense, experts). Untagged at EP = 1, the experts shared the dense optimizer,
    whose checkpoint has other keys (no `chained_<i>.` prefix) and other parameter groups, so a checkpoint could
    not be resumed at another EP. Tagged at every EP, the optimizer has the same two parts at any layout and
    dist_checkpointing reshards the expert state like the weights. The maths at EP = 1 is the same: the expert
    gradients are then reduced over the expert-DP group, which at EP = 1 and expert TP = TP has the ranks of the
    DP x CP group, with the same 1/dp scaling; Adam is per parameter; and the clip norm sums both parts' squares
    (the same grads, in another order: float rounding only)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        for p in layer.experts.parameters():
            p.allreduce = False


def aux_loss_scale(num_micro_batches: int, dp_size: int) -> float:
    """The backward scale of the aux loss for one forward_backward call (module docstring)."""
    return 1.0 / (num_micro_batches * dp_size)


def load_balancing_loss(counts: torch.Tensor, mean_prob: torch.Tensor) -> torch.Tensor:
    """The switch load-balancing loss before its coefficient, `E * sum_e f_e * P_e`: `counts` [E] routed slots per
    expert (f_e = counts_e / sum(counts), i.e. per token x top-k slot), `mean_prob` [E] the router's softmax
    probability of each expert averaged over the tokens. megatron's `switch_load_balancing_loss_func` with
    coefficient 1 (tests/unit/test_moe_metrics.py)."""
    frac = counts / counts.sum().clamp_min(1)
    return counts.numel() * (frac * mean_prob).sum()


class RoutingCounter:
    """Counts, per MoE layer of this rank, the tokens routed to each expert (from the router's routing map), and
    the load-balancing loss `E/k * sum_e f_e * P_e` of each routed micro-batch (before its coefficient; computed
    on this rank's tokens), while `active`. With routing replay it also counts the real (not padding) tokens that
    were replayed, and the replayed (token, expert) choices of those that the router's own top-k would not have
    made (the rollout/trainer routing mismatch that replay removes). A forward hook on each router: it reads the
    router's outputs and recomputes its logits without gradient, changing nothing the model computes."""

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
        # replayed real tokens, their replayed choices outside the router's own top-k (summed over layers)
        self.replay = torch.zeros(2, dtype=torch.float64, device=self.device)

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
                self.aux_sum += load_balancing_loss(counts, mean_prob)
                self.aux_n += 1
                replay = getattr(router, "router_replay", None)
                if replay is not None and replay.router_replay_action is not None:
                    real = replay.vapo_real_tokens.to(routing_map.device)  # RoutingReplay.set
                    own = torch.zeros_like(routing_map).scatter_(1, logits.topk(router.topk, -1).indices, True)
                    self.replay[0] += real.sum()
                    self.replay[1] += (routing_map & ~own)[real].sum()
        return hook


class RoutingReplay:
    """Makes this rank's routers use given expert choices instead of their own top-k: megatron-core's
    `RouterReplay` (built when the config has `moe_enable_routing_replay`), driven per router instance rather
    than through its process-wide list, which would mix the policy's and the critic's routers.

    `set(routed, seq_slice)` before a micro-batch's forward: `routed` [b, S, num_moe_layers, k] holds, for each
    token of the micro-batch and each MoE layer of the model (in `arch.moe_layers` order), the global ids of the
    experts to use; `seq_slice` the positions this rank's routers see (its sequence-parallel shard); `real` [b, S]
    bool, the positions that hold real tokens (None: all), for RoutingCounter's replay counts. The router then
    takes the softmax scores of exactly those experts (megatron's `REPLAY_FORWARD`); the load-balancing loss
    still uses the router's own top-k. `set(None, ...)` routes normally."""

    def __init__(self, model: torch.nn.Module, layer_ids: list[int], moe_layers: tuple[int, ...]):
        self.routers = routers(model)
        if any(r.router_replay is None for r in self.routers):
            raise ValueError("routing replay needs the model built with moe_enable_routing_replay=True")
        self.columns = [moe_layers.index(layer) for layer in layer_ids]

    def set(self, routed: torch.Tensor | None, seq_slice: slice = slice(None),
            real: torch.Tensor | None = None) -> None:
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        for router, column in zip(self.routers, self.columns):
            replay = router.router_replay
            replay.clear_indices()
            if routed is None:
                replay.clear_router_replay_action()
                continue
            # megatron's token order is [S, b] flattened (sequence-major)
            chosen = routed[:, seq_slice, column, :].transpose(0, 1).reshape(-1, routed.shape[-1])
            replay.set_target_indices(chosen.long())
            mask = torch.ones(routed.shape[:2], dtype=torch.bool) if real is None else real
            replay.vapo_real_tokens = mask[:, seq_slice].transpose(0, 1).reshape(-1)
            replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
