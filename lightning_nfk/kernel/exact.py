"""The exact NFK (the paper's Algorithm 1): explicit Fisher vectors, Gram matrix, eigendecomposition.

For verification and small problems: :math:`V` (N x P) is formed, so memory grows as N P,
and :func:`exact_nfk` refuses problems beyond its ``memory_budget``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_nfk.kernel._data import Data
from lightning_nfk.kernel.energies.base import Energy
from lightning_nfk.kernel.linalg import exact_decomposition, gather_rows
from lightning_nfk.kernel.low_rank_nfk import DEFAULT_MEMORY_BUDGET, LowRankNFK, kernel_mode


@dataclass
class ExactNFK:
    """The exact NFK of a fitting set (everything in the working dtype).

    Attributes:
        fisher_vectors: V, (N, P).
        gram: :math:`K = V V^\\top`, (N, N).
        singular_values: (r,) all singular values of V, r = min(N, P), descending (float64).
        left: (N, r) :math:`\\Phi`; right: (P, r) :math:`P`.
        mean_score: (P,) z or None; fisher_diagonal: (P,) I or None.
    """

    fisher_vectors: Tensor
    gram: Tensor
    singular_values: Tensor
    left: Tensor
    right: Tensor
    mean_score: Tensor | None
    fisher_diagonal: Tensor | None

    @property
    def eigenvalues(self) -> Tensor:
        """Kernel operator eigenvalues :math:`\\sigma_i^2 / N`."""
        return self.singular_values.square() / self.fisher_vectors.shape[0]

    @property
    def total_variance(self) -> Tensor:
        return torch.trace(self.gram.double())

    def embed(self, fisher_vectors: Tensor, k: int) -> Tensor:
        """:math:`e(x) = V_x P_{:, :k}` for explicit Fisher vectors of other inputs."""
        return fisher_vectors @ self.right[:, :k]


def exact_nfk(
    energy: Energy,
    data: Data,
    *,
    damping: float = 1e-8,
    dtype: torch.dtype | None = None,
    memory_budget: int = 4 * DEFAULT_MEMORY_BUDGET,
) -> ExactNFK:
    """The paper's Algorithm 1: the exact NFK of ``data``, forming V and the Gram matrix.

    Same energies, statistics, validation and sharding as :class:`LowRankNFK` (under
    ``torch.distributed`` every process gets the full result).

    Raises:
        ValueError: when V and its Gram matrix need more than ``memory_budget`` bytes.
    """
    nfk = LowRankNFK(
        energy,
        k=1,
        oversample=0,
        damping=damping,
        strategy="dense",
        dtype=dtype,
        memory_budget=memory_budget,
    )
    working = nfk._working_energy()
    with kernel_mode(working):
        op, _ = nfk._prepare(data, working)
        v = gather_rows(op.materialize(data), nfk.reduce)
    sigma, right, left = exact_decomposition(v, min(v.shape))
    return ExactNFK(v, v @ v.T, sigma, left, right, op.mean_score, op.fisher_diagonal)
