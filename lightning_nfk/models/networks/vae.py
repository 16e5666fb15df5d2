"""A convolutional VAE exposing ``encode`` and ``decode`` (the VAEEnergy protocol)."""

from __future__ import annotations

from torch import Tensor, nn


class ConvVAE(nn.Module):
    """Encoder: two strided convolutions and a linear head to ``(mu, logvar)``; decoder:
    the mirror image, returning Bernoulli logits (or Gaussian means) shaped like the input.

    Args:
        channels: image channels.
        latent_dim: latent size.
        width: channels of the first feature map.
        image_size: 28 or 32.
    """

    def __init__(
        self, channels: int = 1, latent_dim: int = 16, width: int = 32, image_size: int = 28
    ) -> None:
        super().__init__()
        if image_size not in (28, 32):
            raise ValueError(f"`image_size` must be 28 or 32, got {image_size}.")
        self.latent_dim = latent_dim
        s = image_size // 4
        self.s, self.c = s, 2 * width
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1),  # (B, w, S/2, S/2)
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 4, 2, 1),  # (B, 2w, S/4, S/4)
            nn.ReLU(),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width * s * s, 2 * latent_dim)
        self.project = nn.Linear(latent_dim, 2 * width * s * s)
        self.decoder = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1),  # (B, w, S/2, S/2)
            nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, 2, 1),  # (B, C, S, S)
        )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.head(self.encoder(x)).chunk(2, dim=1)  # each (B, latent_dim)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        y = self.project(z).view(z.shape[0], self.c, self.s, self.s)  # (B, 2w, S/4, S/4)
        return self.decoder(y)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction parameters from the posterior mean."""
        return self.decode(self.encode(x)[0])
