"""CIFAR-10 and SVHN data modules (32x32 colour images) through torchvision."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lightning_nfk.data.image_datamodule import ImageDataModule


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 (50k/10k, 3x32x32), torchvision's download into ``data_dir``."""

    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        from torchvision.datasets import CIFAR10

        ds = CIFAR10(self.data_dir, train=train, download=True)
        images = torch.from_numpy(
            np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))
        )  # (N, 3, 32, 32)
        return images, torch.tensor(ds.targets, dtype=torch.int64)


class SVHNDataModule(ImageDataModule):
    """SVHN (73k/26k, 3x32x32; the 'extra' split is not used), torchvision's download."""

    mean = (0.4377, 0.4438, 0.4728)
    std = (0.1980, 0.2010, 0.1970)

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        from torchvision.datasets import SVHN

        ds = SVHN(self.data_dir, split="train" if train else "test", download=True)
        return torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64))
