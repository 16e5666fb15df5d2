"""The image-folder reader and CIFAR-10 from a local tree (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

from lightning_nfk.data import CIFAR10DataModule
from lightning_nfk.data.image_folder import read_image_folder
from lightning_nfk.data.torchvision_sets import CIFAR10_CLASSES


def _tree(root: Path, per_class: dict[str, int], shape=(3, 32, 32), seed=0) -> dict:
    """PNG files (lossless) root/<class>/<i>.png; returns the images written, by path."""
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


def test_reads_classes_in_sorted_order_and_files_in_sorted_order(tmp_path):
    written = _tree(tmp_path, {"dog": 2, "cat": 3})
    images, labels, classes = read_image_folder(tmp_path, shape=(3, 32, 32))
    assert classes == ("cat", "dog")
    assert labels.tolist() == [0, 0, 0, 1, 1]
    expected = [
        written[tmp_path / c / f"{i:03d}.png"]
        for c, n in (("cat", 3), ("dog", 2))
        for i in range(n)
    ]
    assert torch.equal(images, torch.stack(expected))  # PNG: lossless


def test_refuses_other_classes_shapes_and_empty_folders(tmp_path):
    _tree(tmp_path / "a", {"cat": 1, "dog": 1})
    with pytest.raises(ValueError, match=r"one folder per class, \['cat', 'dog', 'frog'\]"):
        read_image_folder(tmp_path / "a", classes=("cat", "dog", "frog"))
    _tree(tmp_path / "b", {"cat": 1}, shape=(3, 28, 28))
    with pytest.raises(ValueError, match=r"\(3, 28, 28\).*every image must be \(3, 32, 32\)"):
        read_image_folder(tmp_path / "b", shape=(3, 32, 32))
    (tmp_path / "c" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"No .* images"):
        read_image_folder(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="No image folder"):
        read_image_folder(tmp_path / "missing")


def test_cifar10_data_module_reads_a_tree(tmp_path):
    train = _tree(tmp_path / "train", dict.fromkeys(CIFAR10_CLASSES, 3), seed=1)
    _tree(tmp_path / "test", dict.fromkeys(CIFAR10_CLASSES, 1), seed=2)
    dm = CIFAR10DataModule(str(tmp_path), val_size=5, normalization="none", with_index=True)
    dm.prepare_data()
    dm.setup()
    assert len(dm.dataset("train")) == 25 and len(dm.dataset("val")) == 5
    assert len(dm.dataset("test")) == 10
    _, y, i = dm.dataset("test")[4]  # test files: class order, one per class
    assert int(y) == 4 and int(i) == 4
    image = train[tmp_path / "train" / "airplane" / "000.png"]
    stacked = torch.stack(
        [dm.dataset(s)[j][0] for s in ("train", "val") for j in range(len(dm.dataset(s)))]
    )
    assert (stacked * 255).round().to(torch.uint8).eq(image).flatten(1).all(1).any()


def test_cifar10_without_tree_or_network_says_both_ways(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(FileNotFoundError, match=r"image-folder tree.*\n.*torchvision download"):
        CIFAR10DataModule(str(tmp_path)).setup()
