"""A frozen teacher's low-rank NFK embeddings as distillation targets.

:class:`TeacherTargets` fits the teacher's :class:`~lightning_nfk.kernel.LowRankNFK` (the
classifier energy) on the un-augmented training split, sharded over the ranks, and keeps

* the table of the training examples' embeddings :math:`e(x) = V_x P` (N x k), taken from
  the fit's last pass at no extra cost, gathered so that every rank holds all of it;
* the validation examples' embeddings (one more pass, once: the teacher does not change);
* the per-component scale :math:`\\sigma_i / \\sqrt{N}` (the root mean square of component
  i over the fitting set), by which ``target_scaling="standardize"`` divides.

The tables and the scale live on the teacher's device (:meth:`TeacherTargets.to` after a
load), so that a training step looks its targets up with the batch's index tensor where
it is: no host sync, no copy per step. Checkpoints and the cache hold them on the CPU.

A cache file (``nfk_cache``) keeps all of it across runs (seeds, baselines, resumption): it
is used only when the teacher's weights, the NFK settings and the fitting data match.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lightning_nfk.kernel import ClassifierEnergy, LowRankNFK, NFKConfig, gather_rows
from lightning_nfk.trainer_utils import (
    deferred_interrupts,
    local_shard,
    progress_bar,
    rng_devices,
    strategy_sum,
)

_CACHE_VERSION = 1
_FINGERPRINT_ITEMS = 16
# the settings the targets depend on (not chunk_size or memory_budget: how, not what)
_TARGET_SETTINGS = ("k", "oversample", "n_iter", "damping", "dtype", "seed")


def settings_differ(saved: dict[str, Any], config: NFKConfig) -> list[str]:
    """The NFK settings, among those the targets depend on, that differ from ``saved``."""
    current = config.as_dict()
    return [
        f"{name}={saved.get(name)!r} (now {current[name]!r})"
        for name in _TARGET_SETTINGS
        if saved.get(name) != current[name]
    ]


@contextlib.contextmanager
def trainable(module: nn.Module) -> Iterator[None]:
    """Parameters that require grad for the duration (the NFK's theta are the trainable
    parameters; a frozen teacher has none); restored on exit."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def data_fingerprint(dataset: Any) -> Tensor:
    """(2,) float64: the number of examples and the sum of 16 evenly spaced inputs: enough to
    tell another split, subset or normalisation from the one a cache was fitted on."""
    n = len(dataset)
    picks = torch.linspace(0, n - 1, min(n, _FINGERPRINT_ITEMS), device="cpu").long().tolist()
    total = sum(float(_inputs(dataset[i]).double().sum()) for i in picks)
    return torch.tensor([float(n), total], dtype=torch.float64, device="cpu")


def _inputs(item: Any) -> Tensor:
    return item[0] if isinstance(item, (tuple, list)) else item


class TeacherTargets:
    """The teacher's NFK and its embeddings of the training and validation splits.

    Args:
        teacher: the frozen teacher network (logits).
        config: the NFK settings (k, n_iter, oversample, seed, ...).
    """

    def __init__(self, teacher: nn.Module, config: NFKConfig) -> None:
        self.teacher, self.config = teacher, config
        self.nfk: LowRankNFK | None = None
        self.train: Tensor | None = None  # (N, k), on the device the steps run on
        self.val: Tensor | None = None  # (N_val, k) or None, same device
        self.rms: Tensor | None = None  # (k,) sigma / sqrt(N), same device
        self.fingerprint: Tensor | None = None
        self.seconds = 0.0

    # -- fitting -------------------------------------------------------------------------------
    def fit(
        self, trainer: pl.Trainer, train_set: Any, val_set: Any | None, batch_size: int
    ) -> None:
        """Fit on ``train_set`` (every rank passes the whole split; each reads its shard) and
        embed ``val_set``; every rank ends with the same tables."""
        start = time.perf_counter()
        reduce = strategy_sum(trainer)
        device = next(self.teacher.parameters()).device
        with (
            deferred_interrupts(trainer),
            torch.random.fork_rng(devices=rng_devices(self.teacher)),
            trainable(self.teacher),
        ):
            nfk = LowRankNFK(ClassifierEnergy(self.teacher), self.config, reduce=reduce)
            train_loader = self._shard_loader(trainer, train_set, batch_size)
            with progress_bar(trainer, "Teacher NFK") as update:
                nfk.fit(train_loader, progress=update)
                local = nfk.fit_embedding
                if local is None:
                    local = nfk.transform(train_loader)
                val = None
                if val_set is not None and len(val_set) > 0:
                    val_local = nfk.transform(self._shard_loader(trainer, val_set, batch_size))
                    val = gather_rows(val_local.to(device), reduce)
            train = gather_rows(local.to(device), reduce)
        self.nfk, self.train, self.val = nfk, train, val
        self.rms = (nfk.singular_values.double() / nfk.num_examples**0.5).float().to(device)
        self.fingerprint = data_fingerprint(train_set)
        self.seconds = time.perf_counter() - start

    @staticmethod
    def _shard_loader(trainer: pl.Trainer, dataset: Any, batch_size: int) -> DataLoader:
        """This rank's shard in order, read with the data module's ``num_workers`` (kept
        alive over the fit's passes) and pinned when the trainer runs on CUDA."""
        shard, _ = local_shard(trainer, torch.arange(len(dataset), device="cpu"))
        workers = getattr(trainer.datamodule, "num_workers", 0)
        workers = workers if isinstance(workers, int) and workers > 0 else 0
        return DataLoader(
            Subset(dataset, shard.tolist()),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=trainer.strategy.root_device.type == "cuda",
        )

    @property
    def is_ready(self) -> bool:
        return self.train is not None

    def to(self, device: torch.device) -> TeacherTargets:
        """Move the tables and the scale to ``device`` (once, after a fit, a load or a
        restore; nothing is copied when they are there already). Returns self."""
        for name in ("train", "val", "rms"):
            t = getattr(self, name)
            if t is not None and t.device != device:
                setattr(self, name, t.to(device))
        return self

    def embed(self, x: Tensor) -> Tensor:
        """Online targets: :math:`e(x) = V_x P` of a batch (no collective), in the fit's
        precision whatever autocast is active.

        No host sync: an input whose teacher gradients are not finite gives a row of NaN
        or inf (the loss shows it) rather than an error, which would cost a sync per step.
        """
        if self.nfk is None:
            raise RuntimeError(
                "The teacher's NFK components are not held (precomputed targets keep only "
                "the tables): online targets need targets='online' or an `nfk_cache`."
            )
        with trainable(self.teacher):  # transform turns autocast and TF32 off itself
            return self.nfk.transform(x, check_finite=False)

    # -- checkpoint and cache ------------------------------------------------------------------
    def tables(self) -> dict[str, Any]:
        """What a checkpoint keeps: the tables and scale (N x k floats, on the CPU), not the
        components."""
        return {
            "train": _cpu(self.train),
            "val": _cpu(self.val),
            "rms": _cpu(self.rms),
            "fingerprint": self.fingerprint,
            "config": self.config.as_dict(),
        }

    def load_tables(self, state: dict[str, Any]) -> None:
        """Restore :meth:`tables` (from a checkpoint; they stay where they were read until
        :meth:`to`).

        Raises:
            ValueError: tables fitted with other ``k``, ``n_iter``, ... than this module's.
        """
        differ = settings_differ(state["config"], self.config)
        if differ:
            raise ValueError(
                "The checkpoint's distillation targets were fitted with other NFK settings: "
                f"{', '.join(differ)}. Resume with the settings of the run that wrote it, or "
                "start a new run."
            )
        self.train, self.val, self.rms = state["train"], state["val"], state["rms"]
        self.fingerprint = state["fingerprint"]

    def matches(self, train_set: Any) -> bool:
        """Whether the tables were fitted on ``train_set`` (its size and fingerprint)."""
        return self.fingerprint is not None and torch.allclose(
            self.fingerprint, data_fingerprint(train_set), rtol=1e-9, atol=0
        )

    def release_components(self) -> None:
        """Drop the fitted NFK (|theta_t| x k components), when only the tables are needed."""
        self.nfk = None

    def save(self, path: str | Path) -> None:
        """The fitted NFK (components included) and the tables, for later runs."""
        assert self.nfk is not None
        state = {"version": _CACHE_VERSION, "nfk": self.nfk.state_dict(), **self.tables()}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)  # atomic: a reader never sees half a file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def load(self, path: str | Path, train_set: Any) -> str | None:
        """Load a cache written by :meth:`save`; returns why it does not apply (and loads
        nothing), or None when loaded."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unreadable, truncated, foreign
            return f"unreadable ({type(e).__name__}: {e})"
        if not isinstance(state, dict) or state.get("version") != _CACHE_VERSION:
            return "not a cache of this version"
        differ = settings_differ(state["config"], self.config)
        if differ:
            return f"other NFK settings ({', '.join(differ)})"
        fingerprint = data_fingerprint(train_set)
        if not torch.allclose(state["fingerprint"], fingerprint, rtol=1e-9, atol=0):
            return "another fitting set (size or content differ)"
        current = {n: t.detach().cpu() for n, t in self.teacher.state_dict().items()}
        saved = {
            n.removeprefix("net."): t
            for n, t in {**state["nfk"]["theta"], **state["nfk"]["constants"]}.items()
        }
        if set(saved) != set(current) or any(
            saved[n].shape != current[n].shape
            or not torch.equal(saved[n], current[n].to(saved[n].dtype))
            for n in current
        ):
            return "another teacher (its weights or BatchNorm statistics differ)"
        with trainable(self.teacher):
            nfk = LowRankNFK(ClassifierEnergy(self.teacher), self.config)
            nfk.load_state_dict(state["nfk"])
        self.nfk = nfk
        self.load_tables(state)
        return None


def _cpu(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.cpu()


def fit_or_load(
    targets: TeacherTargets,
    trainer: pl.Trainer,
    train_set: Any,
    val_set: Any | None,
    batch_size: int,
    cache: str | None,
) -> str:
    """Fill ``targets`` from ``cache`` when it applies on every rank, else fit on every rank
    (and write the cache on rank zero; a failed write is a warning). Returns ``"cache"`` or
    ``"fit"``. Every rank takes the same branch: the decision is summed over the ranks, so
    a rank that cannot read the file (a node-local disk, a concurrent writer) makes all
    fit, never some fit while others wait."""
    why = "no file"
    if cache is not None and Path(cache).exists():
        why = targets.load(cache, train_set)
    if cache is not None:
        loaded = torch.tensor([float(why is None)], device=trainer.strategy.root_device)
        if strategy_sum(trainer)(loaded).item() == trainer.world_size:
            return "cache"
        if why != "no file":
            rank_zero_warn(
                f"`nfk_cache` {cache!r} does not apply"
                + (f": {why}" if why else " on every process")
                + ". Fitting again."
            )
    targets.fit(trainer, train_set, val_set, batch_size)
    if cache is not None:
        if trainer.global_rank == 0:
            try:
                targets.save(cache)
            except OSError as e:  # every rank must still reach the barrier
                rank_zero_warn(f"Could not write `nfk_cache` {cache!r}: {e}")
        trainer.strategy.barrier("nfk_cache")
    return "fit"


__all__ = ["TeacherTargets", "data_fingerprint", "fit_or_load", "trainable"]
