"""A GAN LightningModule (non-saturating loss, manual optimisation); NFK of the discriminator."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import OptimizerCallable
from torch import Tensor, nn

from lightning_nfk.kernel import Energy, GANEnergy


def _adam_gan(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999))


class GANModule(pl.LightningModule):
    """Alternating discriminator and generator steps with the non-saturating loss.

    The NFK is :class:`GANEnergy`: the discriminator's logit, centred and normalised with
    ``nfk_num_samples`` generator samples.

    Args:
        generator: latents ``(B, latent_dim)`` to images.
        discriminator: images to logits ``(B,)``.
        latent_dim: latent size (standard normal prior).
        optimizer_g, optimizer_d: optimizer factories (default Adam, lr 2e-4, betas 0.5/0.999).
        nfk_num_samples: generator samples for the NFK statistics.
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        latent_dim: int = 64,
        optimizer_g: OptimizerCallable = _adam_gan,
        optimizer_d: OptimizerCallable = _adam_gan,
        nfk_num_samples: int = 2048,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=["generator", "discriminator", "optimizer_g", "optimizer_d"]
        )
        self.automatic_optimization = False
        self.generator = generator
        self.discriminator = discriminator
        self.latent_dim = latent_dim
        self.optimizer_g = optimizer_g
        self.optimizer_d = optimizer_d
        self.nfk_num_samples = nfk_num_samples

    def forward(self, h: Tensor) -> Tensor:
        return self.generator(h)

    def nfk_energy(self) -> Energy:
        return GANEnergy(
            self.discriminator,
            self.generator,
            latent_dim=self.latent_dim,
            num_samples=self.nfk_num_samples,
        )

    def training_step(self, batch: tuple[Tensor, ...] | Tensor, batch_idx: int) -> None:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        opt_g, opt_d = self.optimizers()
        h = torch.randn(x.shape[0], self.latent_dim, device=x.device, dtype=x.dtype)
        fake = self.generator(h)

        d_loss = (
            F.softplus(-self.discriminator(x)).mean()
            + F.softplus(self.discriminator(fake.detach())).mean()
        )
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()

        g_loss = F.softplus(-self.discriminator(fake)).mean()  # non-saturating
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.log_dict({"train/d_loss": d_loss, "train/g_loss": g_loss}, prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, ...] | Tensor, batch_idx: int) -> None:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        self.log("val/d_real", torch.sigmoid(self.discriminator(x)).mean(), sync_dist=True)

    def configure_optimizers(self):
        return [
            self.optimizer_g(self.generator.parameters()),
            self.optimizer_d(self.discriminator.parameters()),
        ]
