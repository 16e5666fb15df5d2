"""invert_gan: the NFK of generated images, a least-squares map to the latents."""

from __future__ import annotations

import pytest
import torch

from lightning_nfk.kernel import GANEnergy
from lightning_nfk.models import GANInversion, invert_gan
from tests.helpers.models import TinyGenerator, tiny_discriminator


def _energy(**kwargs) -> GANEnergy:
    torch.manual_seed(0)
    return GANEnergy(tiny_discriminator(), TinyGenerator(), **{"latent_dim": 4, **kwargs})


def test_the_map_is_the_least_squares_fit_of_the_latents():
    energy = _energy(num_samples=64).to(torch.float64)
    inv = invert_gan(energy, num_samples=80, k=6, ridge=0.0, seed=3, strategy="dense")
    assert isinstance(inv, GANInversion) and inv.weight.shape == (7, 4)
    # the same latents and images, fitted independently with lstsq
    h = torch.randn(80, 4, generator=torch.Generator().manual_seed(3)).double()
    with torch.no_grad():
        images = energy.generator.eval()(h)
    e = inv.nfk.transform(images)
    a = torch.cat([e, torch.ones(80, 1, dtype=e.dtype)], dim=1)
    expected = torch.linalg.lstsq(a, h).solution
    torch.testing.assert_close(inv.weight, expected, rtol=1e-6, atol=1e-8)
    error = float((a @ expected - h).square().mean())
    assert inv.train_error == pytest.approx(error, rel=1e-8)
    assert 0 < inv.train_error < 1  # the embedding explains part of the latents
    torch.testing.assert_close(inv.latents(images), a @ expected, rtol=1e-6, atol=1e-8)


def test_reconstruct_runs_the_generator_and_restores_its_mode():
    energy = _energy(num_samples=32)
    inv = invert_gan(energy, num_samples=40, n_iter=2)
    energy.generator.train()
    x = torch.randn(5, 1, 8, 8)
    out = inv.reconstruct(x)
    assert out.shape == (5, 1, 8, 8) and torch.isfinite(out).all()
    assert energy.generator.training  # restored
    with torch.no_grad():
        expected = energy.generator.eval()(inv.latents(x).float())
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 1}, r"`num_samples` must be >= 2, got 1"),
        ({"k": 0}, r"`k` must be >= 1, got 0"),
        ({"ridge": -1.0}, r"`ridge` must be a number >= 0, got -1.0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        invert_gan(_energy(), **kwargs)


def test_a_latent_sampler_is_refused():
    energy = GANEnergy(
        tiny_discriminator(),
        TinyGenerator(),
        latent_sampler=lambda n, g: torch.randn(n, 4, generator=g),
    )
    with pytest.raises(ValueError, match=r"`energy` must draw standard-normal latents"):
        invert_gan(energy)
