"""A plain multilayer perceptron."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import Tensor, nn

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "softplus": nn.Softplus}


class MLP(nn.Module):
    """Flatten, then ``Linear`` layers of the given widths with an activation between them.

    Args:
        in_features: input size after flattening.
        hidden: hidden widths (e.g. ``(256, 256)`` for a 3-layer MLP).
        out_features: output size.
        activation: ``"relu"``, ``"tanh"``, ``"gelu"`` or ``"softplus"``.
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (256, 256),
        out_features: int = 10,
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"`activation` must be one of {sorted(_ACTIVATIONS)}, got {activation!r}."
            )
        widths = [in_features, *hidden, out_features]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(_ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
