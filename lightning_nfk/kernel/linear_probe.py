"""Multinomial logistic regression for linear probes: deterministic full-batch L-BFGS in
float64 on centred and scaled features, L2 strength chosen on a held-out part of the
labelled set.

Scaling (``scaling``):

* ``"standardize"``: every feature to unit variance (scikit-learn's ``StandardScaler``);
  the usual probe protocol, which weighs every NFK component alike.
* ``"global"``: one scale for all features (the root mean variance), which keeps the
  relative sizes of the features: NFK components stay weighted by their singular values,
  as in the kernel itself (:math:`e(x)^\top e(x') \approx K(x, x')`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
Scaling = Literal["standardize", "global"]
SCALINGS = ("standardize", "global")


@dataclass
class LogisticRegression:
    """A fitted probe: ``predict(x) = argmax((x - mean) / std @ weight.T + bias)``."""

    weight: Tensor
    bias: Tensor
    mean: Tensor
    std: Tensor
    l2: float

    def logits(self, x: Tensor) -> Tensor:
        z = (x.double() - self.mean) / self.std
        return z @ self.weight.T + self.bias

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        return float((self.logits(x).argmax(1) == y.to(self.weight.device)).double().mean())


def check_scaling(scaling: object) -> None:
    """``ValueError`` unless ``scaling`` is one of :data:`SCALINGS`."""
    if scaling not in SCALINGS:
        raise ValueError(f"`scaling` must be one of {SCALINGS}, got {scaling!r}.")


def fit_logistic_regression(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    l2: float,
    max_iter: int = 200,
    scaling: Scaling = "standardize",
) -> LogisticRegression:
    """Minimise mean cross-entropy + ``l2``/2 ||W||^2 over centred, scaled ``x`` (full batch)."""
    check_scaling(scaling)
    x = x.double()
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    if scaling == "global":
        std = std.square().mean().sqrt().expand_as(std).clone()
    std = std.clamp_min(1e-12)
    z = (x - mean) / std
    w = torch.zeros(
        num_classes, x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True
    )
    b = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    y = y.to(x.device)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y) + 0.5 * l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LogisticRegression(w.detach(), b.detach(), mean, std, l2)


def select_and_fit(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    holdout: float = 0.2,
    seed: int = 0,
    scaling: Scaling = "standardize",
) -> LogisticRegression:
    """Pick the L2 strength with the best accuracy on a seeded held-out ``holdout`` share of
    (x, y), then refit on all of it with that strength (ties: the stronger penalty)."""
    check_scaling(scaling)
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g, device="cpu").to(x.device)
    n_hold = max(1, round(holdout * n))
    hold, fit = perm[:n_hold], perm[n_hold:]
    best, best_acc = None, -1.0
    for l2 in sorted(l2_grid, reverse=True):
        probe = fit_logistic_regression(x[fit], y[fit], num_classes, l2, scaling=scaling)
        acc = probe.accuracy(x[hold], y[hold])
        if acc > best_acc:
            best, best_acc = l2, acc
    assert best is not None
    return fit_logistic_regression(x, y, num_classes, best, scaling=scaling)
