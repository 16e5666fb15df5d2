"""Networks and LightningModules: sizes, a training step each, the NFK protocol."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
from lightning_nfk.models._sampling import rank_normal
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


class _GANStepBeforeDDP(GANModule):
    """GANModule's training step as it was before it was arranged for plain ``ddp``."""

    def training_step(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        opt_g, opt_d = self.optimizers()
        h = torch.randn(x.shape[0], self.latent_dim, device=x.device, dtype=x.dtype)
        fake = self.generator(h)
        d_loss = (
            F.softplus(-self.discriminator(x)).mean()
            + F.softplus(self.discriminator(fake.detach())).mean()
        )
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = F.softplus(-self.discriminator(fake)).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()


def _gan_trained(cls: type[GANModule], tmp_path, steps: int = 4) -> tuple[dict, dict]:
    """(initial, trained) state of a small GAN after ``steps`` steps on one process."""
    torch.manual_seed(0)
    gan = cls(DCGANGenerator(8, 1, 8, 28), DCGANDiscriminator(1, 8, 28), latent_dim=8)
    initial = {k: v.clone() for k, v in gan.state_dict().items()}
    torch.manual_seed(1)  # the latents
    dm = RandomImageDataModule(batch_size=16, normalization="symmetric")
    quick_trainer(tmp_path, limit_train_batches=steps, limit_val_batches=0).fit(gan, dm)
    return initial, gan.state_dict()


def test_gan_trains_on_one_process_as_before_the_ddp_arrangement(tmp_path):
    initial, expected = _gan_trained(_GANStepBeforeDDP, tmp_path)
    _, got = _gan_trained(GANModule, tmp_path)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        # the same arithmetic (the zero-weight term adds exact zeros): equal to round-off;
        # an other algorithm (e.g. the generator step on the old discriminator) moves the
        # weights by Adam steps of about lr = 2e-4
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-6, msg=key)
    moved = [k for k in expected if not torch.allclose(expected[k].double(), initial[k].double())]
    assert any(k.startswith("generator.") for k in moved)
    assert any(k.startswith("discriminator.") for k in moved)


def test_ranks_draw_their_own_rows_of_the_global_latents():
    like = torch.empty(0, dtype=torch.float64, device="cpu")
    torch.manual_seed(0)
    whole = torch.randn(6, 3, dtype=torch.float64, device="cpu")
    torch.manual_seed(0)
    one = rank_normal((6, 3), rank=0, world_size=1, like=like)
    shares = []
    for rank in range(2):  # every rank holds the same global generator state
        torch.manual_seed(0)
        shares.append(rank_normal((3, 3), rank=rank, world_size=2, like=like))
    assert one.dtype == shares[0].dtype == torch.float64 and shares[0].shape == (3, 3)
    torch.testing.assert_close(one, whole)  # one process: the draw it always made
    torch.testing.assert_close(torch.cat(shares), whole)  # two: disjoint rows of it


def test_classifier_test_step_scores_the_test_split_with_its_own_metric(tmp_path):
    clf, dm = tiny_classifier(), RandomImageDataModule(batch_size=16)
    trainer = quick_trainer(tmp_path, limit_train_batches=3)
    trainer.fit(clf, dm)
    metrics = trainer.test(clf, dm, verbose=False)[0]
    # by hand over the same test split
    clf.eval()
    correct = total = 0
    loss = 0.0
    with torch.no_grad():
        for x, y, *_ in dm.test_dataloader():
            logits = clf(x)
            correct += int((logits.argmax(dim=1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            total += len(y)
    assert metrics["test/acc"] == pytest.approx(correct / total, abs=1e-6)
    assert metrics["test/loss"] == pytest.approx(loss / total, rel=1e-4)
    assert clf.test_acc is not clf.val_acc
