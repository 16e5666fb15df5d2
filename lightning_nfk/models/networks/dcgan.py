"""DCGAN generator and discriminator (Radford et al. 2016) for 28x28 and 32x32 images."""

from __future__ import annotations

from torch import Tensor, nn


def _check_size(image_size: int) -> None:
    if image_size not in (28, 32):
        raise ValueError(f"`image_size` must be 28 or 32, got {image_size}.")


class DCGANGenerator(nn.Module):
    """Latent ``(B, latent_dim)`` to images ``(B, channels, S, S)`` in (-1, 1), S = 28 or 32.

    Args:
        latent_dim: latent size.
        channels: image channels.
        width: channels of the last hidden feature map (doubled at each coarser scale).
        image_size: 28 or 32.
    """

    def __init__(
        self, latent_dim: int = 64, channels: int = 1, width: int = 64, image_size: int = 28
    ) -> None:
        super().__init__()
        _check_size(image_size)
        self.latent_dim = latent_dim
        s0 = 7 if image_size == 28 else 8
        self.s0, self.c0 = s0, 2 * width
        self.project = nn.Sequential(
            nn.Linear(latent_dim, 2 * width * s0 * s0, bias=False),
            nn.BatchNorm1d(2 * width * s0 * s0),
            nn.ReLU(),
        )
        self.net = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1, bias=False),  # (B, w, 2 s0, 2 s0)
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, 2, 1),  # (B, C, 4 s0, 4 s0)
            nn.Tanh(),
        )

    def forward(self, h: Tensor) -> Tensor:
        y = self.project(h).view(h.shape[0], self.c0, self.s0, self.s0)  # (B, 2w, s0, s0)
        return self.net(y)


class DCGANDiscriminator(nn.Module):
    """Images ``(B, channels, S, S)`` to one logit per image, shape ``(B,)``.

    Strided convolutions with LeakyReLU; no BatchNorm, so its NFK needs no running
    statistics.
    """

    def __init__(self, channels: int = 1, width: int = 64, image_size: int = 28) -> None:
        super().__init__()
        _check_size(image_size)
        s = image_size // 4
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1),  # (B, w, S/2, S/2)
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1),  # (B, 2w, S/4, S/4)
            nn.LeakyReLU(0.2),
            nn.Flatten(),  # (B, 2w S^2 / 16)
            nn.Linear(2 * width * s * s, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[:, 0]
