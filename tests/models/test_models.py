"""Networks and LightningModules: sizes, a training step each, the NFK protocol."""

from __future__ import annotations

import pytest
import torch

from lightning_nfk.kernel import ClassifierEnergy, GANEnergy, VAEEnergy
from lightning_nfk.models import (
    ConvVAE,
    DCGANDiscriminator,
    DCGANGenerator,
    GANModule,
    LeNet5,
    VAEModule,
    WideResNet,
    nfk_energy_of,
)
from tests.helpers.data import RandomImageDataModule
from tests.helpers.lightning import NoProtocol, quick_trainer, tiny_classifier


def _count(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts():
    assert _count(LeNet5()) == 61706
    assert 2.1e6 < _count(WideResNet(40, 2)) < 2.3e6  # WRN-40-2: about 2.2M
    assert 0.17e6 < _count(WideResNet(16, 1)) < 0.18e6  # WRN-16-1: about 0.18M


@pytest.mark.parametrize("size", [28, 32])
def test_shapes(size):
    c = 1 if size == 28 else 3
    g, d, v = DCGANGenerator(8, c, 8, size), DCGANDiscriminator(c, 8, size), ConvVAE(c, 4, 8, size)
    img = g(torch.randn(2, 8))
    assert img.shape == (2, c, size, size) and d(img).shape == (2,)
    mu, logvar = v.encode(img)
    assert mu.shape == logvar.shape == (2, 4) and v.decode(mu).shape == img.shape
    assert WideResNet(16, 1, in_channels=c)(torch.randn(2, c, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("factory", "error", "match"),
    [
        (lambda: WideResNet(17, 1), ValueError, r"`depth` must be 6n \+ 4"),
        (lambda: LeNet5(image_size=30), ValueError, r"`image_size` must be 28 or 32, got 30"),
        (
            lambda: DCGANGenerator(image_size=64),
            ValueError,
            r"`image_size` must be 28 or 32, got 64",
        ),
    ],
    ids=["wrn-depth", "lenet-size", "dcgan-size"],
)
def test_invalid_network_arguments(factory, error, match):
    with pytest.raises(error, match=match):
        factory()


def _train(module, dm, tmp_path):
    trainer = quick_trainer(tmp_path, limit_train_batches=3)
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, dm)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    return trainer


def test_modules_train_and_expose_their_energy(tmp_path):
    clf = tiny_classifier()
    _train(clf, RandomImageDataModule(batch_size=16), tmp_path)
    assert isinstance(nfk_energy_of(clf), ClassifierEnergy) and nfk_energy_of(clf).module is clf.net

    gan = GANModule(
        DCGANGenerator(8, 1, 8, 28), DCGANDiscriminator(1, 8, 28), latent_dim=8, nfk_num_samples=64
    )
    t = _train(gan, RandomImageDataModule(batch_size=16, normalization="symmetric"), tmp_path)
    assert "train/d_loss" in t.callback_metrics
    e = nfk_energy_of(gan)
    assert isinstance(e, GANEnergy) and e.module is gan.discriminator and e.num_samples == 64

    vae = VAEModule(ConvVAE(1, 4, 8, 28))
    t = _train(vae, RandomImageDataModule(batch_size=16, normalization="none"), tmp_path)
    assert torch.isfinite(t.callback_metrics["train/elbo"])
    assert isinstance(nfk_energy_of(vae), VAEEnergy)
    assert VAEModule(ConvVAE(1, 4, 8, 28), nfk_noise_samples=4).nfk_energy().num_samples == 4


def test_protocol_errors():
    with pytest.raises(TypeError, match=r"NoProtocol does not implement the NFK protocol"):
        nfk_energy_of(NoProtocol())

    class Wrong(NoProtocol):
        def nfk_energy(self):
            return self.net

    with pytest.raises(
        TypeError,
        match=r"Wrong.nfk_energy\(\) must return a lightning_nfk.kernel.Energy, got Sequential",
    ):
        nfk_energy_of(Wrong())
