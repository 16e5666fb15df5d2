"""Trainer-side helpers shared by everything that runs the NFK inside a Lightning run.

Reference datasets (un-augmented splits), seeded subsets sharded across ranks without
padding, the engine's ``reduce`` through the trainer's strategy, and the checks that
must run on every rank before a rank-zero section (``log_dir`` is a collective under DDP).
"""

from __future__ import annotations

import contextlib
import numbers
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor

from lightning_nfk.kernel import Reduce

_SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


def reference_dataset(trainer: pl.Trainer, split: str) -> Any:
    """The un-augmented dataset of ``split`` (``"train"``, ``"val"`` or ``"labeled"``): the
    data module's ``dataset(split)`` when it has one (lightning_nfk data modules; its
    ``labeled_dataset`` for ``"labeled"``), else the dataset of the trainer's loader (the
    training loader for ``"labeled"``)."""
    dm = trainer.datamodule
    if split == "labeled" and dm is not None and hasattr(dm, "labeled_dataset"):
        return dm.labeled_dataset
    split = "train" if split == "labeled" else split
    if dm is not None and callable(getattr(dm, "dataset", None)):
        return dm.dataset(split)
    loader = trainer.train_dataloader if split == "train" else trainer.val_dataloaders
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        raise RuntimeError(
            f"Cannot find the {split!r} dataset: use a LightningDataModule with a `dataset(split)` "
            "method or a DataLoader over a map-style dataset."
        )
    return dataset


def check_strategy(trainer: pl.Trainer, who: str) -> None:
    """Refuse strategies that shard the parameters: the NFK needs every rank to hold theta."""
    if isinstance(trainer.strategy, _SHARDED_STRATEGIES):
        raise ValueError(
            f"{who} does not support {type(trainer.strategy).__name__}: it shards the "
            "parameters, and the NFK needs the full parameter vector on every rank. Use a "
            "data-parallel strategy (ddp, ddp_spawn) or one device."
        )


def strategy_sum(trainer: pl.Trainer) -> Reduce:
    """The engine's ``reduce``: a sum over processes through the trainer's strategy."""
    strategy, world = trainer.strategy, trainer.world_size

    def reduce(t: Tensor) -> Tensor:
        return strategy.reduce(t, reduce_op="sum") if world > 1 else t

    return reduce


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, unpadded shard of ``n`` rows for ``rank`` (sizes differ by at most one)."""
    return rank * n // world_size, (rank + 1) * n // world_size


def seeded_subset(n: int, size: int, seed: int) -> Tensor:
    """``min(size, n)`` indices of ``range(n)`` drawn with ``seed``, sorted (all when size >= n)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def local_shard(trainer: pl.Trainer, indices: Tensor) -> tuple[Tensor, int]:
    """This rank's contiguous shard of ``indices`` and its first position in ``indices``."""
    lo, hi = shard_bounds(len(indices), trainer.global_rank, trainer.world_size)
    return indices[lo:hi], lo


def rng_devices(module: torch.nn.Module) -> list[int]:
    """CUDA devices whose RNG ``torch.random.fork_rng`` must save for ``module``."""
    return sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})


def check_items(dataset: Any, *, labels: bool, where: str) -> None:
    """Refuse dataset items the callbacks cannot read, at ``setup`` rather than at the
    first epoch end: an item must be a tensor ``x`` or a tuple ``(x, y, ...)`` and, with
    ``labels``, ``y`` an integer class index (not one-hot)."""
    if len(dataset) == 0:
        raise ValueError(f"The {where} is empty.")
    item = dataset[0]
    if isinstance(item, Tensor) and not labels:
        return
    if not (isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor)):
        raise TypeError(
            f"Items of the {where} must be tensors x or tuples (x, y, ...) with a tensor x; got "
            f"{type(item).__name__}"
            + (
                " (dict items: wrap the dataset to return (x, y))."
                if isinstance(item, dict)
                else "."
            )
        )
    if not labels:
        return
    if len(item) < 2:
        raise ValueError(f"Items of the {where} have no label: the linear probe needs (x, y).")
    y = item[1]
    if not (isinstance(y, numbers.Integral) or (isinstance(y, Tensor) and y.numel() == 1)):
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(
            f"Labels of the {where} must be integer class indices; got {shape} (one-hot or "
            "multi-label targets: pass the class index, e.g. y.argmax())."
        )
    if isinstance(y, Tensor) and y.is_floating_point():
        raise ValueError(
            f"Labels of the {where} must be integer class indices; got a {y.dtype} tensor."
        )


def stack_items(
    dataset: Any, indices: Tensor, *, labels: bool = False
) -> tuple[Tensor, Tensor | None]:
    """The inputs ``x`` (stacked) of ``dataset[i]`` for ``i`` in ``indices``, and with
    ``labels`` their labels ``y`` as int64."""
    items = [dataset[int(i)] for i in (indices if len(indices) else [0])]  # [0]: the shape
    x = torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])
    x, items = x[: len(indices)], items[: len(indices)]  # a rank may have no rows
    y = torch.as_tensor([int(it[1]) for it in items], dtype=torch.int64) if labels else None
    return x, y


@contextlib.contextmanager
def progress_bar(trainer: pl.Trainer, desc: str) -> Iterator[Any]:
    """A tqdm bar counting examples on rank zero when the trainer shows progress bars;
    yields its ``update`` (a no-op elsewhere). No total: the passes of a fit depend on the
    strategy it chooses."""
    if trainer.progress_bar_callback is None or trainer.global_rank != 0:
        yield lambda n: None
        return
    from tqdm.auto import tqdm

    with tqdm(desc=desc, unit="ex", leave=False, dynamic_ncols=True) as bar:
        yield bar.update


def resolved_log_dir(trainer: pl.Trainer) -> Path:
    """``trainer.log_dir`` (a collective under DDP): call it on every rank, then use the
    value in a rank-zero section."""
    return Path(trainer.log_dir or trainer.default_root_dir)


@contextlib.contextmanager
def deferred_interrupts(trainer: pl.Trainer) -> Iterator[None]:
    """Hold SIGTERM and SIGINT (Ctrl-C) during a section full of collectives, then end the
    run on every rank at the same point.

    A signal handled in the middle of the section (Lightning's SIGTERM handler broadcasts;
    a ``KeyboardInterrupt`` leaves one rank's collective unmatched) can hang the other ranks.
    Here a signal is only recorded; when the section ends, the ranks sum what they received
    (one collective that every rank reaches) and all raise together: ``KeyboardInterrupt``
    for SIGINT (Lightning's graceful shutdown, exit status 1) or Lightning's
    ``SIGTERMException`` with exit status 143 for SIGTERM. Checkpoints of finished epochs
    are left as they were. The same signal a second time interrupts at once, on the rank
    that receives it (a way out of a section that does not end).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: set[int] = set()
    signals = (signal.SIGINT, signal.SIGTERM)

    def record(signum: int, _: object) -> None:
        if signum in received:  # the same signal twice: stop now, on this rank
            for s, handler in previous.items():
                signal.signal(s, handler)
            _raise_for(signum)
        received.add(signum)

    previous = {s: signal.signal(s, record) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    flags = torch.tensor(
        [float(s in received) for s in signals], device=trainer.strategy.root_device
    )
    flags = strategy_sum(trainer)(flags)
    for s, flag in zip(signals, flags):
        if flag > 0:
            _raise_for(s)


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SIGTERMException(128 + signal.SIGTERM)
