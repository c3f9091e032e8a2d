"""Process-group helpers that also work without torch.distributed (one process = rank 0 of 1)."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["all_gather_object", "barrier", "get_rank", "get_world_size", "is_main_process"]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if _active() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main_process() -> bool:
    """Rank 0: the only process that writes files and logs."""
    return get_rank() == 0


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group)."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()
