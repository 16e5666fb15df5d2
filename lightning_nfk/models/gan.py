"""A GAN LightningModule (manual optimisation; non-saturating, least-squares or hinge loss;
an optional moving average of the generator); NFK of the discriminator."""

from __future__ import annotations

import copy
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_lightning.cli import OptimizerCallable
from torch import Tensor, nn

from lightning_nfk.kernel import Energy, GANEnergy
from lightning_nfk.kernel._data import first_tensor
from lightning_nfk.kernel.energies.gan import GANScore, GeneratorMode
from lightning_nfk.models._sampling import rank_normal


def _adam_gan(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999))


GANLoss = Literal["nonsaturating", "lsgan", "hinge"]


def _at_least_float32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


def discriminator_loss(loss: GANLoss, real: Tensor, fake: Tensor) -> Tensor:
    """The discriminator's loss from its logits on real and generated images, computed in
    float32 at least (under bfloat16 autocast a sigmoid near 1 keeps about 2 digits)."""
    real, fake = _at_least_float32(real), _at_least_float32(fake)
    if loss == "lsgan":  # on the sigmoid, as AFV's discriminator outputs it
        return (torch.sigmoid(real) - 1).square().mean() + torch.sigmoid(fake).square().mean()
    if loss == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def generator_loss(loss: GANLoss, fake: Tensor) -> Tensor:
    """The generator's loss from the discriminator's logits on its images (float32 at
    least, as :func:`discriminator_loss`)."""
    fake = _at_least_float32(fake)
    if loss == "lsgan":
        return (torch.sigmoid(fake) - 1).square().mean()
    if loss == "hinge":
        return -fake.mean()
    return F.softplus(-fake).mean()  # non-saturating


def _reach_every_parameter(module: nn.Module) -> Tensor | float:
    """Zero that depends on every trainable parameter of ``module``: added to a loss, it
    changes neither the loss nor any gradient but puts every parameter in the backward graph
    (one entry of each, so no sum of a whole parameter that could overflow in half precision).
    """
    return 0.0 * sum(p.reshape(-1)[0] for p in module.parameters() if p.requires_grad)


class GANModule(pl.LightningModule):
    """Alternating discriminator and generator steps.

    The NFK is :class:`GANEnergy`: the discriminator's logit (or its sigmoid,
    ``nfk_score``), centred and normalised with ``nfk_num_samples`` samples of the
    generator, or of its moving average when ``ema_decay`` keeps one.

    Works under Lightning's plain ``ddp`` strategy (every backward reaches every parameter,
    see :meth:`training_step`): each rank draws its own rows of the global batch of
    latents, and the generator's buffers (BatchNorm running statistics) are broadcast from
    rank zero after every step, so that all ranks hold the same module.

    Args:
        generator: latents ``(B, latent_dim)`` to images.
        discriminator: images to logits ``(B,)``.
        latent_dim: latent size (standard normal prior).
        optimizer_g, optimizer_d: optimizer factories (default Adam, lr 2e-4, betas 0.5/0.999;
            the AFV setting is lr 2e-4 for the generator, 4e-4 for the discriminator,
            betas (0, 0.999) for both).
        nfk_num_samples: generator samples for the NFK statistics.
        loss: ``"nonsaturating"`` (softplus on the logits), ``"lsgan"`` (least squares on
            the discriminator's sigmoid, AFV's) or ``"hinge"``.
        ema_decay: keep ``generator_ema``, an exponential moving average of the generator's
            parameters (decay per step; its BatchNorm statistics are the generator's), and
            sample the NFK's statistics from it; None: no average.
        nfk_score: the :class:`GANEnergy` ``score`` (``"logit"`` or ``"sigmoid"``).
        nfk_generator_mode: the :class:`GANEnergy` ``generator_mode`` (``"eval"`` or
            ``"train"``: batch statistics, as AFV samples).
        nfk_batch_size: the :class:`GANEnergy` ``batch_size`` of the generator's samples
            (with ``"train"``, the batch whose statistics a sample sees).

    Differences from AFV's training loop (apple/ml-afv ``main.py``), deliberate: the
    discriminator steps first and the generator then steps on the same latents against the
    updated discriminator (AFV: the generator first); the moving average copies the live
    generator's BatchNorm statistics (AFV's keeps its own); the hinge loss works on the
    logits (AFV's hinge variant reads its sigmoid outputs).
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        latent_dim: int = 64,
        optimizer_g: OptimizerCallable = _adam_gan,
        optimizer_d: OptimizerCallable = _adam_gan,
        nfk_num_samples: int = 2048,
        loss: GANLoss = "nonsaturating",
        ema_decay: float | None = None,
        nfk_score: GANScore = "logit",
        nfk_generator_mode: GeneratorMode = "eval",
        nfk_batch_size: int = 256,
    ) -> None:
        super().__init__()
        if loss not in ("nonsaturating", "lsgan", "hinge"):
            raise ValueError(f"`loss` must be 'nonsaturating', 'lsgan' or 'hinge', got {loss!r}.")
        if ema_decay is not None and not (
            isinstance(ema_decay, (int, float)) and 0.0 <= ema_decay < 1.0
        ):
            raise ValueError(f"`ema_decay` must be None or a number in [0, 1), got {ema_decay!r}.")
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
        self.loss, self.ema_decay = loss, ema_decay
        self.nfk_score, self.nfk_generator_mode = nfk_score, nfk_generator_mode
        self.nfk_batch_size = nfk_batch_size
        # not trained by an optimiser (no gradients): DDP leaves its parameters alone
        self.generator_ema = (
            None if ema_decay is None else copy.deepcopy(generator).requires_grad_(False)
        )
        # the energy's own checks of nfk_score and nfk_generator_mode, at construction
        self.nfk_energy()

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
            self.generator if self.generator_ema is None else self.generator_ema,
            latent_dim=self.latent_dim,
            num_samples=self.nfk_num_samples,
            score=self.nfk_score,
            generator_mode=self.nfk_generator_mode,
            batch_size=self.nfk_batch_size,
        )

    def training_step(self, batch: tuple[Tensor, ...] | Tensor, batch_idx: int) -> None:
        x = first_tensor(batch)
        opt_g, opt_d = self.optimizers()
        world, rank = self.trainer.world_size, self.trainer.global_rank
        fake = self.generator(rank_normal((x.shape[0], self.latent_dim), rank, world, x))

        d_loss = discriminator_loss(
            self.loss, self.discriminator(x), self.discriminator(fake.detach())
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

        g_loss = generator_loss(self.loss, self.discriminator(fake))  # the updated D
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        if world > 1:
            self._broadcast_generator_buffers()
        if self.generator_ema is not None:  # the same on every rank: equal inputs
            self._update_ema()
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

    @torch.no_grad()
    def _update_ema(self) -> None:
        """``generator_ema``'s parameters move ``1 - ema_decay`` of the way to the
        generator's; its buffers (BatchNorm statistics) are the generator's."""
        assert self.generator_ema is not None and self.ema_decay is not None
        weight = 1.0 - self.ema_decay
        for avg, p in zip(self.generator_ema.parameters(), self.generator.parameters()):
            avg.lerp_(p.detach(), weight)
        for avg, b in zip(self.generator_ema.buffers(), self.generator.buffers()):
            avg.copy_(b)

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
