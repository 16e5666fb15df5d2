"""Neural tangent kernel as an energy: raw scalar output, no centring, no normalisation."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_nfk.kernel.energies.base import Energy, scalar_per_example


class NTKEnergy(Energy):
    """Empirical NTK of a scalar-output network: :math:`s_\\theta(x) = f(x)`, :math:`V_x = g_x`.

    Args:
        model: a module mapping a batch ``(B, ...)`` to ``(B,)`` or ``(B, 1)``.
        parameters: restrict :math:`\\theta` to these parameter-name prefixes (see
            :class:`Energy`); ``None``: all trainable parameters.
    """

    centring = None
    fisher = None

    def __init__(self, model: nn.Module, *, parameters: Sequence[str] | None = None) -> None:
        super().__init__(model, parameters=parameters)

    def score(self, module: nn.Module, x: Tensor, *extras: Tensor) -> Tensor:
        return scalar_per_example(module(x), "NTKEnergy expects a scalar output per example")
