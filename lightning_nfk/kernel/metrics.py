"""Summaries of a truncated NFK spectrum (functions of tensors; no state)."""

from __future__ import annotations

import torch
from torch import Tensor


def cumulative_explained_variance(
    singular_values: Tensor, total_variance: Tensor | float
) -> Tensor:
    """:math:`c_j = \\sum_{i \\le j} \\sigma_i^2 / \\|V\\|_F^2`, shape (k,), float64."""
    return singular_values.double().square().cumsum(0) / float(total_variance)


def effective_rank(singular_values: Tensor) -> float:
    """Roy and Vetterli's effective rank of the top-k spectrum: :math:`\\exp H(p)` with
    :math:`p_i = \\sigma_i^2 / \\sum_{j \\le k} \\sigma_j^2` (between 1 and k)."""
    e = singular_values.double().square()
    p = e / e.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(singular_values: Tensor, total_variance: Tensor | float) -> float:
    """:math:`\\|V\\|_F^2 / \\sigma_1^2` (at least 1; uses the whole spectrum through the trace)."""
    return float(total_variance) / float(singular_values[0].double().square())


def components_for(
    singular_values: Tensor, total_variance: Tensor | float, fraction: float = 0.9
) -> int:
    """Smallest j with :math:`c_j \\ge` ``fraction``, or -1 when the top k do not reach it."""
    c = cumulative_explained_variance(singular_values, total_variance)
    hits = (c >= fraction).nonzero()
    return int(hits[0]) + 1 if len(hits) else -1


def subspace_drift(a: Tensor, b: Tensor) -> float:
    """Mean squared sine of the principal angles between the column spaces of ``a`` and
    ``b`` (orthonormal columns, same shape): :math:`1 - \\|A^\\top B\\|_F^2 / k`, in [0, 1]."""
    k = a.shape[1]
    overlap = (a.double().T @ b.double()).square().sum() / k
    return float((1.0 - overlap).clamp(0.0, 1.0))
