"""Data the callbacks cannot use is refused at setup (or at train start for loaders passed
to ``fit``), naming the argument, before any training step; never at the first epoch end."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_nfk.callbacks import LinearProbeCallback, NFKSpectrumCallback
from tests.helpers.data import RandomImageDataModule
from tests.helpers.lightning import quick_trainer, tiny_classifier


class _Counting(type(tiny_classifier())):
    """The tiny classifier, counting its training steps."""

    steps = 0

    def training_step(self, batch, batch_idx):
        type(self).steps += 1
        return super().training_step(batch, batch_idx)


class _DataModule(pl.LightningDataModule):
    """One dataset for every split, the way lightning_nfk data modules expose theirs."""

    def __init__(self, dataset: Dataset) -> None:
        super().__init__()
        self._dataset = dataset

    def dataset(self, split: str) -> Dataset:
        return self._dataset

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset, batch_size=16)

    val_dataloader = train_dataloader


def _refused(tmp_path, callback, data, error, match):
    """``fit`` raises before the model sees any batch (the sanity check included: a module
    of another kind could train on such data; the callback cannot use it)."""
    torch.manual_seed(0)
    model = _Counting(tiny_classifier().net)
    _Counting.steps = 0
    if isinstance(data, Dataset):
        data = _DataModule(data)  # checked at setup
        trainer = quick_trainer(tmp_path, [callback])
    else:  # loaders passed to fit exist from train start on: no sanity check here
        trainer = quick_trainer(tmp_path, [callback], num_sanity_val_steps=0)
    with pytest.raises(error, match=match):
        trainer.fit(model, data)
    assert _Counting.steps == 0, "the error came after training had started"


def _images(n: int = 64) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28)


def test_probe_set_smaller_than_the_sketch(tmp_path):
    dm = RandomImageDataModule(num_train=40, val_size=16, batch_size=8)  # 24 training images
    cb = NFKSpectrumCallback(k=16, oversample=10, probe_size=512)
    _refused(
        tmp_path,
        cb,
        dm,
        ValueError,
        r"`k` \+ `oversample` \(16 \+ 10 = 26\) must not exceed the probe set: "
        r"min\(`probe_size`, len\(train dataset\)\) = 24",
    )


def test_probe_nfk_fit_smaller_than_the_sketch(tmp_path):
    dm = RandomImageDataModule(batch_size=32, num_labels=20)
    cb = LinearProbeCallback(k=16, oversample=10, nfk_fit_size=1024)
    _refused(tmp_path, cb, dm, ValueError, r"labelled training examples\) = 20")


@pytest.mark.parametrize("how", ["datamodule", "loader"])
def test_data_without_labels(tmp_path, how):
    dataset = TensorDataset(_images())
    _refused(
        tmp_path,
        LinearProbeCallback(features="net.4"),
        dataset if how == "datamodule" else DataLoader(dataset, batch_size=16),
        ValueError,
        r"Items of the labelled training dataset have no label: the linear probe needs \(x, y\)",
    )


def test_one_hot_labels(tmp_path):
    y = torch.nn.functional.one_hot(torch.arange(64) % 10, 10)
    _refused(
        tmp_path,
        LinearProbeCallback(features="net.4"),
        TensorDataset(_images(), y),
        ValueError,
        r"Labels of the labelled training dataset must be integer class indices; got \(10,\) \(one-hot",
    )


class _DictItems(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return {"x": torch.zeros(1, 28, 28), "y": i % 10}


def test_dict_items(tmp_path):
    _refused(
        tmp_path,
        NFKSpectrumCallback(k=4, oversample=4, probe_size=32),
        _DictItems(),
        TypeError,
        r"dict batches must hold tensors 'input_ids' \(with 'attention_mask'\) or "
        r"'pixel_values'; got keys \['x', 'y'\]",
    )
