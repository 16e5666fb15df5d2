"""Classifier energy: the free energy of the logits (Zhang et al., ICLR 2022, Eq. 12)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_nfk.kernel.energies.base import Energy


class ClassifierEnergy(Energy):
    """NFK of a classifier :math:`f`: :math:`s_\\theta(x) = \\log \\sum_y \\exp f^y(x)`.

    The classifier seen as an energy-based model of :math:`x`; centring and diagonal
    Fisher come from the fitting data.

    Args:
        model: a module mapping a batch ``(B, ...)`` to logits ``(B, C)`` (or to an object
            with ``.logits``, as Hugging Face classifiers return).
        parameters: restrict :math:`\\theta` to these parameter-name prefixes (see
            :class:`Energy`); ``None``: all trainable parameters.

    Example:
        >>> import torch
        >>> from lightning_nfk.kernel import ClassifierEnergy, LowRankNFK
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> nfk = LowRankNFK(ClassifierEnergy(net), k=2, oversample=2).fit(torch.randn(32, 4))
        >>> nfk.transform(torch.randn(5, 4)).shape
        torch.Size([5, 2])
    """

    centring = "data"
    fisher = "data"

    def __init__(self, model: nn.Module, *, parameters: Sequence[str] | None = None) -> None:
        super().__init__(model, parameters=parameters)

    def score(self, module: nn.Module, x: Tensor, *extras: Tensor) -> Tensor:
        out = module(x)
        logits = getattr(out, "logits", out)  # Hugging Face models return an output object
        if logits.ndim != 2:
            raise ValueError(
                f"ClassifierEnergy expects the model to return logits of shape (B, C); got "
                f"shape {tuple(logits.shape)}."
            )
        return torch.logsumexp(logits, dim=1)
