"""``torch.compile``: a compiled LightningModule, or a compiled kernel module, trains with
the callbacks attached, and its NFK is the NFK of the original module (the engine
differentiates the module that ``torch.compile`` wraps)."""

from __future__ import annotations

import functools

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_nfk.callbacks import LinearProbeCallback, NFKSpectrumCallback
from lightning_nfk.kernel import ClassifierEnergy, GANEnergy, LowRankNFK, NFKConfig
from lightning_nfk.models import ClassifierModule
from tests.helpers.data import RandomImageDataModule
from tests.helpers.lightning import quick_trainer
from tests.helpers.models import TinyGenerator, tiny_discriminator


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 5, stride=3), nn.ReLU(), nn.Flatten(), nn.Linear(256, 16), nn.Tanh(),
        nn.Linear(16, 10),
    )  # fmt: skip


def _fit(tmp_path, compile_how: str):
    net = _net()
    if compile_how == "kernel module":
        net = torch.compile(net)
    model = ClassifierModule(net, optimizer=functools.partial(torch.optim.SGD, lr=0.0))
    if compile_how == "LightningModule":
        model = torch.compile(model)
    spectrum = NFKSpectrumCallback(k=4, oversample=6, n_iter=3, probe_size=96)
    probe = LinearProbeCallback(features="nfk", max_train=128, max_val=64, nfk_source="spectrum")
    trainer = quick_trainer(tmp_path / compile_how, [spectrum, probe], limit_train_batches=2)
    pl.seed_everything(0)
    trainer.fit(model, RandomImageDataModule(batch_size=32))
    return spectrum, probe


def test_energies_differentiate_the_module_torch_compile_wraps():
    net = _net()
    energy = ClassifierEnergy(torch.compile(net))
    assert energy.module is net
    gan = GANEnergy(
        torch.compile(tiny_discriminator()), torch.compile(TinyGenerator()), latent_dim=4
    )
    assert not hasattr(gan.module, "_orig_mod") and not hasattr(gan.generator, "_orig_mod")
    x = torch.randn(40, 1, 28, 28)
    config = NFKConfig(k=4, oversample=4, n_iter=2)
    got = LowRankNFK(energy, config).fit(x).singular_values
    want = LowRankNFK(ClassifierEnergy(net), config).fit(x).singular_values
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same computation


@pytest.mark.slow  # inductor compiles the forward on the CPU (about a minute)
@pytest.mark.parametrize("compile_how", ["LightningModule", "kernel module"])
def test_compiled_training_with_both_callbacks(tmp_path, compile_how):
    want, _ = _fit(tmp_path, "none")
    spectrum, probe = _fit(tmp_path, compile_how)
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(
        spectrum.nfk.singular_values, want.nfk.singular_values, rtol=1e3 * eps, atol=0
    )
    assert probe.history and 0.0 <= probe.history[-1]["probe/acc"] <= 1.0
