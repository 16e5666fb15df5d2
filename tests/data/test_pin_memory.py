"""The data modules' loaders pin their batches when, and only when, the trainer runs on CUDA
(page-locked batches make Lightning's copy to the GPU asynchronous)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pytorch_lightning import Trainer
from pytorch_lightning.accelerators import CPUAccelerator, CUDAAccelerator

from tests.helpers.data import RandomImageDataModule
from tests.helpers.lightning import quick_trainer, tiny_classifier


def _loaders(dm: RandomImageDataModule) -> list:
    return [dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()]


def _data() -> RandomImageDataModule:
    return RandomImageDataModule(num_train=64, num_test=16, val_size=16, batch_size=16)


def test_no_trainer_no_pinning():
    assert not any(loader.pin_memory for loader in _loaders(_data()))


@pytest.mark.parametrize(
    "accelerator, pinned",
    [(CPUAccelerator(), False), (CUDAAccelerator(), True)],
    ids=["cpu", "cuda"],
)
def test_pinned_exactly_on_a_cuda_trainer(accelerator, pinned):
    dm = _data()
    # what Trainer.fit attaches, and the fit's progress (its epoch)
    loop = Trainer(accelerator="cpu", logger=False).fit_loop
    dm.trainer = SimpleNamespace(accelerator=accelerator, fit_loop=loop)
    assert [loader.pin_memory for loader in _loaders(dm)] == [pinned] * 3


def test_a_cpu_fit_does_not_pin(tmp_path):
    dm = _data()
    trainer = quick_trainer(tmp_path, limit_train_batches=1)
    trainer.fit(tiny_classifier(), dm)
    assert dm.trainer is trainer
    assert not trainer.train_dataloader.pin_memory
