"""Data modules: where Fashion-MNIST is found, splits, label budgets, normalisation."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lightning_nfk.data import FashionMNISTDataModule, balanced_label_indices
from tests.helpers.data import RandomImageDataModule


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion(folder: Path, n_train: int = 300, n_test: int = 50) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_found_in_data_dir_first(tmp_path, monkeypatch, layout):
    monkeypatch.setattr(FashionMNISTDataModule, "debian_dir", tmp_path / "absent")
    _fake_fashion(tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw")
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), val_size=100, batch_size=32)
    dm.setup()
    assert (
        len(dm.dataset("train")) == 200
        and len(dm.dataset("val")) == 100
        and len(dm.dataset("test")) == 50
    )
    x, _y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32


def test_fashion_mnist_error_lists_the_three_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(FashionMNISTDataModule, "debian_dir", tmp_path / "absent")

    def no_network(*args, **kwargs):
        raise RuntimeError("network unreachable")

    import torchvision

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", no_network)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "nothing"))
    with pytest.raises(
        FileNotFoundError,
        match=r"(?s)FashionMNIST not found.*1\. put the four IDX files.*"
        r"2\. on Debian: apt-get install -y dataset-fashion-mnist.*3\. let torchvision download it.*"
        r"network unreachable",
    ):
        dm.setup()


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").exists(),
    reason="apt-get install dataset-fashion-mnist",
)
def test_fashion_mnist_from_debian(tmp_path):
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), val_size=5000, num_labels=500, seed=0)
    dm.setup()
    assert len(dm.dataset("train")) == 55000 and len(dm.dataset("test")) == 10000
    assert torch.bincount(dm.labeled_dataset.labels).tolist() == [50] * 10
    x = torch.stack([dm.dataset("test")[i][0] for i in range(2000)])
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1  # standardised


def _rows(images: torch.Tensor) -> set[bytes]:
    """Each image's bytes: an example's identity (uint8, compared exactly)."""
    return {row.numpy().tobytes() for row in images}


def test_splits_are_seeded_and_disjoint():
    a, b, c = (RandomImageDataModule(val_size=100, train_subset=200, seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.dataset("train").images, b.dataset("train").images)
    assert not torch.equal(a.dataset("train").images, c.dataset("train").images)
    assert len(a.dataset("train")) == 200 and len(a.dataset("val")) == 100
    official = _rows(a.load_split(train=True)[0])
    assert len(official) == a.num_train  # distinct images, so an image identifies its example
    for dm in (a, c):
        train, val = _rows(dm.dataset("train").images), _rows(dm.dataset("val").images)
        test = _rows(dm.dataset("test").images)
        assert len(train) == 200 and len(val) == 100  # no example twice within a split
        assert train.isdisjoint(val) and train.isdisjoint(test) and val.isdisjoint(test)
        assert train | val <= official  # both come from the official training split


def test_balanced_label_indices():
    labels = torch.arange(1000) % 10
    idx = balanced_label_indices(labels, 45, seed=0)
    counts = torch.bincount(labels[idx], minlength=10).tolist()
    assert sorted(counts) == [4] * 5 + [5] * 5 and len(set(idx.tolist())) == 45
    assert torch.equal(idx, balanced_label_indices(labels, 45, seed=0))
    with pytest.raises(
        ValueError, match=r"`num_labels` \(2000\) asks 200 examples of class 0, which has only 100"
    ):
        balanced_label_indices(labels, 2000, seed=0)


@pytest.mark.parametrize(
    ("normalization", "low", "high"), [("none", 0.0, 1.0), ("symmetric", -1.0, 1.0)]
)
def test_normalization(normalization, low, high):
    dm = RandomImageDataModule(normalization=normalization)
    x = torch.stack([dm.dataset("train")[i][0] for i in range(50)])
    assert x.min() >= low and x.max() <= high


@pytest.mark.parametrize("normalization", ["standard", "symmetric"])
def test_tensors_are_the_stacked_clean_items(normalization):
    dm = RandomImageDataModule(shape=(3, 8, 8), normalization=normalization)
    ds = dm.dataset("train", augment=True)  # tensors() never augments
    index = torch.tensor([5, 0, 17, 3])
    x, y = ds.tensors(index)
    clean = dm.dataset("train", augment=False)
    items = [clean[int(i)] for i in index]
    # the same float32 operations, element by element, as each item's
    torch.testing.assert_close(x, torch.stack([xi for xi, _ in items]), rtol=0, atol=1e-6)
    assert y.tolist() == [int(yi) for _, yi in items]
    x_all, y_all = clean.tensors()
    assert x_all.shape == (len(clean), 3, 8, 8) and y_all.shape == (len(clean),)
    torch.testing.assert_close(x_all[index], x, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"`batch_size` must be an integer >= 1, got 0"),
        ({"num_labels": 0}, r"`num_labels` must be None or a positive integer, got 0"),
        (
            {"normalization": "minmax"},
            r"`normalization` must be 'standard', 'symmetric' or 'none', got 'minmax'",
        ),
    ],
    ids=["batch", "labels", "normalization"],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandomImageDataModule(**kwargs)


def test_cifar10_and_svhn_layouts(tmp_path, monkeypatch):
    """torchvision's CIFAR-10 (N, H, W, C) and SVHN (N, C, H, W) arrays become (N, C, H, W)."""
    import torchvision

    from lightning_nfk.data import CIFAR10DataModule, SVHNDataModule

    class FakeCIFAR:
        def __init__(self, root, train, download):
            n = 60 if train else 20
            self.data = np.zeros((n, 32, 32, 3), np.uint8)
            self.data[..., 0] = 255  # red
            self.targets = [i % 10 for i in range(n)]

    class FakeSVHN:
        def __init__(self, root, split, download):
            n = 60 if split == "train" else 20
            self.data = np.zeros((n, 3, 32, 32), np.uint8)
            self.labels = np.arange(n) % 10

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR)
    monkeypatch.setattr(torchvision.datasets, "SVHN", FakeSVHN)
    cifar = CIFAR10DataModule(data_dir=str(tmp_path), val_size=10, normalization="none")
    x, _ = cifar.dataset("train")[0]
    assert x.shape == (3, 32, 32) and x[0].min() == 1.0 and x[1:].max() == 0.0
    assert len(cifar.dataset("train")) == 50 and len(cifar.dataset("test")) == 20
    svhn = SVHNDataModule(data_dir=str(tmp_path), val_size=10, num_labels=20)
    assert svhn.dataset("train")[0][0].shape == (3, 32, 32)
    assert torch.bincount(svhn.labeled_dataset.labels).tolist() == [2] * 10


def test_epoch_seeded_sampler_skips_once_into_the_epochs_order():
    from lightning_nfk.data import EpochSeededSampler

    sampler = EpochSeededSampler(range(50), seed=3)
    sampler.set_epoch(2)
    order = list(sampler)
    assert sorted(order) == list(range(50)) and order != list(range(50))
    sampler.skip_once(20)  # a resume after 20 of the epoch's indices: the rest, in order
    assert list(sampler) == order[20:]
    assert list(sampler) == order  # once only
    sampler.set_epoch(3)
    assert list(sampler) != order  # another epoch, another order
    with pytest.raises(ValueError, match=r"`n` must be >= 0, got -1"):
        sampler.skip_once(-1)


class _Recorder(pl.LightningModule):
    """Records each training item (by its pixel sum, which tells the 256 images apart)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(784, 10)
        self.seen: list[tuple[int, list[float]]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self.seen.append((self.current_epoch, x.flatten(1).sum(1).round(decimals=2).tolist()))
        return torch.nn.functional.cross_entropy(self.lin(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_fit_resumed_from_an_epochs_end_reads_the_next_epochs_order(tmp_path, workers):
    # with workers, the loader starts fetching when Lightning first iterates it, before
    # Lightning sets the sampler's epoch: the data module gives it the fit's epoch itself
    def fit(ckpt=None) -> list:
        pl.seed_everything(0)
        dm = RandomImageDataModule(num_train=256, val_size=0, batch_size=64, num_workers=workers)
        module = _Recorder()
        trainer = pl.Trainer(
            max_epochs=3,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)],
        )
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        return module.seen

    whole = fit()
    assert whole[0][1] != whole[4][1]  # epochs 0 and 1 differ in order
    resumed = fit(tmp_path / "epoch=0-step=4.ckpt")
    assert resumed == whole[4:]


def test_the_text_loader_reads_the_order_of_the_fits_epoch(tmp_path):
    from types import SimpleNamespace

    from lightning_nfk.data import TextDataModule

    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n%\n".join(f"doc {i:02d}: a few words" for i in range(40)))
    dm = TextDataModule(files=str(corpus), context=16, batch_size=4)

    def order(epoch: int | None) -> list:
        if epoch is not None:  # a fit at that epoch, as a resumed one is
            loop = pl.Trainer(accelerator="cpu", logger=False).fit_loop
            loop.epoch_progress.current.processed = epoch
            dm.trainer = SimpleNamespace(fit_loop=loop)
        return torch.cat([b["input_ids"] for b in dm.train_dataloader()]).tolist()

    first = order(None)  # no trainer: epoch 0
    assert order(0) == first
    assert order(2) != first and sorted(order(2)) == sorted(first)
    assert order(2) == order(2)  # from (seed, epoch) alone
