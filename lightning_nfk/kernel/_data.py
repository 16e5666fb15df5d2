"""Iterating fitting data: a tensor of inputs, or any iterable of ``x`` / ``(x, ...)`` batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler

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
        # inputs are data: a generator output that still requires grad is detached
        # host to device from pinned memory overlaps the copy (ordered on the stream)
        asynchronous = x.device.type == "cpu" and device.type != "cpu" and x.is_pinned()
        x = x.detach().to(
            device=device,
            dtype=dtype if x.is_floating_point() else x.dtype,
            non_blocking=asynchronous,
        )
        yield from (c for c in x.split(max_rows) if c.shape[0])  # no empty chunk


def has_fixed_order(data: Data) -> bool:
    """Whether every pass yields the rows in the same order (a tensor, a loader without a
    random sampler, or any other iterable, which is taken at its word)."""
    if not isinstance(data, DataLoader) or isinstance(data.dataset, IterableDataset):
        return True
    sampler = getattr(data.batch_sampler, "sampler", data.sampler)
    return isinstance(sampler, SequentialSampler) or getattr(sampler, "shuffle", None) is False


def check_same_examples(data: Data, reads: int = 4) -> None:
    """Refuse data that changes between passes (random augmentation): the first ``reads``
    items of a loader's map-style dataset, or the first batch of another iterable, read twice.

    Raises:
        ValueError: naming what differed and the cure.
    """
    if isinstance(data, Tensor):
        return
    if isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset):
        n = len(data.dataset)  # type: ignore[arg-type]
        pairs = [
            (first_tensor(data.dataset[i]), first_tensor(data.dataset[i]))
            for i in range(min(reads, n))
        ]
        where = f"dataset[i] for i < {min(reads, n)}"
    elif iter(data) is data:
        return  # a one-shot iterator: cannot be read twice without consuming it
    else:
        a, b = next(iter(data), None), next(iter(data), None)
        pairs = [] if a is None or b is None else [(first_tensor(a), first_tensor(b))]
        where = "the first batch"
    for a, b in pairs:
        if a.shape != b.shape or not torch.equal(a.nan_to_num(), b.nan_to_num()):
            raise ValueError(
                f"`data` does not yield the same examples on every pass: {where} differed "
                "between two reads (random augmentation?). The NFK is defined on fixed fitting "
                "examples and its fit makes several passes: fit on an un-augmented copy of the "
                "data (e.g. a data module's `dataset(split)` or `augment=False`)."
            )


def parameter_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype of ``module``'s first floating-point parameter (None without one): what
    its floating inputs are cast to (a frozen float32 teacher beside a ``bf16-true``
    student, a probed layer under ``bf16-true``)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
