"""Shared machinery of the image LightningDataModules: in-memory uint8 tensors, a seeded
validation split, a training subset, and a balanced label budget for the
semi-supervised protocol."""

from __future__ import annotations

import abc
import hashlib
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.accelerators import CUDAAccelerator
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from lightning_nfk._io import update_digest


class ImageTensorDataset(Dataset):
    """uint8 images (N, C, H, W) and labels, normalised on the fly; optional CIFAR-style
    augmentation (random 4-pixel-padded crop and horizontal flip).

    With ``indices`` (N,), items are ``(x, y, index)``: the example's position in the
    split that defines it (for the label budget, its position in the training split), the
    key of per-example tables such as precomputed distillation targets.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: bool = False,
        indices: Tensor | None = None,
    ) -> None:
        self.images, self.labels, self.augment = images, labels, augment
        self.indices = indices
        self.mean = torch.tensor(mean, device="cpu").view(-1, 1, 1)
        self.std = torch.tensor(std, device="cpu").view(-1, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def fingerprint(self) -> str:
        """SHA-256 (hex) of every image, label and the normalisation (not the augmentation
        or the index, which do not change the clean examples): what decides whether
        per-example tables fitted on a split apply to this one. Reads the uint8 tensors in
        place, without decoding or normalising an image."""
        digest = hashlib.sha256(b"ImageTensorDataset")
        for t in (self.images, self.labels, self.mean.double(), self.std.double()):
            update_digest(digest, t)
        return digest.hexdigest()

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        x, y = self._item(i)
        return (x, y) if self.indices is None else (x, y, self.indices[i])

    def tensors(self, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The clean (never augmented) normalised images and the labels of ``index`` (default:
        every example), as two tensors: what a script that studies the data at once needs,
        without a loader. Equal to stacking the items of an un-augmented dataset."""
        images, labels = (
            (self.images, self.labels)
            if index is None
            else (self.images[index], self.labels[index])
        )
        return self._normalize(images.float().div_(255)), labels.clone()

    def _normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def _item(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.images[i].float().div_(255)
        if self.augment:
            h, w = x.shape[1:]
            x = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
            top, left = torch.randint(0, 9, (2,), device="cpu").tolist()
            x = x[:, top : top + h, left : left + w]
            if torch.rand((), device="cpu") < 0.5:
                x = x.flip(2)
        return self._normalize(x), self.labels[i]


UNLABELED = -1
"""The label of a training image outside the label budget in the ``"semi"`` split (the
``ignore_index`` of cross-entropy and accuracy)."""


class EpochSeededSampler(RandomSampler):
    """A random order drawn from ``(seed, epoch)`` alone: Lightning calls ``set_epoch`` at
    each epoch start, so a run resumed from an epoch's end sees the same batches as an
    uninterrupted one (a loader's own generator would restart its stream; from within an
    epoch, see :meth:`skip_once`). Under DDP,
    Lightning replaces it by a ``DistributedSampler(shuffle=True)``, which also draws its
    order from a seed (``seed_everything``'s) and the epoch."""

    def __init__(self, data_source: Dataset, seed: int) -> None:
        super().__init__(data_source)  # type: ignore[arg-type]
        self.seed, self.epoch, self._skip = seed, 0, 0

    @classmethod
    def for_fit(cls, data_source: Dataset, seed: int, trainer: Any | None) -> EpochSeededSampler:
        """The sampler of a data module's training loader, at the epoch ``trainer``'s fit is
        at (None: epoch 0). Lightning sets the epoch at each epoch's start, but a resumed
        fit first iterates its loader before that, and a loader with workers fetches as
        soon as it is iterated: without this it would read epoch 0's order."""
        sampler = cls(data_source, seed)
        if trainer is not None:
            sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed)
        return sampler

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_once(self, n: int) -> None:
        """The next pass over the epoch's order leaves out its first ``n`` indices: a
        training resumed from a checkpoint taken after ``b`` batches of an epoch passes
        ``n = b * batch_size`` and continues that epoch's order where it stopped (Lightning
        only counts the batches done; a plain loader would start the epoch again). Call it
        before the loader fetches the epoch's first index: with ``num_workers=0``, any time
        before the epoch's first batch (e.g. ``on_train_start``); a loader with workers
        fetches as soon as it is iterated.

        Raises:
            ValueError: if ``n`` is negative.
        """
        if n < 0:
            raise ValueError(f"`n` must be >= 0, got {n}")
        self._skip = n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.data_source), generator=g, device="cpu").tolist()
        skip, self._skip = self._skip, 0
        yield from order[skip:]


def balanced_label_indices(labels: Tensor, num_labels: int, seed: int) -> Tensor:
    """``num_labels`` indices, as equal as possible across classes, drawn with ``seed``.

    Raises:
        ValueError: if a class has fewer examples than its share.
    """
    classes = labels.unique().tolist()
    g = torch.Generator().manual_seed(seed)
    base, extra = divmod(num_labels, len(classes))
    chosen = []
    for j, c in enumerate(classes):
        pool = (labels == c).nonzero().flatten()
        share = base + (1 if j < extra else 0)
        if share > len(pool):
            raise ValueError(
                f"`num_labels` ({num_labels}) asks {share} examples of class {c}, which has "
                f"only {len(pool)} in the training split."
            )
        chosen.append(pool[torch.randperm(len(pool), generator=g, device="cpu")[:share]])
    return torch.cat(chosen).sort().values


class ImageDataModule(pl.LightningDataModule, abc.ABC):
    """Base of the image data modules.

    Args:
        data_dir: where the dataset lives or is downloaded.
        batch_size: loader batch size.
        num_workers: loader workers.
        val_size: examples held out of the official training split for validation
            (seeded); 0 uses the official test split for validation.
        train_subset: keep only this many (seeded) training examples.
        num_labels: label budget for the semi-supervised protocol (balanced per class,
            seeded); ``labeled_dataset`` holds them.
        augment: random crop and flip on training batches (never on the NFK's data).
        with_index: items are ``(x, y, index)`` (see :class:`ImageTensorDataset`); needed by
            per-example tables such as ``NFKDistillationModule(targets="precomputed")``.
        train_split: what the training loader reads: ``"train"`` (the training split),
            ``"labeled"`` (only the label budget, ``num_labels``: the low-label protocol,
            where a teacher's NFK may still be fitted on the whole unlabelled split) or
            ``"semi"`` (every training image, the labels outside the budget hidden as
            :data:`UNLABELED`: a loss on unlabelled images, such as distillation, sees
            them all; ``"semi"`` is also a split of :meth:`dataset`).
        normalization: ``"standard"`` (the dataset's mean and std, for classifiers),
            ``"symmetric"`` (to [-1, 1], for GANs with a tanh generator) or ``"none"``
            ([0, 1], for VAEs with a Bernoulli likelihood).
        seed: seed of the split, the subset and the label draw.
    """

    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    num_classes: int = 10

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int = 5000,
        train_subset: int | None = None,
        num_labels: int | None = None,
        augment: bool = False,
        normalization: Literal["standard", "symmetric", "none"] = "standard",
        seed: int = 0,
        with_index: bool = False,
        train_split: Literal["train", "labeled", "semi"] = "train",
    ) -> None:
        super().__init__()
        if train_split not in ("train", "labeled", "semi"):
            raise ValueError(
                f"`train_split` must be 'train', 'labeled' or 'semi', got {train_split!r}."
            )
        if train_split != "train" and num_labels is None:
            raise ValueError(
                f"`train_split={train_split!r}` needs a label budget: set `num_labels`."
            )
        if normalization not in ("standard", "symmetric", "none"):
            raise ValueError(
                f"`normalization` must be 'standard', 'symmetric' or 'none', got {normalization!r}."
            )
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("val_size", val_size, 0),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
        for name, value in (("train_subset", train_subset), ("num_labels", num_labels)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be None or a positive integer, got {value!r}.")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.train_subset = train_subset
        self.num_labels = num_labels
        self.augment = augment
        self.normalization = normalization
        self.seed = seed
        self.with_index = with_index
        self.train_split = train_split
        self._splits: dict[str, tuple[Tensor, Tensor, Tensor]] | None = None

    @abc.abstractmethod
    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """uint8 images (N, C, H, W) and int64 labels of the official train or test split."""

    def prepare_data(self) -> None:
        self.load_split(train=True)
        self.load_split(train=False)

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        x, y = self.load_split(train=True)
        x_test, y_test = self.load_split(train=False)
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(x), generator=g, device="cpu")
        if self.val_size >= len(x):
            raise ValueError(
                f"`val_size` ({self.val_size}) must be smaller than the training split ({len(x)})."
            )
        val_idx, train_idx = perm[: self.val_size], perm[self.val_size :].sort().values
        if self.train_subset is not None:
            train_idx = (
                train_idx[
                    torch.randperm(len(train_idx), generator=g, device="cpu")[: self.train_subset]
                ]
                .sort()
                .values
            )
        positions = torch.arange
        splits = {
            "train": (x[train_idx], y[train_idx], positions(len(train_idx))),
            "test": (x_test, y_test, positions(len(x_test))),
        }
        val_idx = val_idx.sort().values
        splits["val"] = (
            (x[val_idx], y[val_idx], positions(len(val_idx))) if self.val_size else splits["test"]
        )
        if self.num_labels is not None:
            if self.num_labels > len(train_idx):
                raise ValueError(
                    f"`num_labels` ({self.num_labels}) exceeds the training examples ({len(train_idx)})."
                )
            labeled = balanced_label_indices(splits["train"][1], self.num_labels, self.seed)
            splits["labeled"] = (splits["train"][0][labeled], splits["train"][1][labeled], labeled)
            hidden = torch.full_like(splits["train"][1], UNLABELED, device="cpu")
            hidden[labeled] = splits["train"][1][labeled]
            splits["semi"] = (splits["train"][0], hidden, splits["train"][2])
        self._splits = splits

    def dataset(
        self, split: str, augment: bool = False, with_index: bool | None = None
    ) -> ImageTensorDataset:
        """The ``"train"``, ``"val"``, ``"test"``, ``"labeled"`` or ``"semi"`` split (after
        ``setup``; the last two with a label budget);
        ``with_index`` defaults to the module's."""
        if self._splits is None:
            self.setup()
        assert self._splits is not None
        if split not in self._splits:
            raise ValueError(f"No split {split!r}; available: {sorted(self._splits)}.")
        x, y, index = self._splits[split]
        with_index = self.with_index if with_index is None else with_index
        return ImageTensorDataset(
            x,
            y,
            *self.normalization_constants(),
            augment=augment,
            indices=index if with_index else None,
        )

    def normalization_constants(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) applied to images in [0, 1]."""
        channels = len(self.mean)
        if self.normalization == "standard":
            return self.mean, self.std
        if self.normalization == "symmetric":
            return (0.5,) * channels, (0.5,) * channels
        return (0.0,) * channels, (1.0,) * channels

    @property
    def labeled_dataset(self) -> ImageTensorDataset:
        """The label budget (``num_labels``) or, without one, the whole training split."""
        return self.dataset("labeled" if self.num_labels is not None else "train")

    def _loader(self, split: str, shuffle: bool, augment: bool = False) -> DataLoader:
        dataset = self.dataset(split, augment=augment)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSeededSampler.for_fit(dataset, self.seed, self.trainer)
            if shuffle
            else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    @property
    def pin_memory(self) -> bool:
        """Whether the loaders pin their batches in page-locked memory: when the attached
        trainer runs on CUDA, so that Lightning's host-to-device copy of each batch is
        asynchronous (no host sync per step). False without a trainer."""
        return self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_split, shuffle=True, augment=self.augment)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
