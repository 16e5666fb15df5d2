"""Networks and LightningModules: sizes, a training step each, the NFK protocol."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_nfk.kernel import ClassifierEnergy, GANEnergy, VAEEnergy
from lightning_nfk.models import (
    ConvVAE,
    DCGANDiscriminator,
    DCGANGenerator,
    GANModule,
    LeNet5,
    ResNetDiscriminator,
    ResNetGenerator,
    VAEModule,
    WideResNet,
    nfk_energy_of,
)
from lightning_nfk.models._sampling import rank_normal
from lightning_nfk.models.gan import discriminator_loss, generator_loss
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


def test_gan_losses_against_their_formulas():
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([-1.0, 1.0])

    def sig(v: float) -> float:
        return 1 / (1 + math.exp(-v))

    def mean(values) -> float:
        return sum(values) / len(values)

    def softplus(v: float) -> float:
        return math.log1p(math.exp(v))

    expected_d = {
        "nonsaturating": mean([softplus(-r) for r in (0, 2)])
        + mean([softplus(f) for f in (-1, 1)]),
        "lsgan": mean([(sig(r) - 1) ** 2 for r in (0, 2)]) + mean([sig(f) ** 2 for f in (-1, 1)]),
        "hinge": mean([max(0, 1 - r) for r in (0, 2)]) + mean([max(0, 1 + f) for f in (-1, 1)]),
    }
    expected_g = {
        "nonsaturating": mean([softplus(-f) for f in (-1, 1)]),
        "lsgan": mean([(sig(f) - 1) ** 2 for f in (-1, 1)]),
        "hinge": -mean([-1, 1]),
    }
    for loss in ("nonsaturating", "lsgan", "hinge"):
        assert discriminator_loss(loss, real, fake).item() == pytest.approx(
            expected_d[loss], rel=1e-6
        )
        assert generator_loss(loss, fake).item() == pytest.approx(expected_g[loss], abs=1e-7)


@pytest.mark.parametrize("loss", ["nonsaturating", "lsgan", "hinge"])
def test_gan_losses_of_bfloat16_logits_are_float32(loss):
    """Under bfloat16 autocast the discriminator's logits come out in bfloat16; the losses
    compute in float32 (a sigmoid near 1 keeps about 2 digits in bfloat16)."""
    torch.manual_seed(0)
    real = (torch.randn(64) + 4).bfloat16().requires_grad_()  # confident: sigmoid near 1
    fake = (torch.randn(64) - 4).bfloat16().requires_grad_()
    d, g = discriminator_loss(loss, real, fake), generator_loss(loss, fake)
    assert d.dtype == g.dtype == torch.float32
    r64, f64 = real.detach().double(), fake.detach().double()
    torch.testing.assert_close(d.double(), discriminator_loss(loss, r64, f64), rtol=1e-6, atol=0)
    torch.testing.assert_close(g.double(), generator_loss(loss, f64), rtol=1e-6, atol=0)
    (d + g).backward()  # the gradient reaches the bfloat16 logits in their own dtype
    assert real.grad.dtype == fake.grad.dtype == torch.bfloat16


class _RecordGenerator(pl.Callback):
    def __init__(self) -> None:
        self.states: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states.append([p.detach().clone() for p in pl_module.generator.parameters()])


@pytest.mark.parametrize("loss", ["lsgan", "hinge"])
def test_the_afv_gan_trains_with_a_moving_average_of_its_generator(tmp_path, loss):
    torch.manual_seed(0)
    gan = GANModule(
        ResNetGenerator(latent_dim=8, channels=1, width=8, image_size=28),
        ResNetDiscriminator(channels=1, width=8, image_size=28),
        latent_dim=8,
        loss=loss,
        ema_decay=0.5,
        nfk_num_samples=32,
        nfk_score="sigmoid",
        nfk_generator_mode="train",
    )
    assert not any(p.requires_grad for p in gan.generator_ema.parameters())
    start = [p.detach().clone() for p in gan.generator.parameters()]
    record = _RecordGenerator()
    dm = RandomImageDataModule(batch_size=16, normalization="symmetric")
    trainer = quick_trainer(
        tmp_path, callbacks=[record], limit_train_batches=3, limit_val_batches=0
    )
    trainer.fit(gan, dm)
    # the average, step by step: e_t = e_(t-1) + (1 - decay) (g_t - e_(t-1)), from g_0
    expected = start
    for state in record.states:
        expected = [e + 0.5 * (g - e) for e, g in zip(expected, state)]
    for got, want in zip(gan.generator_ema.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert any((g - e).abs().max() > 1e-6 for g, e in zip(record.states[-1], expected))
    for avg, live in zip(gan.generator_ema.buffers(), gan.generator.buffers()):
        torch.testing.assert_close(avg, live, rtol=0, atol=0)
    energy = gan.nfk_energy()
    assert energy.generator is gan.generator_ema
    assert energy.score_output == "sigmoid" and energy.generator_mode == "train"
    assert any(k.startswith("generator_ema.") for k in gan.state_dict())
    assert torch.isfinite(trainer.callback_metrics["train/d_loss"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss": "wgan"}, r"`loss` must be 'nonsaturating', 'lsgan' or 'hinge', got 'wgan'"),
        ({"ema_decay": 1.0}, r"`ema_decay` must be None or a number in \[0, 1\), got 1.0"),
        ({"nfk_score": "prob"}, r"`score` must be 'logit' or 'sigmoid', got 'prob'"),
    ],
)
def test_gan_module_refuses_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GANModule(DCGANGenerator(8, 1, 8, 28), DCGANDiscriminator(1, 8, 28), latent_dim=8, **kwargs)
