"""Training noise under DDP: each rank's own rows of one global draw."""

from __future__ import annotations

import torch
from torch import Tensor


def rank_normal(shape: tuple[int, ...], rank: int, world_size: int, like: Tensor) -> Tensor:
    """Rank ``rank``'s rows of ``world_size * shape[0]`` standard normal rows of ``shape[1:]``.

    The draw is from the global generator, which holds the same state on every rank
    (``seed_everything``): each rank takes its own rows of the global draw, as it takes
    its own share of the data, so the ranks train on ``world_size * shape[0]`` distinct
    draws (one process with the global batch draws the same numbers). With one process
    this is ``torch.randn(shape)``.

    Args:
        shape: this rank's shape, rows first.
        rank: this process's rank.
        world_size: number of processes.
        like: a tensor whose device and dtype the draw takes.
    """
    n = shape[0]
    h = torch.randn(world_size * n, *shape[1:], device=like.device, dtype=like.dtype)
    return h[rank * n : (rank + 1) * n]
