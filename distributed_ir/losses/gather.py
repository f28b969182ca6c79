"""All-gather *with gradient* across workers, for cross-worker negatives."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when no process group is up."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0, rank order.

    ``torch.distributed.nn.functional.all_gather`` back-propagates by summing each rank's
    gradient w.r.t. every gathered slice into its owner (reduce-scatter; all-to-all on gloo),
    so the owner receives d(sum of all ranks' losses)/d(t).  Every rank must pass the same shape.
    """
    rank, size = world()
    if size == 1:
        return t
    return torch.cat(dist_fn.all_gather(t.contiguous()), dim=0)


def gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (e.g. integer keys) from every rank along dim 0, rank order; no autograd."""
    rank, size = world()
    if size == 1:
        return t
    out = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)
