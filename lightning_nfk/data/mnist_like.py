"""Fashion-MNIST and MNIST data modules (28x28 grey images, IDX files)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from lightning_nfk.data.idx import read_idx
from lightning_nfk.data.image_datamodule import ImageDataModule

_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class _IDXDataModule(ImageDataModule):
    """Found, in this order, in ``data_dir`` (the IDX files themselves, or torchvision's
    ``<data_dir>/<Name>/raw/`` layout), in ``debian_dir``, or through torchvision's download."""

    folder: str = ""
    debian_dir: Path | None = None
    debian_package: str | None = None

    def _candidates(self) -> list[Path]:
        dirs = [Path(self.data_dir), Path(self.data_dir) / self.folder / "raw"]
        return dirs + ([self.debian_dir] if self.debian_dir is not None else [])

    def _find(self, train: bool) -> tuple[Path, Path] | None:
        for d in self._candidates():
            found = []
            for stem in _FILES[train]:
                hits = [d / f"{stem}{ext}" for ext in ("", ".gz") if (d / f"{stem}{ext}").exists()]
                if not hits:
                    break
                found.append(hits[0])
            if len(found) == 2:
                return found[0], found[1]
        return None

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        paths = self._find(train)
        if paths is None:
            self._download()
            paths = self._find(train)
        assert paths is not None
        images = torch.from_numpy(read_idx(paths[0]).copy()).unsqueeze(1)  # (N, 1, 28, 28)
        labels = torch.from_numpy(read_idx(paths[1]).astype("int64"))
        return images, labels

    def _download(self) -> None:
        import torchvision

        cls = getattr(torchvision.datasets, self.folder)
        try:
            cls(self.data_dir, train=True, download=True)
            cls(self.data_dir, train=False, download=True)
        except Exception as err:  # no network, mirror down, ...
            ways = [
                f"1. put the four IDX files (.gz or not) in `data_dir` ({self.data_dir!r}) or "
                f"{Path(self.data_dir) / self.folder / 'raw'}"
            ]
            if self.debian_dir is not None:
                ways.append(
                    f"2. on Debian: apt-get install -y {self.debian_package} (files under {self.debian_dir})"
                )
            ways.append(
                f"{len(ways) + 1}. let torchvision download it (needs the network): failed with "
                f"{type(err).__name__}: {err}"
            )
            raise FileNotFoundError(
                f"{self.folder} not found. Provide it one of these ways:\n" + "\n".join(ways)
            ) from err


class FashionMNISTDataModule(_IDXDataModule):
    """Fashion-MNIST (60k/10k, 28x28, 10 classes); see :class:`ImageDataModule` for the options."""

    folder = "FashionMNIST"
    debian_dir = Path("/usr/share/datasets/fashion-mnist")
    debian_package = "dataset-fashion-mnist"
    mean = (0.2860,)
    std = (0.3530,)


class MNISTDataModule(_IDXDataModule):
    """MNIST (60k/10k, 28x28, 10 classes); see :class:`ImageDataModule` for the options."""

    folder = "MNIST"
    mean = (0.1307,)
    std = (0.3081,)
