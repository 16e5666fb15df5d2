"""The residual GAN of adversarial Fisher vectors (Zhai et al., 2019; apple/ml-afv's
``models.py``), the GAN whose discriminator the NFK paper embeds (its "5.9M" row).

The discriminator: four residual blocks (the first two halve the resolution), spectral
normalisation on every convolution and on the output layer, ReLU, a global average pool and
one logit; the generator: a transposed convolution from the latent to a small map, residual
up-sampling blocks with BatchNorm, and a tanh image. At ``width=256`` on 32x32 RGB images the
discriminator has 5.9M parameters, as the paper's table says.

Differences from the AFV code, each deliberate: the discriminator returns the *logit* (AFV
ends in a sigmoid; :class:`~lightning_nfk.kernel.GANEnergy` and
:class:`~lightning_nfk.models.GANModule` apply the sigmoid where a loss or score needs it),
28x28 images are supported (two down- and two up-sampling stages instead of 32x32's), and
spectral norm is torch's parametrization (``torch.nn.utils.parametrizations``), whose eval
mode is a pure function of the weights: what per-example gradients need.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm


def _check(image_size: int, width: int, latent_dim: int | None = None) -> None:
    if image_size not in (28, 32):
        raise ValueError(f"`image_size` must be 28 or 32, got {image_size}.")
    for name, value in (("width", width), ("latent_dim", latent_dim)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _sn_conv(c_in: int, c_out: int, kernel: int = 3) -> nn.Module:
    return spectral_norm(nn.Conv2d(c_in, c_out, kernel, 1, kernel // 2))


class _DownBlock(nn.Module):
    """AFV's ``ResBlockDpre``: [ReLU], then conv3 ReLU conv3 [avgpool] + conv3 [avgpool].

    The leading ReLU (all blocks but the first) feeds *both* branches. In AFV's code it is
    in place (``nn.ReLU(True)``) at the head of the residual branch, which runs before the
    shortcut reads the same tensor, so AFV's shortcut sees the ReLU's output too: the
    function its trained models compute, and the one written out here.
    """

    def __init__(self, c_in: int, c_out: int, down: bool, first: bool) -> None:
        super().__init__()
        pool: nn.Module = nn.AvgPool2d(2) if down else nn.Identity()
        self.relu: nn.Module = nn.Identity() if first else nn.ReLU()
        self.conv = nn.Sequential(_sn_conv(c_in, c_out), nn.ReLU(), _sn_conv(c_out, c_out), pool)
        self.shortcut = nn.Sequential(_sn_conv(c_in, c_out), pool)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(x)
        return self.conv(x) + self.shortcut(x)


class _UpBlock(nn.Module):
    """AFV's ``ResBlockGpre``: BN ReLU up conv3 BN ReLU conv3 + up conv3."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(c, c, 3, 1, 1),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, 1, 1),
        )
        self.shortcut = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, 1, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + self.shortcut(x)


class ResNetDiscriminator(nn.Module):
    """Images ``(B, channels, S, S)`` to one logit per image, shape ``(B,)``; S = 28 or 32.

    Args:
        channels: image channels.
        width: channels of every block (AFV's ``ndf``; the paper's model: 256).
        image_size: 28 or 32.
    """

    def __init__(self, channels: int = 3, width: int = 128, image_size: int = 32) -> None:
        super().__init__()
        _check(image_size, width)
        self.blocks = nn.ModuleList(
            [
                _DownBlock(channels, width, down=True, first=True),
                _DownBlock(width, width, down=True, first=False),
                _DownBlock(width, width, down=False, first=False),
                _DownBlock(width, width, down=False, first=False),
            ]
        )
        self.relu = nn.ReLU()
        self.out = spectral_norm(nn.Linear(width, 1))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.out(self.relu(x).mean(dim=(2, 3)))[:, 0]

    def pooled_features(self, x: Tensor) -> Tensor:
        """Each block's output averaged over space, concatenated: ``(B, 4 * width)``, the
        activation baseline of the AFV paper (its ``get_pool``)."""
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x.mean(dim=(2, 3)))
        return torch.cat(outs, dim=1)


class ResNetGenerator(nn.Module):
    """Latents ``(B, latent_dim)`` to images ``(B, channels, S, S)`` in (-1, 1); S = 28 or 32.

    Args:
        latent_dim: latent size (AFV's ``nz``; the paper's model: 256).
        channels: image channels.
        width: channels of every block (AFV's ``ngf``).
        image_size: 28 (7x7 map, two up-sampling blocks) or 32 (4x4, three, as AFV).
    """

    def __init__(
        self, latent_dim: int = 128, channels: int = 3, width: int = 128, image_size: int = 32
    ) -> None:
        super().__init__()
        _check(image_size, width, latent_dim)
        self.latent_dim = latent_dim
        start, ups = (7, 2) if image_size == 28 else (4, 3)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(latent_dim, width, start, 1, 0),
            *(_UpBlock(width) for _ in range(ups)),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, channels, 3, 1, 1),
            nn.Tanh(),
        )

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h.reshape(h.shape[0], self.latent_dim, 1, 1))
