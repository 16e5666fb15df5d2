"""CIFAR-10 and SVHN data modules (32x32 colour images): CIFAR-10 from a local
image-folder tree or torchvision's download, SVHN through torchvision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_nfk.data.image_datamodule import ImageDataModule
from lightning_nfk.data.image_folder import find_image_folders, read_image_folder

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 (50k/10k, 3x32x32, 10 classes).

    Read from ``data_dir``, in this order:

    * an image-folder tree ``data_dir/{train,test}/<class>/*.{jpg,jpeg,png,webp,gif}`` (the
      layout ``torchvision.datasets.ImageFolder`` reads; the ten class folders named as in
      CIFAR-10: airplane, automobile, ..., truck), decoded once into memory, no network.
      Hidden files (``.*``: macOS's ``._*``, ``.DS_Store``) and OS junk (``Thumbs.db``,
      ``desktop.ini``) are skipped; ``.bmp``, ``.tif``/``.tiff`` and other formats
      torchvision cannot decode are refused (convert them); other files are skipped with a
      warning (see :mod:`lightning_nfk.data.image_folder`). A partial tree (``train/``
      without ``test/``, or the other way round) is an error naming the missing folder,
      never a download;
    * torchvision's CIFAR-10 (``data_dir/cifar-10-batches-py``, downloaded if absent), when
      neither ``data_dir/train`` nor ``data_dir/test`` exists.

    The tree's files are read in sorted order within each class (ImageFolder's order), so
    ``train_subset``, ``val_size`` and ``num_labels`` draw other examples than from
    torchvision's copy. See :class:`ImageDataModule` for the options.
    """

    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def prepare_data(self) -> None:
        if not find_image_folders(self.data_dir):  # a tree is read once, at setup
            super().prepare_data()

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        if find_image_folders(self.data_dir):  # raises on a partial tree
            folder = Path(self.data_dir) / ("train" if train else "test")
            images, labels, _ = read_image_folder(folder, CIFAR10_CLASSES, (3, 32, 32))
            return images, labels
        from torchvision.datasets import CIFAR10

        try:
            ds = CIFAR10(self.data_dir, train=train, download=True)
        except Exception as err:  # no network, mirror down, ...
            raise FileNotFoundError(
                f"CIFAR-10 not found in `data_dir` ({self.data_dir!r}). Provide it one of "
                "these ways:\n1. an image-folder tree "
                f"{Path(self.data_dir) / '{train,test}' / '<class>' / '*.jpg|png|webp|gif'} "
                f"with the class folders {list(CIFAR10_CLASSES)}\n2. let torchvision download it "
                f"(needs the network): failed with {type(err).__name__}: {err}"
            ) from err
        images = torch.from_numpy(
            np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))
        )  # (N, 3, 32, 32)
        return images, torch.tensor(ds.targets, dtype=torch.int64, device="cpu")


class SVHNDataModule(ImageDataModule):
    """SVHN (73k/26k, 3x32x32; the 'extra' split is not used), torchvision's download."""

    mean = (0.4377, 0.4438, 0.4728)
    std = (0.1980, 0.2010, 0.1970)

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        from torchvision.datasets import SVHN

        ds = SVHN(self.data_dir, split="train" if train else "test", download=True)
        return torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64))
