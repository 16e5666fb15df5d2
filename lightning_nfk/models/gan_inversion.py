"""GAN inversion through the NFK (Zhang et al., ICLR 2022, Fig. 4 and its appendix).

Sample latents :math:`h \\sim N(0, I)`, embed the generated images :math:`G(h)` with a
low-rank NFK of the discriminator (:math:`k` components, the latent size in the paper),
and fit a linear map :math:`W` from the embeddings to the latents by least squares. Any
image then has a latent, :math:`\\hat h(x) = [e(x), 1] W`, and a reconstruction
:math:`G(\\hat h(x))`: if the NFK embedding keeps what the generator encodes, real images
come back close to themselves, without any optimisation per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_nfk.kernel import GANEnergy, LowRankNFK, kernel_mode
from lightning_nfk.kernel.config import check_int


@dataclass(frozen=True)
class GANInversion:
    """A fitted inversion: the NFK of the generated images and the linear map to latents.

    Attributes:
        energy: the GAN's energy: its generator (and ``generator_mode``) makes the images.
        nfk: the discriminator's NFK, fitted on the generated images.
        weight: ``(k + 1, latent_dim)`` least-squares map from ``[e(x), 1]`` to ``h``.
        train_error: mean squared error of the map's latents on the fitting samples, per
            latent coordinate (the prior's variance is 1: 1.0 means nothing is explained).
    """

    energy: GANEnergy
    nfk: LowRankNFK
    weight: Tensor
    train_error: float

    def latents(self, x: Tensor) -> Tensor:
        """:math:`\\hat h(x) = [e(x), 1] W`, shape ``(n, latent_dim)``, on the CPU in float64."""
        e = self.nfk.transform(x).to(self.weight.device, self.weight.dtype)
        return _with_ones(e) @ self.weight

    def reconstruct(self, x: Tensor) -> Tensor:
        """:math:`G(\\hat h(x))`, drawn as the fitting images were (the energy's generator
        and ``generator_mode``, in its ``batch_size``), without gradients."""
        return _generate(self.energy, self.latents(x))


def invert_gan(
    energy: GANEnergy,
    num_samples: int = 10000,
    k: int | None = None,
    *,
    ridge: float = 1e-6,
    seed: int = 1,
    **nfk_options: object,
) -> GANInversion:
    """Fit :class:`GANInversion` for the GAN of ``energy`` (its discriminator's NFK, its
    generator and latent prior).

    Args:
        energy: the GAN's NFK; its own generator samples give the statistics, as always.
        num_samples: generated images the NFK and the map are fitted on.
        k: NFK components (default: the latent size, as the paper).
        ridge: L2 strength of the least squares, relative to the mean squared embedding.
        seed: seed of the fitting latents (the energy's statistics use the energy's seed).
        nfk_options: further :class:`LowRankNFK` options (``n_iter``, ``strategy``, ...).

    Raises:
        ValueError: a standard-normal latent size is needed (``latent_dim``), or a count is
            not positive.
    """
    if energy.latent_dim is None:
        raise ValueError(
            "`energy` must draw standard-normal latents (`latent_dim`), the prior whose "
            "samples the map is fitted on; got a `latent_sampler`."
        )
    check_int("num_samples", num_samples, 2)
    k = energy.latent_dim if k is None else k
    check_int("k", k, 1)
    if not ridge >= 0:
        raise ValueError(f"`ridge` must be a number >= 0, got {ridge!r}.")
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(num_samples, energy.latent_dim, generator=g, device="cpu")
    images = _generate(energy, h)
    nfk = LowRankNFK(energy, k=k, **nfk_options)
    e = nfk.fit_transform(images).double().cpu()
    a = _with_ones(e)
    gram = a.T @ a
    scale = ridge * float(e.square().mean()) * num_samples
    penalty = torch.eye(k + 1, dtype=gram.dtype, device=gram.device) * scale
    penalty[-1, -1] = 0.0  # the intercept is not penalised
    weight = torch.linalg.solve(gram + penalty, a.T @ h.double())
    error = float((a @ weight - h.double()).square().mean())
    return GANInversion(energy, nfk, weight, error)


def _generate(energy: GANEnergy, h: Tensor) -> Tensor:
    """The energy's images of the latents ``h``, in its batches, on the generator's device
    and dtype; train/eval flags restored."""
    param = next(energy.generator.parameters())
    with kernel_mode(energy.generator), torch.no_grad():
        parts = [
            energy.generate(hb.to(param.device, param.dtype)) for hb in h.split(energy.batch_size)
        ]
    return torch.cat(parts)


def _with_ones(e: Tensor) -> Tensor:
    return torch.cat([e, torch.ones(e.shape[0], 1, dtype=e.dtype, device=e.device)], dim=1)


__all__ = ["GANInversion", "invert_gan"]
