"""The few collectives the loops use; with one worker (or none initialised) they return what they were given."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather(obj) -> list:
    """Every worker's `obj`, in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def max_over_workers(value: float, device: torch.device) -> float:
    """The largest `value` over workers, in one all-reduce."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def mean_over_workers(values: list[float], device: torch.device) -> list[float]:
    """Means across workers, in one all-reduce however many values."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()
