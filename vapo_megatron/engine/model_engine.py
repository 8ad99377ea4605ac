"""One Megatron model role (policy or critic) as an engine: forward over a batch, optimizer steps over
mini-batches, HF-named weight export. Every method is collective over all ranks, runs inside the role's
parallel layout, and takes the whole batch (an `RLBatch`, the same on every rank) and returns whole-batch results:
each DP rank computes its slice, as micro-batches that derive their own `targets` and `resp_pos`, and the slices
are assembled back, so the policy and critic may use different TP/PP/DP layouts."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vapo_megatron import platform
from vapo_megatron.config import OptimConfig, VapoConfig
from vapo_megatron.data.packing import balanced_token_bins
from vapo_megatron.data.rl_batch import MicroBatch, RLBatch
from vapo_megatron.engine.build import HFGetter, build_model
from vapo_megatron.engine.export import iter_hf_tensors
from vapo_megatron.engine.microbatch import padded_and_real_tokens, split_micro_batches
from vapo_megatron.engine.objectives import Objective
from vapo_megatron.engine.optim import build_optimizer
from vapo_megatron.engine.schedule import forward_backward
from vapo_megatron.models.hf_config import ModelArch
from vapo_megatron.models.moe import RoutingCounter, RoutingReplay
from vapo_megatron.models.specs import transformer_engine_available
from vapo_megatron.parallel.layout import RoleLayouts

MicroOutput = Callable[[torch.Tensor, MicroBatch], torch.Tensor]

ENGINE_METRICS = ("grad_norm", "lr", "skipped", "padding_waste")
"""What `train_step` reports besides its objective's metrics (every role, every step)."""
MOE_METRICS = ("moe_tokens_per_expert_max", "moe_tokens_per_expert_mean", "moe_load_max_over_mean", "moe_aux_loss")
REPLAY_METRICS = ("moe_replayed_tokens", "moe_replay_changed_frac")


@dataclass(frozen=True)
class Execution:
    """How an engine runs its batches (the same for both roles): rows or a token budget per micro-batch, packing,
    activation recomputation, and the parameters' dtype."""

    micro_batch_size: int = 8
    micro_batch_tokens: int = 0
    pack_sequences: bool | None = None
    recompute: str = "none"
    recompute_num_layers: int = 1
    params_dtype: torch.dtype = torch.float32

    @classmethod
    def from_config(cls, cfg: VapoConfig) -> Execution:
        t = cfg.train
        return cls(micro_batch_size=t.micro_batch_size, micro_batch_tokens=t.micro_batch_tokens,
                   pack_sequences=t.pack_sequences, recompute=t.recompute, recompute_num_layers=t.recompute_num_layers,
                   params_dtype=torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32)


def packing_enabled(requested: bool | None, params_dtype: torch.dtype, te_attention: bool) -> bool:
    """Whether the engine packs (train.pack_sequences: None = wherever supported, True = required, False = off).
    Unsupported: TransformerEngine takes THD batches only in its flash and fused attention backends (its unfused
    attention refuses "thd"), which need bf16 or fp16. The local attention (models/thd_attention.py, used
    without TE) packs in any dtype."""
    supported = not (te_attention and params_dtype == torch.float32)
    if requested and not supported:
        raise ValueError("train.pack_sequences=true with model.dtype float32 and TransformerEngine: TE's THD "
                         "attention runs only in its flash/fused backends, which need bfloat16 or float16; set "
                         "model.dtype=bfloat16, or train.pack_sequences=null (pack where supported) or false")
    return supported if requested is None else requested


class ModelEngine:
    """One role's model, optimizer and batching. `optim` and `execution` are typed config pieces; `hf_get`
    streams the initial weights (HF tensor name -> tensor); `routing_replay` (MoE policy) makes every forward use
    the batch's `routed_experts`."""

    def __init__(self, role: str, arch: ModelArch, layouts: RoleLayouts, optim: OptimConfig, execution: Execution,
                 hf_get: HFGetter, routing_replay: bool = False):
        parallel, ex = layouts.configs[role], execution
        self.role, self.arch, self.parallel, self.layouts = role, arch, parallel, layouts
        self.optim, self.execution = optim, ex
        self.steps_taken = 0
        self.pack_sequences = packing_enabled(ex.pack_sequences, ex.params_dtype, transformer_engine_available())
        # padded rows: multiples of seq_multiple(); a packed stream needs only what SP and CP split (tp x 2cp)
        self.pad_multiple = parallel.tp * (2 * parallel.cp if parallel.cp > 1 else 1) if self.pack_sequences else \
            parallel.seq_multiple()
        self.groups = layouts.groups[role]
        if routing_replay and not arch.is_moe:
            raise ValueError(f"{role}: routing replay needs a mixture-of-experts model")
        replay_kwargs = {"moe_enable_routing_replay": True} if routing_replay else {}
        self.built = build_model(arch, parallel, role, hf_get=hf_get, params_dtype=ex.params_dtype,
                                 use_distributed_optimizer=optim.use_distributed_optimizer, recompute=ex.recompute,
                                 recompute_num_layers=ex.recompute_num_layers, groups=self.groups, **replay_kwargs)
        self.optimizer = build_optimizer(self.built.model, lr=optim.lr, weight_decay=optim.weight_decay,
                                         clip_grad=optim.clip_grad, adam_beta1=optim.adam_beta1,
                                         adam_beta2=optim.adam_beta2, bf16=ex.params_dtype == torch.bfloat16,
                                         use_distributed_optimizer=optim.use_distributed_optimizer, groups=self.groups)
        # token or packed micro-batches differ in length: pipeline stages then send each activation's shape first
        self.built.config.variable_seq_lengths = ex.micro_batch_tokens > 0 or self.pack_sequences
        self.routing = self.replay = None
        if arch.is_moe:
            stage_layers = range(self.groups.pp_rank * arch.num_layers // parallel.pp,
                                 (self.groups.pp_rank + 1) * arch.num_layers // parallel.pp)
            local_moe = [i for i in stage_layers if arch.is_moe_layer(i)]
            self.routing = RoutingCounter(self.model, local_moe, arch.num_experts, platform.device())
            # routing replay: every forward routes each token to the batch's `routed_experts` (vLLM's choice)
            self.replay = RoutingReplay(self.model, local_moe, arch.moe_layers) if routing_replay else None

    def metric_names(self, objective: Objective) -> tuple[str, ...]:
        """The keys `train_step(batch, objective)` returns: the objective's metrics, then the engine's, each
        prefixed with the role (`policy/pg_loss`, `critic/grad_norm`)."""
        own = ENGINE_METRICS + (MOE_METRICS if self.routing is not None else ()) + \
            (REPLAY_METRICS if self.replay is not None else ())
        return tuple(f"{self.role}/{k}" for k in (*objective.metric_names, *own))

    @property
    def model(self) -> torch.nn.Module:
        return self.built.model

    # ---- layout helpers -----------------------------------------------------------------------------------
    def _dp_bounds(self, n: int) -> tuple[int, int]:
        dp, rank = self.groups.dp_size, self.groups.dp_rank
        if n % dp:
            raise ValueError(f"{self.role}: batch of {n} samples does not split over data-parallel size {dp}")
        per = n // dp
        return rank * per, (rank + 1) * per

    def _micro_batches(self, batch: RLBatch) -> tuple[list[MicroBatch], list[list[int]], int, int]:
        """This DP rank's micro-batches, the local rows each holds, and the rank's [start, stop) of the batch."""
        if not isinstance(batch, RLBatch):
            raise TypeError(f"{self.role} engine: takes an RLBatch (RLBatch.from_tensors builds one), got "
                            f"{type(batch).__name__}")
        ex = self.execution
        start, stop = self._dp_bounds(batch.n)
        bins = None
        if self.pack_sequences and ex.micro_batch_tokens > 0:
            # the same number of micro-batches on every DP rank; each rank computes every slice's bins itself
            bins = balanced_token_bins(batch.seq_lens.tolist(), ex.micro_batch_tokens,
                                       self.groups.dp_size)[self.groups.dp_rank]
        micro, rows = split_micro_batches(batch.rows(slice(start, stop)), micro_batch_size=ex.micro_batch_size,
                                          micro_batch_tokens=ex.micro_batch_tokens,
                                          pad_multiple=self.pad_multiple, pack=self.pack_sequences,
                                          cp=self.parallel.cp, rows=bins)
        if self.replay is not None and any(mb.routed_experts is None for mb in micro):
            raise ValueError(f"{self.role}: routing replay is on, but the batch has no routed_experts (the experts "
                             "vLLM chose, rollout/routing.py record_routing_distributed)")
        dev = platform.device()
        micro = [mb.to(dev, non_blocking=True) for mb in micro]
        return micro, rows, start, stop

    def _is_reporter(self) -> bool:
        """One rank per DP rank reports outputs and metrics: CP ranks hold the same whole-sequence results."""
        g = self.groups
        return g.is_last_stage and g.tp_rank == 0 and g.cp_rank == 0

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(self, batch: RLBatch, output_fn: MicroOutput) -> torch.Tensor:
        """`output_fn(model_output, micro_batch) -> [m, R]` per micro-batch: one value per response slot (R =
        `batch.resp_mask.shape[1]`, as `response_logprobs` / `response_values` give). Returns the whole-batch
        result [n, R] (float32) on every rank.

        The shape comes from the batch, so no collective asks for it. The one collective is the assembly: each
        DP rank's reporting rank (last stage, TP rank 0, CP rank 0) writes its rows into a zero [n, R] tensor and
        one all-reduce over all ranks sums them (adding zeros is exact)."""
        n, width = batch.resp_mask.shape
        full = torch.zeros((n, width), dtype=torch.float32, device=platform.device())
        with self.groups.rng(), torch.no_grad():
            micro, rows, start, stop = self._micro_batches(batch)
            outs = forward_backward(self.model, micro, None, forward_only=True, output_fn=output_fn,
                                    groups=self.groups, routing_replay=self.replay)
            if outs and self._is_reporter():  # back into row order (token micro-batches are sorted by length)
                order = torch.tensor([start + i for r in rows for i in r], device=full.device)
                full[order] = torch.cat(outs).float()
        dist.all_reduce(full)
        return full.to(batch.input_ids.device)

    # ---- training -----------------------------------------------------------------------------------------
    def train_step(self, batch: RLBatch, objective: Objective) -> dict[str, float]:
        """One optimizer step over `batch` (a whole mini-batch; the objective's losses are normalised by its
        global counts). Returns `metric_names(objective)`, the same keys on every rank and every step: the
        objective's metrics summed over micro-batches and DP ranks, `grad_norm`, `lr`, `skipped` (1 when the loss
        or gradient norm was not finite and no update was applied), `padding_waste` (fraction of computed token
        slots that are padding, over all DP ranks) and the router's metrics of a MoE model."""
        self._set_lr()
        names = objective.metric_names
        with self.groups.rng():
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            micro, _, _, _ = self._micro_batches(batch)
            if self.routing is not None:
                self.routing.reset()
                self.routing.active = True
            stats = forward_backward(self.model, micro, objective, groups=self.groups, routing_replay=self.replay)
            if self.routing is not None:
                self.routing.active = False
            padded, real = padded_and_real_tokens(micro)
            totals = self._reduce_metrics(stats, names, [padded, real])
            finite = torch.tensor([1.0 if all(math.isfinite(v) for v in totals[:len(names)]) else 0.0],
                                  device=platform.device())
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            grad_norm = float("nan")
            if finite.item() == 1.0:
                ok, grad_norm, _ = self.optimizer.step()
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
                finite[0] = 1.0 if ok and math.isfinite(grad_norm) else 0.0
            self.steps_taken += int(finite.item())
        padded, real = totals[len(names):]
        metrics = dict(zip(names, totals[:len(names)]))
        metrics.update(grad_norm=grad_norm, lr=self._lr(), skipped=1.0 - finite.item(),
                       padding_waste=1.0 - real / padded if padded else 0.0)
        if self.routing is not None:
            metrics.update(self._routing_metrics())
        return {f"{self.role}/{k}": v for k, v in metrics.items()}

    def _routing_metrics(self) -> dict[str, float]:
        """Router metrics of the last train_step (MoE): tokens routed to each expert, summed over all ranks (with
        MoE, TP implies sequence parallelism, so TP, CP and DP ranks see different tokens and each token is
        counted once per layer), then the max and the mean over experts, averaged over MoE layers; the worst
        layer's max / mean; and the load-balancing loss before its coefficient, averaged over micro-batches,
        ranks and layers (computed on each rank's tokens: models/moe.py RoutingCounter). With routing replay:
        `moe_replayed_tokens`, the real tokens that used the recorded experts, summed over MoE layers (the
        mini-batch's prompt + response tokens x MoE layers when replay works), and `moe_replay_changed_frac`,
        the replayed (token, expert) choices the router's own top-k would not have made."""
        r, arch = self.routing, self.arch
        counts = torch.zeros(len(arch.moe_layers), arch.num_experts, dtype=torch.float64, device=r.counts.device)
        for local, layer in enumerate(r.layer_ids):
            counts[arch.moe_layers.index(layer)] = r.counts[local]
        aux = torch.stack([r.aux_sum, torch.tensor(float(r.aux_n), dtype=torch.float64, device=r.counts.device)])
        packed = torch.cat([counts.flatten(), aux, r.replay])
        dist.all_reduce(packed)
        counts, (aux_sum, aux_n) = packed[:-4].view_as(counts).cpu(), packed[-4:-2].tolist()
        replayed, differs = packed[-2:].tolist()
        per_layer_max, per_layer_mean = counts.max(1).values, counts.mean(1)
        out = {"moe_tokens_per_expert_max": per_layer_max.mean().item(),
               "moe_tokens_per_expert_mean": per_layer_mean.mean().item(),
               "moe_load_max_over_mean": (per_layer_max / per_layer_mean.clamp_min(1e-12)).max().item(),
               "moe_aux_loss": aux_sum / max(aux_n, 1.0)}
        if self.replay is not None:  # the tokens that used the recorded experts, and how many choices they changed
            out["moe_replayed_tokens"] = replayed
            out["moe_replay_changed_frac"] = differs / max(replayed * arch.moe_topk, 1.0)
        return out

    def _reduce_metrics(self, stats: list[dict], names: tuple[str, ...], per_rank: list[float]) -> list[float]:
        """The metrics `names` (already globally normalised) summed over micro-batches and DP ranks, then the
        `per_rank` numbers summed over DP ranks: the reporting ranks contribute, everyone receives. The names are
        the objective's schema, known on every rank, so one all-reduce of numbers is the only collective."""
        vec = torch.zeros(len(names) + len(per_rank), dtype=torch.float64)
        if self._is_reporter():
            for s in stats:
                vec[:len(names)] += torch.stack([s[k].detach().double().reshape(()).cpu() for k in names])
            vec[len(names):] += torch.tensor(per_rank, dtype=torch.float64)
        vec = vec.to(platform.device())  # NCCL reduces device tensors only
        dist.all_reduce(vec)
        return vec.tolist()

    def _lr(self) -> float:
        warmup, lr = self.optim.warmup_steps, self.optim.lr
        if warmup > 0 and self.steps_taken < warmup:
            return lr * (self.steps_taken + 1) / warmup
        return lr

    def _set_lr(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()

    def param_norm(self) -> float:
        """Global L2 norm of the parameters, each counted once over TP/PP (DP replicas are equal); collective."""
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        with torch.no_grad():
            sq = [torch.zeros(1, dtype=torch.float64, device=platform.device()) for _ in range(2)]  # dense, expert
            for p in self.model.parameters():
                expert = not getattr(p, "allreduce", True)  # megatron's tag of expert parameters
                if expert or param_is_not_tensor_parallel_duplicate(p, tp_group=self.groups.pg.tp):
                    sq[int(expert)] += p.detach().double().pow(2).sum()
            dist.all_reduce(sq[0], group=self.groups.pg.mp)
            if self.arch.is_moe:  # experts are spread over the expert-TP x EP x PP ranks, not over TP x PP
                dist.all_reduce(sq[1], group=self.groups.pg.tp_ep_pp)
        return math.sqrt(sq[0].item() + sq[1].item())

    # ---- weights ------------------------------------------------------------------------------------------
    def iter_hf_tensors(self):
        """HF-named whole tensors (collective generator: every rank consumes it in lockstep). It holds the
        role's process groups itself, so vLLM may run between its items."""
        return iter_hf_tensors(self.model, self.arch, self.role, groups=self.groups)
