"""A GAN LightningModule (non-saturating loss, manual optimisation); NFK of the discriminator."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_lightning.cli import OptimizerCallable
from torch import Tensor, nn

from lightning_nfk.kernel import Energy, GANEnergy
from lightning_nfk.kernel._data import first_tensor
from lightning_nfk.models._sampling import rank_normal


def _adam_gan(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999))


def _reach_every_parameter(module: nn.Module) -> Tensor | float:
    """Zero that depends on every trainable parameter of ``module``: added to a loss, it
    changes neither the loss nor any gradient but puts every parameter in the backward graph
    (one entry of each, so no sum of a whole parameter that could overflow in half precision).
    """
    return 0.0 * sum(p.reshape(-1)[0] for p in module.parameters() if p.requires_grad)


class GANModule(pl.LightningModule):
    """Alternating discriminator and generator steps with the non-saturating loss.

    The NFK is :class:`GANEnergy`: the discriminator's logit, centred and normalised with
    ``nfk_num_samples`` generator samples.

    Works under Lightning's plain ``ddp`` strategy (every backward reaches every parameter,
    see :meth:`training_step`): each rank draws its own rows of the global batch of
    latents, and the generator's buffers (BatchNorm running statistics) are broadcast from
    rank zero after every step, so that all ranks hold the same module.

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

    def probe_forward(self, x: Tensor) -> Tensor:
        """The forward that reads data examples (images): the discriminator's. What
        :class:`~lightning_nfk.callbacks.LinearProbeCallback` runs for layer features, since
        ``forward`` maps latents to images."""
        return self.discriminator(x)

    def nfk_energy(self) -> Energy:
        return GANEnergy(
            self.discriminator,
            self.generator,
            latent_dim=self.latent_dim,
            num_samples=self.nfk_num_samples,
        )

    def training_step(self, batch: tuple[Tensor, ...] | Tensor, batch_idx: int) -> None:
        x = first_tensor(batch)
        opt_g, opt_d = self.optimizers()
        world, rank = self.trainer.world_size, self.trainer.global_rank
        fake = self.generator(rank_normal((x.shape[0], self.latent_dim), rank, world, x))

        d_loss = (
            F.softplus(-self.discriminator(x)).mean()
            + F.softplus(self.discriminator(fake.detach())).mean()
        )
        opt_d.zero_grad()
        # DDP (find_unused_parameters=False) with manual optimisation: Lightning arms the
        # reducer before each `manual_backward`, and the reducer then waits for a gradient of
        # every parameter of the wrapped module (generator and discriminator) before it
        # all-reduces; a parameter left out fails the next backward ("parameters that were
        # not used in producing the loss"). The discriminator loss does not reach the
        # generator, so a zero-weight term does: the generator gets zero gradients (all-
        # reduced, then dropped by `opt_g.zero_grad()`), the discriminator's are unchanged.
        # Toggling the optimizers (`requires_grad=False` on the other network) does not
        # help: the reducer still waits for those parameters, and plain `ddp` fails the same
        # way (measured). The generator loss reaches both networks through `fake`, as it is.
        # The price: each backward all-reduces the gradients of both networks.
        self.manual_backward(d_loss + _reach_every_parameter(self.generator))
        opt_d.step()

        g_loss = F.softplus(-self.discriminator(fake)).mean()  # non-saturating, updated D
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        if world > 1:
            self._broadcast_generator_buffers()
        self.log_dict({"train/d_loss": d_loss, "train/g_loss": g_loss}, prog_bar=True)

    def _broadcast_generator_buffers(self) -> None:
        """Rank zero's generator buffers to every rank (one broadcast per dtype).

        The ranks' generators see different latents, so their BatchNorm running statistics
        differ after a step. DDP broadcasts rank zero's buffers before a forward only after a
        forward that armed the backward; under manual optimisation Lightning turns
        ``require_backward_grad_sync`` off as ``training_step`` returns inside DDP's forward,
        so DDP never syncs the buffers again (measured: they drift apart step by step).
        Without this the ranks' generators differ in eval mode, which is how the NFK samples
        them, and rank zero's checkpoint holds only its own.
        """
        buffers = list(self.generator.buffers())
        for dtype in dict.fromkeys(b.dtype for b in buffers):  # the same order on every rank
            group = [b for b in buffers if b.dtype == dtype]
            flat = torch.cat([b.reshape(-1) for b in group])
            dist.broadcast(flat, src=0)
            for b, value in zip(group, flat.split([b.numel() for b in group])):
                b.copy_(value.view_as(b))

    def validation_step(self, batch: tuple[Tensor, ...] | Tensor, batch_idx: int) -> None:
        self.log("val/d_real", self._d_real(batch), sync_dist=True)

    def test_step(self, batch: tuple[Tensor, ...] | Tensor, batch_idx: int) -> None:
        self.log("test/d_real", self._d_real(batch), sync_dist=True)

    def _d_real(self, batch: tuple[Tensor, ...] | Tensor) -> Tensor:
        """The discriminator's mean probability that the batch's images are real."""
        x = first_tensor(batch)
        return torch.sigmoid(self.discriminator(x)).mean()

    def configure_optimizers(self):
        return [
            self.optimizer_g(self.generator.parameters()),
            self.optimizer_d(self.discriminator.parameters()),
        ]
