"""GANEnergy's options (``score``, ``generator_mode``) on the AFV residual GAN (spectral
norm), against a dense float64 reference written here with torch.func."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, grad, vmap

from lightning_nfk.kernel import GANEnergy, LowRankNFK
from lightning_nfk.models import ResNetDiscriminator, ResNetGenerator

N, LATENT, SAMPLES, BATCH = 24, 4, 30, 8


def _gan(seed: int = 0) -> tuple[ResNetDiscriminator, ResNetGenerator]:
    torch.manual_seed(seed)
    d = ResNetDiscriminator(channels=1, width=4, image_size=28).double()
    g = ResNetGenerator(latent_dim=LATENT, channels=1, width=4, image_size=28).double()
    d.train()
    for _ in range(3):  # spectral norm's power iteration moves u, v off their init
        d(torch.randn(2, 1, 28, 28, dtype=torch.float64))
    g.train()
    g(torch.randn(16, LATENT, dtype=torch.float64))  # BatchNorm running statistics
    return d.eval(), g.eval()


def _reference_gradients(d, x: torch.Tensor, score: str) -> torch.Tensor:
    params = {k: v.detach() for k, v in d.named_parameters()}

    def s(p, xi):
        logit = functional_call(d, p, (xi[None],)).reshape(())
        return torch.sigmoid(logit) if score == "sigmoid" else logit

    grads = vmap(grad(s), in_dims=(None, 0))(params, x)
    return torch.cat([grads[k].reshape(x.shape[0], -1) for k in params], dim=1)


def _reference_samples(g, latents: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "eval":
        with torch.no_grad():
            return g(latents)
    out = []
    for h in latents.split(BATCH):  # batch statistics, batch by batch as the energy draws
        with torch.no_grad():
            out.append(copy.deepcopy(g).train()(h))
    return torch.cat(out)


@pytest.mark.parametrize(
    ("score", "mode"), [("logit", "eval"), ("sigmoid", "eval"), ("sigmoid", "train")]
)
def test_gan_options_match_the_float64_reference(score, mode):
    d, g = _gan()
    energy = GANEnergy(
        d, g, LATENT, num_samples=SAMPLES, batch_size=BATCH, score=score, generator_mode=mode
    )
    x = torch.randn(N, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    running = [b.clone() for b in g.buffers()]
    nfk = LowRankNFK(energy, k=4, strategy="dense").fit(x)
    # the generator's running statistics are left as they were, whatever the mode
    for before, after in zip(running, g.buffers()):
        torch.testing.assert_close(after, before, rtol=0, atol=0)

    gs = _reference_gradients(d, _reference_samples(g, energy.latents().double(), mode), score)
    z = gs.mean(0)
    fisher = (gs - z).square().mean(0)
    v = (_reference_gradients(d, x, score) - z) / torch.sqrt(fisher + nfk.config.damping)
    sigma = torch.linalg.svdvals(v)[:4]
    tol = 1e-9
    torch.testing.assert_close(nfk.mean_score, z, rtol=tol, atol=tol * z.abs().max().item())
    torch.testing.assert_close(
        nfk.fisher_diagonal, fisher, rtol=tol, atol=tol * fisher.max().item()
    )
    torch.testing.assert_close(nfk.singular_values, sigma, rtol=1e-8, atol=0)


def test_sigmoid_and_train_mode_change_the_kernel_and_are_recorded():
    d, g = _gan()
    x = torch.randn(N, 1, 28, 28, dtype=torch.float64)
    fits = {
        (s, m): LowRankNFK(
            GANEnergy(
                d, g, LATENT, num_samples=SAMPLES, batch_size=BATCH, score=s, generator_mode=m
            ),
            k=4,
            strategy="dense",
        ).fit(x)
        for s, m in (("logit", "eval"), ("sigmoid", "eval"), ("logit", "train"))
    }
    base = fits["logit", "eval"].singular_values
    for key in (("sigmoid", "eval"), ("logit", "train")):
        assert (fits[key].singular_values - base).abs().max() > 1e-3 * base[0]
    assert GANEnergy(d, g, LATENT).settings() == {"parameters": None}  # as before the option
    assert GANEnergy(d, g, LATENT, score="sigmoid").settings()["score"] == "sigmoid"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"score": "prob"}, r"`score` must be 'logit' or 'sigmoid', got 'prob'"),
        ({"generator_mode": "batch"}, r"`generator_mode` must be 'eval' or 'train', got 'batch'"),
    ],
)
def test_bad_options(kwargs, match):
    d, g = _gan()
    with pytest.raises(ValueError, match=match):
        GANEnergy(d, g, LATENT, **kwargs)


def test_the_afv_discriminator_has_the_papers_size():
    d = ResNetDiscriminator(channels=3, width=256, image_size=32)
    assert round(sum(p.numel() for p in d.parameters()) / 1e6, 1) == 5.9
    x = torch.randn(2, 3, 32, 32)
    assert d(x).shape == (2,) and d.pooled_features(x).shape == (2, 4 * 256)
    g = ResNetGenerator(latent_dim=8, channels=3, width=8, image_size=32)
    assert g(torch.randn(2, 8)).shape == (2, 3, 32, 32)


class _AFVConv(torch.nn.Module):  # AFV's ConvD, its spectral norm folded into the weight
    def __init__(self, sn_conv: torch.nn.Module) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(
            sn_conv.in_channels, sn_conv.out_channels, sn_conv.kernel_size, 1, sn_conv.padding
        ).double()
        with torch.no_grad():
            self.conv.weight.copy_(sn_conv.weight)  # the normalised weight (eval mode)
            self.conv.bias.copy_(sn_conv.bias)

    def forward(self, x):
        return self.conv(x)


class _AFVBlock(torch.nn.Module):
    """apple/ml-afv's ``ResBlockDpre`` as written there (its ReLUs in place), with the
    weights of one of our blocks."""

    def __init__(self, ours, down: bool, first: bool) -> None:
        super().__init__()
        pool = torch.nn.AvgPool2d(2) if down else torch.nn.Sequential()
        first_relu = torch.nn.Sequential() if first else torch.nn.ReLU(True)
        self.conv = torch.nn.Sequential(
            first_relu,
            _AFVConv(ours.conv[0]),
            torch.nn.ReLU(True),
            _AFVConv(ours.conv[2]),
            pool,
        )
        self.shortcut = torch.nn.Sequential(_AFVConv(ours.shortcut[0]), pool)

    def forward(self, x):
        return self.conv(x) + self.shortcut(x)


def test_the_discriminator_computes_afvs_function():
    """AFV's blocks' leading ReLU is in place and runs before the shortcut reads its input,
    so its shortcut sees ReLU(x): the same logit and pooled features as AFV's
    ``Discriminator32`` (``forward`` before its sigmoid, ``get_pool``) with our weights."""
    torch.manual_seed(0)
    d = ResNetDiscriminator(channels=3, width=8, image_size=32).double()
    d.train()
    for _ in range(3):  # move spectral norm's vectors off their init
        d(torch.randn(4, 3, 32, 32, dtype=torch.float64))
    d.eval()
    blocks = torch.nn.ModuleList(
        _AFVBlock(b, down=i < 2, first=i == 0) for i, b in enumerate(d.blocks)
    )
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)

    def afv_logit(x):
        for block in blocks:
            x = block(x)
        pooled = torch.nn.AvgPool2d(8)(torch.nn.ReLU(True)(x)).flatten(1)
        return torch.nn.functional.linear(pooled, d.out.weight, d.out.bias)[:, 0]

    def afv_get_pool(x):
        outs = []
        for block in blocks:
            x = block(x)
            outs.append(x.mean(dim=-1).mean(dim=-1))
        return torch.cat(outs, dim=1)

    with torch.no_grad():
        torch.testing.assert_close(d(x), afv_logit(x.clone()), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            d.pooled_features(x), afv_get_pool(x.clone()), rtol=1e-12, atol=1e-12
        )
