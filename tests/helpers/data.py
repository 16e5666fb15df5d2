"""A synthetic image data module: class-dependent means, so a linear probe can succeed."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torchvision.io import write_png

from lightning_nfk.data import ImageDataModule


class RandomImageDataModule(ImageDataModule):
    """``num_train``/``num_test`` uint8 images of ``shape`` whose mean depends on the class."""

    def __init__(
        self,
        shape: tuple[int, ...] = (1, 28, 28),
        num_train: int = 512,
        num_test: int = 128,
        separation: float = 60.0,
        **kwargs,
    ) -> None:
        kwargs.setdefault("val_size", 128)
        super().__init__(**kwargs)
        self.shape, self.num_train, self.num_test, self.separation = (
            tuple(shape),
            num_train,
            num_test,
            separation,
        )
        self.mean = (0.5,) * self.shape[0]
        self.std = (0.25,) * self.shape[0]

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        n = self.num_train if train else self.num_test
        g = torch.Generator().manual_seed(1 if train else 2)
        y = torch.arange(n) % self.num_classes
        pattern = torch.randn(
            self.num_classes, *self.shape, generator=torch.Generator().manual_seed(3)
        )
        x = 128 + self.separation * pattern[y] + 30 * torch.randn(n, *self.shape, generator=g)
        return x.clamp(0, 255).to(torch.uint8), y


def write_image_tree(
    root: Path, per_class: dict[str, int], shape=(3, 32, 32), seed=0
) -> dict[Path, Tensor]:
    """Random PNG files (lossless) root/<class>/<i>.png; returns the images written, by
    path."""
    g = torch.Generator().manual_seed(seed)
    written = {}
    for name, n in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
            path = root / name / f"{i:03d}.png"
            write_png(image, str(path))
            written[path] = image
    return written
