"""Trainer-side helpers shared by everything that runs the NFK inside a Lightning run.

Reference datasets (un-augmented splits), seeded subsets sharded across ranks without
padding, the engine's ``reduce`` over the trainer's processes, signals held during
sections full of collectives, and the checks that must run on every rank before a
rank-zero section (``log_dir`` is a collective under DDP).
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor

from lightning_nfk.kernel import Reduce
from lightning_nfk.kernel._data import first_tensor

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


def migrate_state_key(checkpoint: dict[str, Any], key: str, legacy_key: str) -> None:
    """In a checkpoint being loaded, file a callback's state saved under ``legacy_key`` (an
    earlier version's ``state_key``) under ``key``, unless a state under ``key`` exists.
    Call from the callback's ``on_load_checkpoint``, which runs before the states load."""
    states = checkpoint.get("callbacks") or {}
    if key not in states and legacy_key in states:
        states[key] = states[legacy_key]


def check_strategy(trainer: pl.Trainer, who: str) -> None:
    """Refuse strategies that shard the parameters: the NFK needs every rank to hold theta."""
    if isinstance(trainer.strategy, _SHARDED_STRATEGIES):
        raise ValueError(
            f"{who} does not support {type(trainer.strategy).__name__}: it shards the "
            "parameters, and the NFK needs the full parameter vector on every rank. Use a "
            "data-parallel strategy (ddp, ddp_spawn) or one device."
        )


def strategy_sum(trainer: pl.Trainer) -> Reduce:
    """The engine's ``reduce``: a sum over the trainer's processes.

    One ``torch.distributed.all_reduce`` on the default process group (the group of
    Lightning's data-parallel strategies), without the barrier that ``strategy.reduce`` adds;
    the identity for one process. Called inside a :func:`deferred_interrupts` section, it is
    also where the ranks compare the signals they received (first, one all-reduce of a
    float per held signal, read on the host) and, if any received SIGINT or SIGTERM, all
    stop there together, before the sum.
    """
    world = trainer.world_size

    def reduce(t: Tensor) -> Tensor:
        if _active is not None:
            _active.check(t.device)
        if world == 1:
            return t
        t = t.contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    return reduce


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, unpadded shard of ``n`` rows for ``rank`` (sizes differ by at most one)."""
    return rank * n // world_size, (rank + 1) * n // world_size


def seeded_subset(n: int, size: int, seed: int) -> Tensor:
    """``min(size, n)`` indices of ``range(n)`` drawn with ``seed``, sorted (all when size >= n)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(n, generator=g, device="cpu")[:size].sort().values


def local_shard(trainer: pl.Trainer, indices: Tensor) -> tuple[Tensor, int]:
    """This rank's contiguous shard of ``indices`` and its first position in ``indices``."""
    lo, hi = shard_bounds(len(indices), trainer.global_rank, trainer.world_size)
    return indices[lo:hi], lo


def rng_devices(module: torch.nn.Module) -> list[int]:
    """CUDA devices whose RNG ``torch.random.fork_rng`` must save for ``module``."""
    return sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})


def check_items(dataset: Any, *, labels: bool, where: str) -> None:
    """Refuse dataset items the callbacks cannot read, at ``setup`` rather than at the
    first epoch end: an item must be a tensor ``x``, a tuple ``(x, y, ...)`` or a dict
    with ``input_ids`` (and ``attention_mask``) or ``pixel_values`` (and ``labels``) and,
    with ``labels``, ``y`` an integer class index (not one-hot)."""
    if len(dataset) == 0:
        raise ValueError(f"The {where} is empty.")
    item = dataset[0]
    if isinstance(item, Tensor) and not labels:
        return
    if isinstance(item, Mapping):
        try:
            first_tensor(item)
        except TypeError as e:
            raise TypeError(f"Items of the {where}: {e}") from None
    elif not (isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor)):
        raise TypeError(
            f"Items of the {where} must be tensors x, tuples (x, y, ...) with a tensor x, or "
            f"dicts with 'input_ids' or 'pixel_values'; got {type(item).__name__}."
        )
    if not labels:
        return
    if (isinstance(item, Mapping) and "labels" not in item) or (
        not isinstance(item, Mapping) and len(item) < 2
    ):
        raise ValueError(
            f"Items of the {where} have no label: the linear probe needs (x, y) or a dict "
            "with 'labels'."
        )
    y = item_label(item)
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


def item_label(item: Any) -> Any:
    """The label of a dataset item: ``y`` of ``(x, y, ...)``, or a dict's ``labels``."""
    return item["labels"] if isinstance(item, Mapping) else item[1]


def stack_items(
    dataset: Any, indices: Tensor, *, labels: bool = False
) -> tuple[Tensor, Tensor | None]:
    """The inputs ``x`` (stacked) of ``dataset[i]`` for ``i`` in ``indices``, and with
    ``labels`` their labels ``y`` as int64."""
    items = [dataset[int(i)] for i in (indices if len(indices) else [0])]  # [0]: the shape
    x = torch.stack([first_tensor(it) for it in items])
    x, items = x[: len(indices)], items[: len(indices)]  # a rank may have no rows
    y = (
        torch.as_tensor([int(item_label(it)) for it in items], dtype=torch.int64, device="cpu")
        if labels
        else None
    )
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
    """Hold SIGINT (Ctrl-C), SIGTERM and SLURM's requeue signal (SIGUSR1) during a section
    full of collectives; act on them at points that every rank reaches together.

    A signal handled in the middle of the section can hang the other ranks: Lightning's
    SIGTERM handler broadcasts, its SLURM handler saves a checkpoint (a barrier), and a
    ``KeyboardInterrupt`` leaves one rank's collective unmatched. Here a signal is only
    recorded. The ranks sum what they received at every ``reduce`` of :func:`strategy_sum`
    called inside the section (the engine's pass boundaries) and once more when the section
    ends; every rank then sees the same sums at the same point and acts on them together:

    * SIGINT or SIGTERM: stop the run at that point (within one pass): ``KeyboardInterrupt``
      for SIGINT (Lightning's graceful shutdown, exit status 1), Lightning's
      ``SIGTERMException`` with exit status 143 for SIGTERM. Further SIGINT and SIGTERM are
      then ignored while the run stops (torchrun's agent forwards to the workers what the
      terminal or SLURM has already sent them); Lightning's teardown restores the handlers
      it found before the fit. Checkpoints of finished epochs are left as they were.
    * The requeue signal: delivered on every rank to the handler it had before the section
      (Lightning's SLURM handler saves a checkpoint and requeues the job) when the section
      ends, or just before the run stops.

    A signal that arrives after the last sum reaches this rank's own handlers as if it had
    arrived after the section. When the section ends with any other exception, the held
    signals are dropped (the run is failing). There is no "second Ctrl-C interrupts at
    once": a rank stuck in a collective needs SIGKILL (torchrun and SLURM send it after
    their grace periods). Sections do not nest (an inner one runs inside the outer one);
    outside the main thread, where handlers cannot be set, nothing is held.
    """
    global _active
    if _active is not None or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = _HeldSignals(trainer)
    _active = held
    try:
        yield
    except BaseException:
        if not held.stopped:  # another error: drop what was held
            held.release(held.counts, stopping=False)
        raise
    finally:
        _active = None
    held.finish(trainer.strategy.root_device)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_active: _HeldSignals | None = None  # the open deferred_interrupts section (main thread)


def _requeue_signals(trainer: pl.Trainer) -> tuple[int, ...]:
    """SIGUSR1 where the platform has it, and the SLURM environment's ``requeue_signal``."""
    found = [signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else []
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if isinstance(environment, SLURMEnvironment) and environment.requeue_signal is not None:
        found.append(environment.requeue_signal)
    return tuple(s for s in dict.fromkeys(found) if s not in _STOP_SIGNALS)


class _HeldSignals:
    """The signals a :func:`deferred_interrupts` section records, and what it does with them."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self.world_size = trainer.world_size
        self.requeue = _requeue_signals(trainer)
        self.signals = (*_STOP_SIGNALS, *self.requeue)
        self.counts = dict.fromkeys(self.signals, 0)
        self.stopped = False
        # a handler set outside Python (None) could not be given back: left alone, and its
        # signal never counted (every rank still sums the same len(signals) flags)
        self.previous = {
            s: signal.signal(s, self._record)
            for s in self.signals
            if signal.getsignal(s) is not None
        }

    def _record(self, signum: int, _: object) -> None:
        self.counts[signum] += 1

    def _sum(self, device: torch.device) -> tuple[dict[int, bool], dict[int, int]]:
        """Whether any rank received each signal (a collective of len(signals) floats on
        ``device``), and this rank's counts that went into the sum."""
        seen = dict(self.counts)
        if self.world_size == 1:
            return {s: n > 0 for s, n in seen.items()}, seen
        flags = torch.zeros(len(self.signals), dtype=torch.float32, device=device)
        for i, s in enumerate(self.signals):
            if seen[s]:
                flags[i] = 1.0
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        return {s: f > 0 for s, f in zip(self.signals, flags.tolist())}, seen

    def check(self, device: torch.device) -> None:
        """At a ``reduce``: stop the run on every rank if any rank received SIGINT or SIGTERM."""
        anywhere, seen = self._sum(device)
        if any(anywhere[s] for s in _STOP_SIGNALS):
            self._stop(anywhere, seen)

    def finish(self, device: torch.device) -> None:
        """At the end of the section: stop, or honour the requeue signal, on every rank."""
        try:
            anywhere, seen = self._sum(device)
            if any(anywhere[s] for s in _STOP_SIGNALS):
                self._stop(anywhere, seen)
            self._honour_requeue(anywhere)
        except BaseException:
            if not self.stopped:
                self.release(self.counts, stopping=False)
            raise
        self.release(seen, stopping=False)

    def _stop(self, anywhere: dict[int, bool], seen: dict[int, int]) -> None:
        self._honour_requeue(anywhere)  # the requeue checkpoint first, on every rank
        self.stopped = True
        self.release(seen, stopping=True)
        if anywhere[signal.SIGINT]:
            raise KeyboardInterrupt
        raise SIGTERMException(128 + signal.SIGTERM)

    def _honour_requeue(self, anywhere: dict[int, bool]) -> None:
        for s in self.requeue:
            if not anywhere[s] or s not in self.previous:
                continue
            handler = self.previous[s]
            if callable(handler):
                handler(s, inspect.currentframe())
            elif handler == signal.SIG_DFL:  # its default action: the process ends
                signal.signal(s, signal.SIG_DFL)
                signal.raise_signal(s)

    def release(self, seen: dict[int, int], *, stopping: bool) -> None:
        """Give the signals back to their previous handlers (when ``stopping``, SIGINT and
        SIGTERM are ignored instead) and deliver to them what arrived after ``seen``."""
        for s, handler in self.previous.items():
            stop = stopping and s in _STOP_SIGNALS
            signal.signal(s, signal.SIG_IGN if stop else handler)
        for s in self.previous:
            if self.counts[s] > seen[s] and not (stopping and s in _STOP_SIGNALS):
                signal.raise_signal(s)
