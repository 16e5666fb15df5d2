"""Energies: argument checks, the VAE's frozen noise, GAN sample sharding, a user's energy."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_nfk.kernel import ClassifierEnergy, Energy, GANEnergy, LowRankNFK, VAEEnergy
from lightning_nfk.kernel.energies.vae import VAEEnergy as _VAE
from tests.helpers.models import TinyGenerator, TinyVAE, tiny_discriminator


def test_vae_noise_depends_on_the_example_only():
    # bit-identical: every operation of the draw is exact (tests/kernel/test_frozen_noise.py)
    energy = VAEEnergy(TinyVAE(), num_samples=2)
    x = torch.rand(6, 8)
    (eps,) = energy.extras(x)
    assert eps.shape == (6, 2, 3)
    (one,) = energy.extras(x[3:4])
    assert torch.equal(one[0], eps[3])
    assert torch.equal(torch.cat([energy.extras(part)[0] for part in x.split([1, 3, 2])]), eps)
    (perm,) = energy.extras(x.flip(0))
    assert torch.equal(perm, eps.flip(0))
    (as64,) = energy.extras(x.double())
    torch.testing.assert_close(as64.float(), eps, rtol=0, atol=0)
    (other_seed,) = VAEEnergy(TinyVAE(), num_samples=2, seed=1).extras(x)
    assert not torch.equal(other_seed, eps)
    assert not torch.equal(eps[0], eps[1])


def test_vae_noise_names_its_device():
    """Drawn where the inputs are, with no device-less tensor: under a ``meta`` default
    device (what CUDA does to a CPU/GPU mix) the same noise, on the inputs' device."""
    energy = VAEEnergy(TinyVAE(), num_samples=4)
    x = torch.rand(5, 8, dtype=torch.float64)
    (expected,) = energy.extras(x)
    torch.set_default_device("meta")
    try:
        (got,) = energy.extras(x)
    finally:
        torch.set_default_device(None)
    assert got.device.type == "cpu" and got.dtype == torch.float64
    assert torch.equal(got, expected)


def test_vae_noise_statistics():
    """Standard normal draws, antithetic pairs exact negatives, independent across
    examples; tolerances: five standard errors under independent N(0, 1) draws."""
    energy = VAEEnergy(TinyVAE(latent_dim=8), num_samples=8, seed=5)
    x = torch.rand(2000, 8, generator=torch.Generator(device="cpu").manual_seed(0))
    (eps,) = energy.extras(x)  # (2000, 8, 8): samples 4..7 are -(samples 0..3)
    assert torch.equal(eps[:, 4:], -eps[:, :4])
    free = eps[:, :4].double()
    m = free.numel()
    assert abs(float(free.mean())) <= 5 / math.sqrt(m)
    assert abs(float(free.var()) - 1) <= 5 * math.sqrt(2 / m)
    assert abs(float((free[1:] * free[:-1]).mean())) <= 5 / math.sqrt(free[1:].numel())
    (odd,) = VAEEnergy(TinyVAE(latent_dim=8), num_samples=3).extras(x[:4])
    assert odd.shape == (4, 3, 8) and not torch.equal(odd[:, 1], -odd[:, 0])


def test_vae_kernel_saved_with_the_old_noise_draw_is_refused(tmp_path):
    vae = TinyVAE()
    path = tmp_path / "vae.nfk"
    LowRankNFK(VAEEnergy(vae), k=2, n_iter=1).fit(torch.rand(24, 8)).save(path)
    state = torch.load(path, weights_only=True)
    del state["energy_settings"]["noise_version"]  # as lightning-nfk 0.1.0.dev0 saved it
    torch.save(state, path)
    with pytest.raises(
        ValueError,
        match=r"noise_version=None \(the energy has 2\).*fitted by an older lightning-nfk: fit "
        "again and save",
    ):
        LowRankNFK.load(path, VAEEnergy(vae))


def test_vae_elbo_value_gaussian():
    vae = TinyVAE()
    energy = VAEEnergy(vae, likelihood="gaussian", gaussian_std=0.5, num_samples=1)
    x = torch.rand(4, 8)
    (eps,) = energy.extras(x)
    mu, logvar, mean = vae(x, eps[:, 0])
    ll = -0.5 * (((x - mean) / 0.5) ** 2 + math.log(2 * math.pi * 0.25)).sum(1)
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
    torch.testing.assert_close(energy.score(vae, x, eps), ll - kl)


def test_gan_samples_are_sharded_without_overlap():
    energy = GANEnergy(
        tiny_discriminator(), TinyGenerator(), latent_dim=4, num_samples=37, batch_size=5
    )
    kw = {"device": torch.device("cpu"), "dtype": torch.float32}
    full = torch.cat(list(energy.sample_batches(rank=0, world_size=1, **kw)))
    shards = [torch.cat(list(energy.sample_batches(rank=r, world_size=3, **kw))) for r in range(3)]
    assert full.shape == (37, 1, 8, 8)
    assert [len(s) for s in shards] == [12, 12, 13]  # contiguous, unpadded: bounds r * 37 // 3
    # The shards run the generator on other batch shapes (5, 5, 2 | 5, 5, 2 | 5, 5, 3 against
    # seven 5s and a 2), so the float32 GEMMs may take other kernels: equal up to round-off
    # of dot products of length <= 32 (the hidden width), relative to the outputs' scale
    # (tanh, <= 1). A shifted, overlapping or missing sample differs by O(1).
    eps, scale = torch.finfo(full.dtype).eps, full.abs().max().item()
    torch.testing.assert_close(torch.cat(shards), full, rtol=32 * eps, atol=32 * eps * scale)


def test_gan_custom_latent_sampler():
    energy = GANEnergy(
        tiny_discriminator(),
        TinyGenerator(),
        latent_sampler=lambda n, g: torch.rand(n, 4, generator=g) * 2 - 1,
        num_samples=8,
    )
    h = energy.latents()
    assert h.shape == (8, 4) and h.min() >= -1 and h.max() <= 1
    bad = GANEnergy(
        tiny_discriminator(),
        TinyGenerator(),
        latent_sampler=lambda n, g: torch.rand(3, 4),
        num_samples=8,
    )
    with pytest.raises(ValueError, match=r"`latent_sampler` returned 3 latents; 8 were asked"):
        bad.latents()


@pytest.mark.parametrize(
    ("factory", "error", "match"),
    [
        (
            lambda: ClassifierEnergy("net"),
            TypeError,
            r"`module` must be a torch.nn.Module, got str",
        ),
        (
            lambda: ClassifierEnergy(nn.ReLU()),
            ValueError,
            r"`module` has no parameter with requires_grad=True",
        ),
        (
            lambda: GANEnergy(tiny_discriminator(), "g", latent_dim=4),
            TypeError,
            r"`generator` must be a torch.nn.Module, got str",
        ),
        (
            lambda: GANEnergy(tiny_discriminator(), TinyGenerator()),
            ValueError,
            r"Give exactly one of `latent_dim` and `latent_sampler`",
        ),
        (
            lambda: GANEnergy(
                tiny_discriminator(), TinyGenerator(), 4, latent_sampler=lambda n, g: None
            ),
            ValueError,
            r"Give exactly one",
        ),
        (
            lambda: GANEnergy(tiny_discriminator(), TinyGenerator(), 4, num_samples=0),
            ValueError,
            r"`num_samples` must be a positive integer, got 0",
        ),
        (
            lambda: VAEEnergy(nn.Linear(3, 3)),
            TypeError,
            r"`vae` \(Linear\) must have a method `encode`",
        ),
        (
            lambda: VAEEnergy(TinyVAE(), likelihood="poisson"),
            ValueError,
            r"`likelihood` must be 'bernoulli' or 'gaussian', got 'poisson'",
        ),
        (
            lambda: VAEEnergy(TinyVAE(), num_samples=0),
            ValueError,
            r"`num_samples` must be a positive integer, got 0",
        ),
        (
            lambda: VAEEnergy(TinyVAE(), gaussian_std=0.0),
            ValueError,
            r"`gaussian_std` must be positive, got 0.0",
        ),
    ],
    ids=[
        "not-module",
        "no-params",
        "gen-not-module",
        "no-latent",
        "both-latent",
        "zero-samples",
        "vae-protocol",
        "likelihood",
        "vae-samples",
        "gaussian-std",
    ],
)
def test_invalid_energy_arguments(factory, error, match):
    with pytest.raises(error, match=match):
        factory()


def test_vae_latent_dim_missing():
    class NoDim(TinyVAE):
        pass

    vae = NoDim()
    del vae.latent_dim
    with pytest.raises(
        ValueError, match=r"`latent_dim` is None and the VAE has no attribute `latent_dim`"
    ):
        _VAE(vae)


class GaussianModel(nn.Module):
    """A diagonal Gaussian density with learned mean and log standard deviation."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.randn(dim))
        self.log_std = nn.Parameter(0.3 * torch.randn(dim))

    def log_prob(self, x):
        z = (x - self.mu) / self.log_std.exp()
        return (-0.5 * z**2 - self.log_std - 0.5 * math.log(2 * math.pi)).sum(dim=1)


class LogLikelihoodEnergy(Energy):
    """The docstring's example: the classical Fisher kernel of a density model."""

    centring = "data"
    fisher = "data"

    def score(self, module, x, *extras):
        return module.log_prob(x)


def test_user_energy_classical_fisher_kernel_matches_closed_form():
    torch.manual_seed(0)
    model = GaussianModel(3).double()
    x = torch.randn(50, 3, dtype=torch.float64) * 2 + 1
    nfk = LowRankNFK(LogLikelihoodEnergy(model), k=3, oversample=3, strategy="dense").fit(x)
    # closed-form scores: d/dmu = (x - mu) / s^2, d/dlog_std = z^2 - 1
    s = model.log_std.detach().exp()
    z = (x - model.mu.detach()) / s
    g = torch.cat([z / s, z**2 - 1], dim=1)
    u = g - g.mean(0)
    v = u / torch.sqrt(u.square().mean(0) + 1e-8)
    sigma = torch.linalg.svdvals(v)[:3]
    # dense path (eigh of the Gram matrix) against an SVD: float64 round-off of sums over
    # the n = 50 examples, relative to sigma_1
    n, eps = len(x), torch.finfo(sigma.dtype).eps
    torch.testing.assert_close(
        nfk.singular_values, sigma, rtol=n * eps, atol=n * eps * sigma[0].item()
    )
