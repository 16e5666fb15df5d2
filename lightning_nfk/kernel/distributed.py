"""The one collective the engine needs: a sum over processes, injectable."""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist
from torch import Tensor

Reduce = Callable[[Tensor], Tensor]
"""``reduce(t)`` returns the elementwise sum of ``t`` over all processes (may work in place)."""


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over the default process group when ``torch.distributed`` is initialised, else identity."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
