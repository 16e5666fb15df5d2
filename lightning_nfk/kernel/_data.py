"""Iterating fitting data: a tensor of inputs, or any iterable of ``x`` / ``(x, ...)`` batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

Data = Tensor | Iterable[Any]


def first_tensor(batch: Any) -> Tensor:
    """The inputs ``x`` of a batch: the batch itself, or its first element."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(
        "`data` must yield tensors x or tuples/lists (x, ...) whose first element is a "
        f"tensor; got a batch of type {type(batch).__name__}."
    )


def check_data(data: object) -> None:
    if isinstance(data, Tensor):
        if data.ndim < 1:
            raise ValueError(
                f"`data` as a tensor must have a batch dimension; got shape {tuple(data.shape)}."
            )
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            "`data` must be a tensor of inputs or an iterable (e.g. a DataLoader) of batches; "
            f"got {type(data).__name__}."
        )


def count_examples(data: Data) -> int:
    """Number of examples in ``data`` (a cheap pass over the loader when it cannot be read)."""
    if isinstance(data, Tensor):
        return data.shape[0]
    if isinstance(data, DataLoader):
        bs = data.batch_sampler
        if (
            isinstance(bs, BatchSampler)
            and not bs.drop_last
            and isinstance(bs.sampler, SequentialSampler)
        ):
            return len(bs.sampler)
    return sum(first_tensor(b).shape[0] for b in data)


def iter_chunks(
    data: Data, max_rows: int, device: torch.device, dtype: torch.dtype
) -> Iterator[Tensor]:
    """Input chunks of at most ``max_rows`` rows, on ``device``; floating inputs cast to ``dtype``."""
    batches = data.split(max_rows) if isinstance(data, Tensor) else map(first_tensor, data)
    for x in batches:
        x = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
        yield from x.split(max_rows)
