"""Separate placement: split one torchrun world into a trainer pool and a rollout pool (docs/async.md).

    pools = split_world(cfg)      # after init_distributed(); collective over the whole world
    if pools.role == "rollout": serve_rollouts(cfg, pools)   # rollout/async_pool.py
    else: Trainer(cfg, pools=pools).run()

The first `world - rollout_ranks` ranks train (megatron-core: policy and critic), the last `rollout_ranks` run
only vLLM. megatron-core's `initialize_model_parallel` and vLLM's external launcher both build their groups on
the default process group's whole world, so each pool gets a default process group of its own: the world group
is replaced, on every rank, by its pool's (same store, a prefix per pool), and RANK / WORLD_SIZE / LOCAL_RANK are
rewritten to the pool's numbers for vLLM. The pools talk over one `BridgeChannel` (rollout/channel.py) between
trainer rank 0 and every rollout rank; the other trainer ranks are not in it.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch.distributed as dist

from vapo_megatron.config import VapoConfig
from vapo_megatron.config_checks import pool_sizes
from vapo_megatron.rollout.channel import BridgeChannel


@dataclass
class Pools:
    """This rank's side of separate placement."""

    role: str                 # "trainer" or "rollout"
    world_rank: int           # rank in the torchrun world
    world_size: int
    trainer_ranks: int        # world ranks 0..trainer_ranks-1 train
    rollout_ranks: int        # the rest run vLLM
    bridge: BridgeChannel | None   # trainer rank 0 and the rollout ranks; None on the other trainer ranks

    @property
    def pool_rank(self) -> int:
        return self.world_rank if self.role == "trainer" else self.world_rank - self.trainer_ranks


def _bridge_names(trainer_ranks: int, rollout_ranks: int) -> list[str]:
    return ["trainer rank 0"] + [f"rollout rank {trainer_ranks + i} (world)" for i in range(rollout_ranks)]


def split_world(cfg: VapoConfig) -> Pools:
    """Replace the initialised world process group by this rank's pool's, and connect the bridge. Collective over
    the world; afterwards `dist.get_world_size()` is the pool's size everywhere."""
    from vapo_megatron import platform
    from vapo_megatron.platform import free_port

    rank, world = dist.get_rank(), dist.get_world_size()
    trainers, rollouts = pool_sizes(cfg, world)
    box = [free_port() if rank == 0 else None]  # a port for the pools' store, chosen where it will listen
    dist.broadcast_object_list(box, src=0)
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    timeout = datetime.timedelta(seconds=cfg.rollout.rollout_timeout_s)
    store = dist.TCPStore(host, box[0], world, is_master=rank == 0, timeout=timeout)
    dist.barrier()
    dist.destroy_process_group()
    role = "trainer" if rank < trainers else "rollout"
    pool_rank, pool_size = (rank, trainers) if role == "trainer" else (rank - trainers, rollouts)
    single_host = int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world
    os.environ.update(RANK=str(pool_rank), WORLD_SIZE=str(pool_size), LOCAL_WORLD_SIZE=str(pool_size)
                      if single_host else os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if single_host:  # several hosts: each pool starts on a host boundary, LOCAL_RANK stays
        os.environ["LOCAL_RANK"] = str(pool_rank)
    dist.init_process_group(platform.dist_backend(), store=dist.PrefixStore(f"vapo_pool_{role}", store),
                            rank=pool_rank, world_size=pool_size, timeout=timeout)
    bridge = None
    if rank == 0 or role == "rollout":
        bridge = BridgeChannel(store, 0 if rank == 0 else 1 + pool_rank, 1 + rollouts, cfg.rollout.rollout_timeout_s,
                               _bridge_names(trainers, rollouts))
    pools = Pools(role, rank, world, trainers, rollouts, bridge)
    pools._store = store  # keep the store (rank 0 serves it) alive as long as the pools
    return pools
