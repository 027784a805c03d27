"""Whole tensors and shards of FSDP2 (DTensor) parameters, for code that saves or averages weights."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (DTensor) parameter — collective: every process must call it — or ``t``."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor every process holds) laid out like ``like``: this process's shard of it if
    ``like`` is a DTensor (cut locally, no communication), else ``value`` itself."""
    if isinstance(like, DTensor):
        return distribute_tensor(value.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)
    return value
