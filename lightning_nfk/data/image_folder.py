"""Read an image-folder tree (``root/<split>/<class>/<file>``) into memory, once.

The layout ``torchvision.datasets.ImageFolder`` reads: one folder per class, classes in
sorted order (their index is their position), files in sorted order within a class.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def has_image_folders(root: str | Path, splits: tuple[str, ...] = ("train", "test")) -> bool:
    """Whether ``root/<split>/`` holds at least one class folder for every split."""
    return all(
        (Path(root) / s).is_dir() and any(p.is_dir() for p in (Path(root) / s).iterdir())
        for s in splits
    )


def read_image_folder(
    folder: str | Path,
    classes: tuple[str, ...] | None = None,
    shape: tuple[int, int, int] | None = None,
) -> tuple[Tensor, Tensor, tuple[str, ...]]:
    """Decode every image of ``folder/<class>/*.{jpg,jpeg,png}``.

    Args:
        folder: the split's folder.
        classes: the expected class folders (their order gives the labels); default: the
            sorted sub-folders.
        shape: the expected (C, H, W) of every image; images are decoded to C channels
            (1: grey, 3: RGB).

    Returns:
        uint8 images (N, C, H, W), int64 labels (N,), and the class names.

    Raises:
        FileNotFoundError: no such folder, or a class folder without images.
        ValueError: other class folders than ``classes``, or an image of another shape.
    """
    from torchvision.io import ImageReadMode, decode_image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"No image folder {str(folder)!r}.")
    found = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir()))
    if classes is not None and found != tuple(classes):
        raise ValueError(
            f"{str(folder)!r} must hold one folder per class, {list(classes)}; found {list(found)}."
        )
    mode = ImageReadMode.UNCHANGED
    if shape is not None:
        mode = ImageReadMode.GRAY if shape[0] == 1 else ImageReadMode.RGB
    images, labels = [], []
    for label, name in enumerate(found):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(
                f"No {'/'.join(IMAGE_SUFFIXES)} images in {str(folder / name)!r}."
            )
        for path in files:
            data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
            image = decode_image(data, mode=mode)
            if shape is not None and tuple(image.shape) != tuple(shape):
                raise ValueError(
                    f"{str(path)!r} is {tuple(image.shape)} (C, H, W); every image must be {shape}."
                )
            images.append(image)
        labels.append(torch.full((len(files),), label, dtype=torch.int64, device="cpu"))
    return torch.stack(images), torch.cat(labels), found
