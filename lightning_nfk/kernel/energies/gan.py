"""GAN energy: the discriminator's output, centred and normalised on generator samples.

Zhang et al., ICLR 2022, Eq. 1; the mean score and diagonal Fisher over generator samples
follow the paper's precursor, apple/ml-afv (adversarial Fisher vectors).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_nfk.kernel.energies.base import Energy, _check_module, scalar_per_example, uncompiled
from lightning_nfk.kernel.precision import restored_modes

LatentSampler = Callable[[int, torch.Generator], Tensor]
GANScore = Literal["logit", "sigmoid"]
GeneratorMode = Literal["eval", "train"]


class GANEnergy(Energy):
    """NFK of a GAN: :math:`s_\\theta(x) = D(x)`, the discriminator's logit (or its sigmoid).

    :math:`\\theta` are the discriminator's parameters. The mean score :math:`z` and the
    diagonal Fisher :math:`I` are averages over ``num_samples`` generator samples
    :math:`G(h)`, :math:`h \\sim p(h)`. The latents come from a ``torch.Generator`` seeded
    with ``seed``, so every process and every pass sees the same samples; under
    ``torch.distributed`` each rank evaluates a disjoint contiguous share of them.

    Args:
        discriminator: maps images ``(B, C, H, W)`` to logits ``(B,)`` or ``(B, 1)``.
        generator: maps latents ``(n, ...)`` to images; run without gradients, in eval
            mode unless ``generator_mode="train"``.
        latent_dim: size of a standard normal latent ``(n, latent_dim)``; give either this
            or ``latent_sampler``.
        latent_sampler: ``f(n, torch_generator) -> latents`` drawn on the CPU with the given
            generator, for other priors or shapes.
        num_samples: number of generator samples :math:`M`.
        batch_size: generator batch size.
        seed: seed of the latents.
        score: what is differentiated: ``"logit"`` (the paper's Eq. 1 on the logit the
            discriminator returns) or ``"sigmoid"`` (its probability, what AFV's
            discriminator outputs).
        generator_mode: how the generator samples: ``"eval"`` (BatchNorm with running
            statistics) or ``"train"`` (with each batch's statistics, as AFV samples; the
            generator's running statistics are left untouched). With ``"train"`` a
            sample depends on the batch it is drawn in, so the statistics differ slightly
            with ``batch_size`` and the number of processes (AFV draws its 1,024 samples
            in one batch: ``batch_size=num_samples`` on one process). Never combine it with
            SyncBatchNorm: the sampling would run its collectives on each rank's share.
        parameters: restrict :math:`\\theta` to these parameter-name prefixes (see
            :class:`Energy`).

    Raises:
        TypeError: if a module argument is not an ``nn.Module``.
        ValueError: if neither or both of ``latent_dim`` and ``latent_sampler`` are given,
            or a count is not positive.
    """

    centring = "samples"
    fisher = "samples"

    def __init__(
        self,
        discriminator: nn.Module,
        generator: nn.Module,
        latent_dim: int | None = None,
        *,
        latent_sampler: LatentSampler | None = None,
        num_samples: int = 4096,
        batch_size: int = 256,
        seed: int = 0,
        parameters: Sequence[str] | None = None,
        score: GANScore = "logit",
        generator_mode: GeneratorMode = "eval",
    ) -> None:
        super().__init__(discriminator, parameters=parameters)
        _check_module("generator", generator)
        if score not in ("logit", "sigmoid"):
            raise ValueError(f"`score` must be 'logit' or 'sigmoid', got {score!r}.")
        if generator_mode not in ("eval", "train"):
            raise ValueError(f"`generator_mode` must be 'eval' or 'train', got {generator_mode!r}.")
        if (latent_dim is None) == (latent_sampler is None):
            raise ValueError(
                "Give exactly one of `latent_dim` and `latent_sampler` to GANEnergy; got "
                f"latent_dim={latent_dim!r}, latent_sampler={latent_sampler!r}."
            )
        for name, value in (
            ("latent_dim", latent_dim),
            ("num_samples", num_samples),
            ("batch_size", batch_size),
        ):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        self.generator = uncompiled(generator)
        self.latent_dim = latent_dim
        self.latent_sampler = latent_sampler
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.score_output = score
        self.generator_mode = generator_mode

    def settings(self) -> dict[str, object]:
        # "logit" is what states saved before the option meant: recorded only otherwise
        extra = {} if self.score_output == "logit" else {"score": self.score_output}
        return {**super().settings(), **extra}

    def score(self, module: nn.Module, x: Tensor, *extras: Tensor) -> Tensor:
        logit = scalar_per_example(
            module(x), "GANEnergy expects the discriminator to return one logit per example"
        )
        return torch.sigmoid(logit) if self.score_output == "sigmoid" else logit

    def latents(self) -> Tensor:
        """All ``num_samples`` latents, identical on every process."""
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        if self.latent_sampler is not None:
            h = self.latent_sampler(self.num_samples, g)
        else:
            h = torch.randn(self.num_samples, self.latent_dim, generator=g, device="cpu")
        if h.shape[0] != self.num_samples:
            raise ValueError(
                f"`latent_sampler` returned {h.shape[0]} latents; {self.num_samples} were asked."
            )
        return h

    def sample_batches(
        self, *, rank: int, world_size: int, device: torch.device, dtype: torch.dtype
    ) -> Iterator[Tensor]:
        h = self.latents()
        start = rank * self.num_samples // world_size
        stop = (rank + 1) * self.num_samples // world_size
        with torch.no_grad():
            for i in range(start, stop, self.batch_size):
                hb = h[i : min(i + self.batch_size, stop)].to(device=device, dtype=dtype)
                yield self.generate(hb)

    def generate(self, h: Tensor) -> Tensor:
        """Images of the latents ``h``, drawn as the statistics draw them (``generator_mode``;
        with ``"train"`` the batch's own statistics: ``h`` is one batch). Without gradients
        when called under ``torch.no_grad``, as the energy does."""
        if self.generator_mode == "eval":
            return self.generator(h)
        # batch statistics; the running statistics this forward updates are copies
        g = self.generator
        state = {**dict(g.named_parameters()), **{n: b.clone() for n, b in g.named_buffers()}}
        with restored_modes([g]):
            return functional_call(g.train(), state, (h,))

    def auxiliary_modules(self) -> list[nn.Module]:
        return [self.generator]

    def __repr__(self) -> str:
        return (
            f"GANEnergy(discriminator={type(self.module).__name__}, "
            f"generator={type(self.generator).__name__}, num_samples={self.num_samples}, "
            f"score={self.score_output!r}, generator_mode={self.generator_mode!r})"
        )
