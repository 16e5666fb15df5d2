"""Iterating fitting data: a tensor of inputs, or any iterable of ``x`` / ``(x, ...)``
batches, or of dict batches (Hugging Face style: ``input_ids`` with ``attention_mask``,
packed into one integer tensor by :func:`pack_tokens`; or ``pixel_values``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler

Data = Tensor | Iterable[Any]


def pack_tokens(input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Token ids ``(..., T)`` and their attention mask (default all ones) as one integer
    tensor ``(..., 2, T)``: the ids over the mask. The engine's form of token inputs: it
    chunks, moves and differentiates one tensor per batch, and a dict batch becomes this.

    Raises:
        ValueError: floating-point ids, or a mask of another shape.
    """
    if input_ids.is_floating_point():
        raise ValueError(f"`input_ids` must be integer token ids, got dtype {input_ids.dtype}.")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"`attention_mask` has shape {tuple(attention_mask.shape)}; `input_ids` "
            f"{tuple(input_ids.shape)}."
        )
    return torch.stack([input_ids, attention_mask.to(input_ids.dtype)], dim=-2)


def unpack_tokens(x: Tensor) -> tuple[Tensor, Tensor]:
    """(ids, mask) of token inputs: ids ``(B, T)`` (mask all ones) or a packed ``(B, 2, T)``
    tensor (:func:`pack_tokens`).

    Raises:
        ValueError: floating-point inputs or another shape.
    """
    if x.is_floating_point() or not (x.ndim == 2 or (x.ndim == 3 and x.shape[1] == 2)):
        raise ValueError(
            "Token inputs must be integer ids (B, T) or ids over the attention mask packed as "
            f"(B, 2, T) (pack_tokens); got shape {tuple(x.shape)} and dtype {x.dtype}."
        )
    if x.ndim == 2:
        return x, torch.ones_like(x)
    return x[:, 0], x[:, 1]


def first_tensor(batch: Any) -> Tensor:
    """The inputs ``x`` of a batch: the batch itself, or its first element; of a dict
    batch, its ``input_ids`` packed with its ``attention_mask`` (:func:`pack_tokens`), or
    its ``pixel_values``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        if isinstance(batch.get("input_ids"), Tensor):
            return pack_tokens(batch["input_ids"], batch.get("attention_mask"))
        if isinstance(batch.get("pixel_values"), Tensor):
            return batch["pixel_values"]
        raise TypeError(
            "dict batches must hold tensors 'input_ids' (with 'attention_mask') or "
            f"'pixel_values'; got keys {sorted(batch)}."
        )
    raise TypeError(
        "`data` must yield tensors x, tuples/lists (x, ...) whose first element is a "
        f"tensor, or dicts with 'input_ids'; got a batch of type {type(batch).__name__}."
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
