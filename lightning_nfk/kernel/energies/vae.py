"""VAE energy: the ELBO with per-example noise frozen (Zhang et al., ICLR 2022, Eq. 2)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_nfk.kernel.energies.base import Energy
from lightning_nfk.kernel.energies.frozen_noise import frozen_normal

# The way the frozen noise is drawn (a saved kernel embeds with the noise of its fit):
# 1 = a CPU generator per example seeded by a BLAKE2b hash (lightning-nfk 0.1.0.dev0);
# 2 = Philox4x32-10 keyed by a universal hash, on the example's device (frozen_noise).
NOISE_VERSION = 2


class VAEEnergy(Energy):
    """NFK of a VAE: :math:`s_\\theta(x) = \\mathrm{ELBO}(x)`, :math:`\\theta` = all VAE parameters.

    .. math::

        \\mathrm{ELBO}(x) = \\frac{1}{S}\\sum_{s=1}^S \\log p_\\theta(x \\mid
        \\mu(x) + \\sigma(x) \\odot \\epsilon_s(x)) - \\mathrm{KL}(q(z\\mid x) \\,\\|\\, N(0, I))

    The noise :math:`\\epsilon_s(x)` is *frozen*: a counter-based generator (Philox4x32-10)
    keyed by a hash of the example's float32 bits and ``seed``
    (:mod:`~lightning_nfk.kernel.energies.frozen_noise`), drawn batched on the example's
    device, so the score is a fixed function of the parameters in every pass, on every
    process and device, for any batching and for float32 and float64 runs alike: the noise
    is bit-identical in all of them. By default no centring (:math:`z = 0`) and the
    diagonal Fisher over the fitting data.

    The defaults, ``S = 8`` samples in antithetic pairs, come from measurement
    (``experiments/vae_kernel.py``; the figures are in EXPERIMENTS.md): the frozen noise
    is per-example randomness that the kernel picks up, and with one sample it dominates
    the kernel; several antithetic samples average it out at a proportional fit time,
    while centring, the Fisher normalisation and the choice of parameters matter far less.

    What the VAE must expose:

    * ``encode(x) -> (mu, logvar)``, each of shape ``(B, latent_dim)``;
    * ``decode(z) -> params`` of the likelihood, the shape of ``x``: Bernoulli *logits* or
      the Gaussian *mean*.

    Args:
        vae: the VAE module.
        latent_dim: latent size; ``None`` reads ``vae.latent_dim``.
        likelihood: ``"bernoulli"`` (inputs in [0, 1]) or ``"gaussian"``.
        gaussian_std: the fixed standard deviation of the Gaussian likelihood.
        num_samples: noise samples per example, :math:`S` (each costs one decoder pass per
            example in every pass of the fit).
        seed: seed mixed into the per-example noise.
        centring: ``None`` (the default, :math:`z = 0`: the expected score of a model under
            its own distribution is zero) or ``"data"`` (subtract the mean score over the
            fitting data, which a finite-trained VAE does not bring to zero).
        fisher: ``"data"`` (the default, the diagonal Fisher over the fitting data) or
            ``None`` (no normalisation: :math:`V_x = U_x`, every parameter weighted by the
            size of its gradients rather than given unit variance).
        antithetic: draw the noise in pairs :math:`(\\epsilon, -\\epsilon)`: the same
            expectation (the ELBO), and the odd-order terms of the noise cancel in every
            pair, so the score and its gradient carry less of the per-example randomness.
            ``None`` (the default): pairs whenever ``num_samples`` is even; ``True`` with an
            odd ``num_samples`` is refused.
        parameters: names (prefixes) of the VAE's parameters that define the kernel, e.g.
            ``("encoder", "head")``; ``None``: all trainable parameters (the paper's).

    Raises:
        TypeError: if ``vae`` lacks ``encode``/``decode``, ``antithetic`` is not a bool or
            None, or ``parameters`` is not a sequence of strings.
        ValueError: for an unknown likelihood, centring or Fisher source, a non-positive
            size, ``antithetic=True`` with an odd ``num_samples``, or ``parameters`` that
            select no trainable parameter.
    """

    centring = None
    fisher = "data"

    def __init__(
        self,
        vae: nn.Module,
        latent_dim: int | None = None,
        *,
        likelihood: Literal["bernoulli", "gaussian"] = "bernoulli",
        gaussian_std: float = 1.0,
        num_samples: int = 8,
        seed: int = 0,
        centring: Literal["data"] | None = None,
        fisher: Literal["data"] | None = "data",
        antithetic: bool | None = None,
        parameters: Sequence[str] | None = None,
    ) -> None:
        super().__init__(vae, parameters=parameters)
        for name, value in (("centring", centring), ("fisher", fisher)):
            if value not in (None, "data"):
                raise ValueError(f"`{name}` must be None or 'data', got {value!r}.")
        self.centring = centring
        self.fisher = fisher
        for method in ("encode", "decode"):
            if not callable(getattr(vae, method, None)):
                raise TypeError(
                    f"`vae` ({type(vae).__name__}) must have a method `{method}`: VAEEnergy needs "
                    "encode(x) -> (mu, logvar) and decode(z) -> likelihood parameters."
                )
        if latent_dim is None:
            latent_dim = getattr(vae, "latent_dim", None)
            if latent_dim is None:
                raise ValueError(
                    "`latent_dim` is None and the VAE has no attribute `latent_dim`: pass it."
                )
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"`likelihood` must be 'bernoulli' or 'gaussian', got {likelihood!r}.")
        for name, value in (("latent_dim", latent_dim), ("num_samples", num_samples)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if antithetic is None:
            antithetic = num_samples % 2 == 0
        if not isinstance(antithetic, bool):
            raise TypeError(f"`antithetic` must be a bool or None, got {antithetic!r}.")
        if antithetic and num_samples % 2:
            raise ValueError(
                f"`antithetic=True` draws the noise in pairs: `num_samples` must be even, got "
                f"{num_samples}."
            )
        if not gaussian_std > 0:
            raise ValueError(f"`gaussian_std` must be positive, got {gaussian_std!r}.")
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.gaussian_std = float(gaussian_std)
        self.num_samples = num_samples
        self.antithetic = antithetic
        self.seed = seed

    def settings(self) -> dict[str, object]:
        return {
            **super().settings(),
            "likelihood": self.likelihood,
            "gaussian_std": self.gaussian_std,
            "num_samples": self.num_samples,
            "antithetic": self.antithetic,
            "seed": self.seed,
            "centring": self.centring,
            "fisher": self.fisher,
            "noise_version": NOISE_VERSION,
        }

    def extras(self, x: Tensor) -> tuple[Tensor, ...]:
        """The frozen noise :math:`\\epsilon(x)`, shape ``(B, num_samples, latent_dim)``, on
        ``x``'s device in ``x``'s dtype (drawn in float64 there, no host copy; on MPS, which
        has no float64, on the CPU)."""
        draws = self.num_samples // 2 if self.antithetic else self.num_samples
        work = x.cpu() if x.device.type == "mps" else x
        eps = frozen_normal(work, self.seed, draws * self.latent_dim)
        eps = eps.reshape(x.shape[0], draws, self.latent_dim)
        if self.antithetic:
            eps = torch.cat([eps, -eps], dim=1)  # samples s and s + S/2 are a pair
        return (eps.to(device=x.device, dtype=x.dtype),)

    def score(self, module: nn.Module, x: Tensor, *extras: Tensor) -> Tensor:
        (eps,) = extras
        b, s, d = eps.shape
        mu, logvar = module.encode(x)
        z = mu[:, None, :] + torch.exp(0.5 * logvar)[:, None, :] * eps  # (B, S, d)
        params = module.decode(z.reshape(b * s, d))  # (B*S, ...) like x
        target = x.unsqueeze(1).expand(b, s, *x.shape[1:]).reshape(b * s, *x.shape[1:])
        if self.likelihood == "bernoulli":
            ll = -F.binary_cross_entropy_with_logits(params, target, reduction="none")
        else:
            var = self.gaussian_std**2
            ll = -0.5 * ((target - params) ** 2 / var + math.log(2 * math.pi * var))
        ll = ll.reshape(b, s, -1).sum(dim=2).mean(dim=1)  # (B,)
        kl = 0.5 * (mu**2 + torch.exp(logvar) - 1.0 - logvar).sum(dim=1)  # (B,)
        return ll - kl
