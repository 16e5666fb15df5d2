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
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lightning_nfk._io import (
    atomic_torch_save,
    check_torch_file,
    describe_error,
    update_digest,
)
from lightning_nfk.kernel import ClassifierEnergy, LowRankNFK, NFKConfig, gather_rows
from lightning_nfk.trainer_utils import (
    deferred_interrupts,
    local_shard,
    progress_bar,
    rng_devices,
    strategy_sum,
)

# Above 400 lines for a reason: the cache (its signature, fingerprint and refusal of files
# it did not write) belongs with the targets it holds; its functions are about 120 of them.

# A cache file is a dict signed with this format name: the library replaces a file only
# when it carries the signature (or is a cache of the unsigned first version).
_CACHE_FORMAT = "lightning-nfk teacher NFK cache"
_CACHE_VERSION = 2  # 2: signed; the data fingerprint hashes every example
_LEGACY_CACHE_KEYS = {"version", "nfk", "train", "val", "rms", "fingerprint", "config"}
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


def data_fingerprint(dataset: Any) -> str:
    """A SHA-256 (hex) of every example of ``dataset``: its inputs and labels, in order.

    Decides whether a cache or a checkpoint's tables were fitted on this data, so it reads
    all of it: one changed pixel or label gives another fingerprint. A dataset with a
    ``fingerprint()`` method (the lightning_nfk data modules' datasets: one hash over the
    in-memory uint8 images, labels and normalisation, far cheaper than a pass) answers
    itself; any other is read item by item once (one pass over the data, without the
    model).
    """
    own = getattr(dataset, "fingerprint", None)
    if callable(own):
        return str(own())
    digest = hashlib.sha256(f"{type(dataset).__name__}:{len(dataset)}".encode())
    for i in range(len(dataset)):
        item = dataset[i]
        for part in item[:2] if isinstance(item, (tuple, list)) else (item,):
            update_digest(digest, part)
    return digest.hexdigest()


def is_cache_file(path: str | Path) -> bool:
    """Whether ``path`` holds a cache written by :meth:`TeacherTargets.save` (any version):
    the only files ``nfk_cache`` may replace. Reads the header only (memory-mapped)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch file (a text file, a legacy pickle, a directory, ...)
        return False
    if not isinstance(state, dict):
        return False
    if state.get("format") == _CACHE_FORMAT:
        return True
    return state.get("version") == 1 and set(state) == _LEGACY_CACHE_KEYS


def check_cache_path(cache: str | os.PathLike | None, teacher_checkpoint: Any = None) -> None:
    """Refuse an ``nfk_cache`` path that the cache must not replace: the teacher's
    checkpoint, a folder, or an existing file that is not a lightning-nfk cache (a
    checkpoint, a state dict, a text file...). Cheap: called at construction.

    Raises:
        TypeError: ``cache`` is not a path.
        ValueError: as above, naming the file and the cure.
    """
    if cache is None:
        return
    if not isinstance(cache, (str, os.PathLike)) or not str(cache):
        raise TypeError(f"`nfk_cache` must be a file path or None, got {cache!r}.")
    path = Path(cache)
    if teacher_checkpoint is not None and path.resolve() == Path(teacher_checkpoint).resolve():
        raise ValueError(
            f"`nfk_cache` ({str(cache)!r}) is the `teacher_checkpoint` itself: the cache "
            "would replace the teacher. Give the cache a file of its own, e.g. "
            f"{str(path.with_name(path.stem + '_nfk.pt'))!r}."
        )
    if path.is_dir():
        raise ValueError(
            f"`nfk_cache` ({str(cache)!r}) is a folder: give a file path inside it, e.g. "
            f"{str(path / 'nfk_k20.pt')!r}."
        )
    if path.exists() and not is_cache_file(path):
        raise ValueError(
            f"`nfk_cache` ({str(cache)!r}) exists and is not a lightning-nfk NFK cache (a "
            "checkpoint, a state dict, another file?). The cache never replaces a file it did "
            "not write: choose a new path, or delete that file if you no longer need it."
        )


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
        self.fingerprint: str | None = None  # data_fingerprint of the fitting set
        self.seconds = 0.0

    # -- fitting -------------------------------------------------------------------------------
    def fit(
        self,
        trainer: pl.Trainer,
        train_set: Any,
        val_set: Any | None,
        batch_size: int,
        fingerprint: str | None = None,
    ) -> None:
        """Fit on ``train_set`` (every rank passes the whole split; each reads its shard) and
        embed ``val_set``; every rank ends with the same tables. ``fingerprint``: the
        training split's :func:`data_fingerprint`, when the caller has it already."""
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
                local = nfk.fit_transform(train_loader, progress=update)
                val = None
                if val_set is not None and len(val_set) > 0:
                    val_local = nfk.transform(self._shard_loader(trainer, val_set, batch_size))
                    val = gather_rows(val_local.to(device), reduce)
            train = gather_rows(local.to(device), reduce)
        fingerprint = fingerprint if fingerprint is not None else data_fingerprint(train_set)
        self.use_fit(nfk, train, val, fingerprint)
        self.seconds = time.perf_counter() - start

    def use_fit(
        self,
        nfk: LowRankNFK,
        train: Tensor,
        val: Tensor | None = None,
        fingerprint: str | None = None,
    ) -> TeacherTargets:
        """Hold a fit: the fitted ``nfk`` and its embeddings of the training split
        (``train``, (N, k), row i for training example i) and of the validation split;
        the scale (:math:`\\sigma_i / \\sqrt{N}`) is derived from the fit here, on the
        tables' device. What :meth:`fit` ends with; also for a fit made elsewhere (a
        script that fits the teacher's NFK itself). Returns self.

        Raises:
            ValueError: ``nfk`` is not fitted, or a table is not (rows, k).
        """
        if not nfk.is_fitted:
            raise ValueError("`nfk` must be fitted: call nfk.fit(...) first.")
        k = self.config.k
        if nfk.config.k != k:
            raise ValueError(
                f"`nfk` must have these targets' k={k} components, got {nfk.config.k}."
            )
        for name, table in (("train", train), ("val", val)):
            if table is not None and (table.ndim != 2 or table.shape[1] != k):
                raise ValueError(
                    f"`{name}` must be (rows, k={k}) embeddings, got shape {tuple(table.shape)}."
                )
        if val is not None and val.device != train.device:
            raise ValueError(
                f"`val` must be on `train`'s device ({train.device}), got {val.device}."
            )
        self.nfk, self.train, self.val = nfk, train, val
        scale = nfk.singular_values.double() / nfk.num_examples**0.5
        self.rms = scale.float().to(train.device)
        self.fingerprint = fingerprint
        return self

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

    def standardized(self, q: Tensor) -> Tensor:
        """``q`` (B, k) with component i divided by its root mean square over the fitting
        set, :math:`\\sigma_i / \\sqrt{N}`: every component weighs the same in a loss.
        No host sync (the scale is on ``q``'s device after :meth:`to`)."""
        assert self.rms is not None, "fit, load or load_tables first"
        return q / self.rms.clamp_min(torch.finfo(q.dtype).tiny)

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

    def matches(self, fingerprint: str) -> bool:
        """Whether the tables were fitted on the data of this :func:`data_fingerprint`
        (False for tables of an older version, which fingerprinted 16 examples)."""
        return isinstance(self.fingerprint, str) and self.fingerprint == fingerprint

    def release_components(self) -> None:
        """Drop the fitted NFK (|theta_t| x k components), when only the tables are needed."""
        self.nfk = None

    def save(self, path: str | Path) -> None:
        """The fitted NFK (components included) and the tables, for later runs. Written
        atomically, and only over a cache (see :func:`is_cache_file`).

        Raises:
            FileExistsError: ``path`` holds a file that is not a cache.
        """
        assert self.nfk is not None
        if Path(path).exists() and not is_cache_file(path):
            raise FileExistsError(
                f"{str(path)!r} exists and is not a lightning-nfk NFK cache: not replaced."
            )
        state = {
            "format": _CACHE_FORMAT,
            "version": _CACHE_VERSION,
            "nfk": self.nfk.state_dict(),
            **self.tables(),
        }
        atomic_torch_save(state, path)

    def load(self, path: str | Path, fingerprint: str) -> str | None:
        """Load a cache written by :meth:`save` for the training data of ``fingerprint``;
        returns why it does not apply (and loads nothing), or None when loaded."""
        if not is_cache_file(path):
            return "not a lightning-nfk cache"
        try:
            check_torch_file(path, "the cache")
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unreadable, truncated, corrupted
            return f"unreadable ({describe_error(e)})"
        if not isinstance(state, dict) or state.get("version") != _CACHE_VERSION:
            return "not a cache of this version"
        differ = settings_differ(state["config"], self.config)
        if differ:
            return f"other NFK settings ({', '.join(differ)})"
        if state["fingerprint"] != fingerprint:
            return "another fitting set (its examples, labels or normalisation differ)"
        with trainable(self.teacher):
            nfk = LowRankNFK(ClassifierEnergy(self.teacher), self.config)
            try:
                nfk.load_state_dict(state["nfk"])
            except ValueError:  # other parameter names, shapes or dtypes
                return "another teacher (its architecture differs)"
        saved = {n: t.cpu() for n, t in nfk.snapshot.items()}
        current = {n: t.detach().cpu() for n, t in self.teacher.state_dict().items()}
        if set(saved) != set(current) or any(
            saved[n].shape != current[n].shape
            or not torch.equal(saved[n], current[n].to(saved[n].dtype))
            for n in current
        ):
            return "another teacher (its weights or BatchNorm statistics differ)"
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
    fingerprint: str | None = None,
) -> str:
    """Fill ``targets`` from ``cache`` when it applies on every rank, else fit on every rank
    (and write the cache on rank zero; a failed write is a warning). Returns ``"cache"`` or
    ``"fit"``. Every rank takes the same branch: the decision is summed over the ranks, so
    a rank that cannot read the file (a node-local disk, a concurrent writer) makes all
    fit, never some fit while others wait. ``fingerprint``: the training split's
    :func:`data_fingerprint`, computed here when not given."""
    if fingerprint is None:
        fingerprint = data_fingerprint(train_set)
    why = "no file"
    if cache is not None and Path(cache).exists():
        why = targets.load(cache, fingerprint)
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
    targets.fit(trainer, train_set, val_set, batch_size, fingerprint)
    if cache is not None:
        if trainer.global_rank == 0:
            try:
                targets.save(cache)
            except Exception as e:
                # a full disk is a RuntimeError in torch.save; every rank must still reach
                # the barrier, and the fitted targets stand
                rank_zero_warn(f"Could not write `nfk_cache` {cache!r}: {e}")
        trainer.strategy.barrier("nfk_cache")
    return "fit"


__all__ = [
    "TeacherTargets",
    "check_cache_path",
    "data_fingerprint",
    "fit_or_load",
    "is_cache_file",
    "trainable",
]
