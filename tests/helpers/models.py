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
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_nfk.kernel import (
    ClassifierEnergy,
    Energy,
    GANEnergy,
    NTKEnergy,
    SequenceEnergy,
    VAEEnergy,
)
from lightning_nfk.models import GPT, ViT


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
    elif name == "vit":
        energy = ClassifierEnergy(
            ViT(image_size=8, patch_size=4, channels=1, num_classes=5, dim=8, depth=2, heads=2)
        )
        shape = (1, 8, 8)
    elif name == "gpt":
        energy = SequenceEnergy(GPT(vocab_size=11, context=10, dim=8, depth=2, heads=2))
        energy = energy.to(torch.float64)
        return Case(name, energy, *padded_tokens(n + 8, 11, 10, g).split([n, 8]))
    else:
        raise KeyError(name)
    energy = energy.to(torch.float64)
    x = torch.randn(n + 8, *shape, generator=g, dtype=torch.float64)
    if name == "vae":
        x = torch.rand(
            n + 8, *shape, generator=g, dtype=torch.float64
        )  # Bernoulli targets in [0, 1]
    return Case(name, energy, x[:n], x[n:])


def padded_tokens(n: int, vocab: int, t: int, g: torch.Generator) -> Tensor:
    """(n, 2, t) packed token inputs (ids over mask): lengths 3..t, a third right-padded,
    a third left-padded, the rest full; pad id 0."""
    ids = torch.randint(1, vocab, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    for i in range(n):
        cut = t - int(lengths[i])
        if i % 3 == 0 and cut:
            mask[i, t - cut :] = 0
        elif i % 3 == 1 and cut:
            mask[i, :cut] = 0
    return torch.stack([ids * mask, mask], dim=1)


def sequence_log_likelihood(logits_fn, xi: Tensor) -> Tensor:
    """sum over t >= 1 with real x_t and x_{t-1} of log p(x_t | x_<t), for one packed
    example (2, T); ``logits_fn(ids, mask, positions) -> (T, V)``."""
    ids, mask = xi[0], xi[1]
    positions = (mask.cumsum(0) - 1).clamp_min(0)
    logp = torch.log_softmax(logits_fn(ids, mask, positions)[:-1], dim=-1)
    token = logp[torch.arange(ids.shape[0] - 1), ids[1:]]
    keep = (mask[1:] == 1) & (mask[:-1] == 1)
    return torch.where(keep, token, torch.zeros_like(token)).sum()


def _scalar_fn(case: Case):
    """s(params, x_i, *extras) for one example, written independently of the energies."""
    e = case.energy
    m = e.module
    if case.name == "gpt":

        def ll(p, xi):
            def logits(ids, mask, positions):
                kw = {"attention_mask": mask[None], "position_ids": positions[None]}
                return functional_call(m, p, (ids[None],), kw)[0]

            return sequence_log_likelihood(logits, xi)

        return ll
    if case.name in ("mlp", "cnn", "vit"):
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
    # SDPA's math backend: vmap has no batching rule for the fused CPU kernel
    with sdpa_kernel(SDPBackend.MATH):
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
