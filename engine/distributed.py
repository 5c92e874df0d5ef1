"""Process-group plumbing: who am I, joining the group, gathers without gradient, sums (nothing backend-specific).

Launchers (`deepspeed`, `torchrun`) set RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT;
without them the job is a single process and every collective here is the identity.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def context_from_env(local_rank_arg: int | None = None) -> DistContext:
    """Read the launcher's environment (`--local_rank` from the deepspeed launcher as fallback)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}; check the launcher's environment")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


def default_device(ctx: DistContext, requested: str = "auto") -> torch.device:
    """One accelerator per local rank when present, else the CPU."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        torch.cuda.set_device(ctx.local_rank)
        return torch.device("cuda", ctx.local_rank)
    return torch.device("cpu")


def init_process_group(ctx: DistContext, *, timeout_s: float = 600, even_for_one_rank: bool = False,
                       create: Callable[..., object] | None = None) -> None:
    """Join the job's process group (nccl on GPUs, gloo on CPU) once; no-op for one process unless
    `even_for_one_rank` (FSDP2 needs a group of one).

    A collective that waits `timeout_s` for another rank fails instead of hanging. `create(backend=...,
    timeout=...)` creates the group (default torch's `init_process_group`; DeepSpeed passes its own, which
    also sets up its communication layer). Every way of joining the group goes through here.
    """
    if dist.is_initialized() or not (ctx.distributed or even_for_one_rank):
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    (create or dist.init_process_group)(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("rank %d/%d joined process group (%s)", ctx.rank, ctx.world_size, backend)


def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank along dim 0 (equal shapes), without gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of `x` over ranks (a new tensor)."""
    out = x.detach().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` (picklable) on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def node_of_ranks(ctx: DistContext) -> list[int]:
    """The node index of every rank (collective when several ranks): what the launcher says, else hostnames.

    torchrun sets LOCAL_WORLD_SIZE and the deepspeed launcher LOCAL_SIZE: ranks are numbered node by
    node, so rank r is on node r // local_size. Without either, ranks that report the same host name
    share a node.
    """
    if not ctx.distributed:
        return [0]
    local_size = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
    if local_size and int(local_size) > 0:
        return [rank // int(local_size) for rank in range(ctx.world_size)]
    hosts = gather_objects(socket.gethostname())
    order = list(dict.fromkeys(hosts))
    return [order.index(host) for host in hosts]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
