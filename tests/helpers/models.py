"""Tiny models for the kernel tests, and an independent float64 reference built with torch.func.

The reference does not use any of lightning_nfk.kernel's code paths: it computes
per-example gradients with ``vmap(grad(functional_call(...)))`` of scores written out
here, then the statistics and the SVD densely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_nfk.kernel import ClassifierEnergy, Energy, GANEnergy, NTKEnergy, VAEEnergy


def tiny_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)
    )


def tiny_cnn() -> nn.Module:
    """Conv + BatchNorm (with non-trivial running statistics) + Linear."""
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 4, 4, 4)
        nn.Flatten(),
        nn.Linear(64, 5),
    )
    bn = net[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return net


class TinyGenerator(nn.Module):
    def __init__(self, latent_dim: int = 4) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.net = nn.Sequential(nn.Linear(latent_dim, 32), nn.Tanh(), nn.Linear(32, 64), nn.Tanh())

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h).view(-1, 1, 8, 8)


def tiny_discriminator() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 4, 2, 1),  # (B, 4, 4, 4)
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(64, 1),
    )


class TinyVAE(nn.Module):
    """encode/decode for VAEEnergy; forward(x, eps) -> (mu, logvar, logits) for the reference."""

    def __init__(self, dim: int = 8, latent_dim: int = 3) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.enc = nn.Sequential(nn.Linear(dim, 10), nn.Tanh(), nn.Linear(10, 2 * latent_dim))
        self.dec = nn.Sequential(nn.Linear(latent_dim, 10), nn.Tanh(), nn.Linear(10, dim))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.enc(x).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        return self.dec(z)

    def forward(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        return mu, logvar, self.decode(mu + torch.exp(0.5 * logvar) * eps)


@dataclass
class Case:
    """A model family: its energy, fitting/held-out inputs and an independent score."""

    name: str
    energy: Energy
    x: Tensor
    x_new: Tensor


def make_case(name: str, n: int = 48, seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        energy: Energy = ClassifierEnergy(tiny_mlp())
        shape: tuple[int, ...] = (6,)
    elif name == "cnn":
        energy = ClassifierEnergy(tiny_cnn())
        shape = (1, 8, 8)
    elif name == "gan":
        energy = GANEnergy(
            tiny_discriminator(), TinyGenerator(), latent_dim=4, num_samples=40, batch_size=16
        )
        shape = (1, 8, 8)
    elif name == "vae":
        energy = VAEEnergy(TinyVAE())
        shape = (8,)
    elif name == "ntk":
        energy = NTKEnergy(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)))
        shape = (6,)
    else:
        raise KeyError(name)
    energy = energy.to(torch.float64)
    x = torch.randn(n + 8, *shape, generator=g, dtype=torch.float64)
    if name == "vae":
        x = torch.rand(
            n + 8, *shape, generator=g, dtype=torch.float64
        )  # Bernoulli targets in [0, 1]
    return Case(name, energy, x[:n], x[n:])


def _scalar_fn(case: Case):
    """s(params, x_i, *extras) for one example, written independently of the energies."""
    e = case.energy
    m = e.module
    if case.name in ("mlp", "cnn"):
        return lambda p, xi: torch.logsumexp(functional_call(m, p, (xi[None],))[0], dim=0)
    if case.name in ("gan", "ntk"):
        return lambda p, xi: functional_call(m, p, (xi[None],)).reshape(())

    def elbo(p, xi, eps):  # eps: (S, latent), the energy's frozen samples of this example
        xs = xi[None].expand(eps.shape[0], *xi.shape)
        mu, logvar, logits = functional_call(m, p, (xs, eps))
        ll = -F.binary_cross_entropy_with_logits(logits, xs, reduction="sum") / eps.shape[0]
        kl = 0.5 * (mu[0].square() + logvar[0].exp() - 1 - logvar[0]).sum()
        return ll - kl

    return elbo


def reference_gradients(case: Case, x: Tensor) -> Tensor:
    """Per-example gradients (n, P) in float64, parameter order of named_parameters()."""
    m = case.energy.module.eval()
    params = {k: v.detach() for k, v in m.named_parameters()}
    fn = _scalar_fn(case)
    if case.name == "vae":
        (eps,) = case.energy.extras(x)
        grads = vmap(grad(fn), in_dims=(None, 0, 0))(params, x, eps)
    else:
        grads = vmap(grad(fn), in_dims=(None, 0))(params, x)
    return torch.cat([grads[k].reshape(x.shape[0], -1) for k in params], dim=1)


@dataclass
class Reference:
    z: Tensor
    fisher: Tensor | None
    damping: float
    v: Tensor
    sigma: Tensor
    right: Tensor

    def fisher_vectors(self, g: Tensor) -> Tensor:
        u = g - self.z
        return u if self.fisher is None else u / torch.sqrt(self.fisher + self.damping)


def reference(case: Case, damping: float = 1e-8) -> Reference:
    """Dense float64 NFK of case.x, from the formulas of docs/design.md (section 1) directly."""
    g = reference_gradients(case, case.x)
    e = case.energy
    if case.name == "gan":
        with torch.no_grad():
            samples = e.generator.eval()(e.latents().double())
        gs = reference_gradients(case, samples)
        z = gs.mean(0)
        fisher = (gs - z).square().mean(0)
    elif case.name == "vae":
        z = torch.zeros_like(g[0])
        fisher = g.square().mean(0)
    elif case.name == "ntk":
        z, fisher = torch.zeros_like(g[0]), None
    else:
        z = g.mean(0)
        fisher = (g - z).square().mean(0)
    ref = Reference(z, fisher, damping, g, g, g)
    v = ref.fisher_vectors(g)
    _, sigma, vh = torch.linalg.svd(v, full_matrices=False)
    ref.v, ref.sigma, ref.right = v, sigma, vh.T
    return ref
