"""Process-group handling for ``torchrun``: DistributedDataParallel on gloo (CPU) or nccl (CUDA).

Launched with ``torchrun --nproc_per_node N``, every process trains on its shard of each
epoch (a :class:`~torch.utils.data.distributed.DistributedSampler`) and gradients are
averaged; only rank 0 writes files. Without ``torchrun`` nothing here does anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import RSDError, option


@dataclass(frozen=True)
class Context:
    """Where this process runs: its rank among ``world_size`` processes, and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(choice: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RSDError(f"{option('device')} cuda: no CUDA device is available here (use {option('device')} cpu)")
    return torch.device(choice)


def setup(device_choice: str) -> Context:
    """Join the process group ``torchrun`` describes (if any) and pick this process's device."""
    device = resolve_device(device_choice)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context(0, 1, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(dist.get_rank(), dist.get_world_size(), device)


def teardown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(ctx: Context, t: Tensor) -> Tensor:
    """Sum of ``t`` over all processes (``t`` itself when not distributed)."""
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(ctx: Context, model: nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics).

    DDP averages gradients, so parameters agree on every rank, but each rank's BN
    statistics follow its own shard; this makes the saved model the same everywhere.
    """
    if ctx.distributed:
        for buf in model.buffers():
            dist.broadcast(buf, 0)


def wrap(ctx: Context, module: nn.Module) -> nn.Module:
    """``module`` in DistributedDataParallel when distributed (its forward is the whole step)."""
    if not ctx.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)
