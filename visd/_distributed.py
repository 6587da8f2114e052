"""Joining the process group that ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``).

Shared by training (:mod:`visd.training.engine`) and sharded diagnosis (:mod:`visd.zero_shot.shard`):
one GPU per rank (``LOCAL_RANK``) when CUDA is used, the CPU otherwise; one process alone needs no group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from visd.errors import ConfigError

__all__ = ["ProcessGroup", "join_process_group"]


@dataclass
class ProcessGroup:
    """This process's place in the run: ``rank`` of ``world``, its ``device``, and whether it ``created``
    the torch.distributed group (and so destroys it at the end)."""

    rank: int
    world: int
    device: torch.device
    created: bool

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def join_process_group(device: str | None = None, backend: str = "auto") -> ProcessGroup:
    """Join the torchrun process group, or stand alone when ``WORLD_SIZE`` is 1 or unset.

    Args:
        device: ``"cuda"``, ``"cpu"`` or ``None`` (CUDA when available).
        backend: ``"auto"`` (nccl with CUDA, else gloo), ``"nccl"`` or ``"gloo"``.

    Raises:
        ConfigError: CUDA asked for but not available, or nccl without CUDA.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was requested but CUDA is not available; set device: cpu or leave it empty")
    use_cuda = device == "cuda" or (device is None and torch.cuda.is_available())
    where = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(where)
    created = False
    if world > 1 and not dist.is_initialized():
        chosen = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
        if chosen == "nccl" and not use_cuda:
            raise ConfigError("backend: nccl needs CUDA; use backend: gloo (or auto) on the CPU")
        dist.init_process_group(chosen, init_method="env://", rank=rank, world_size=world)
        created = True
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return ProcessGroup(rank, world, where, created)
