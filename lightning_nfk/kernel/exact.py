"""The exact NFK (the paper's Algorithm 1): explicit Fisher vectors, Gram matrix, eigendecomposition.

For verification and small problems: :math:`V` (N x P) is formed, so memory grows as N P,
and :func:`exact_nfk` refuses problems beyond its ``memory_budget``, counting its peak
(:func:`~lightning_nfk.kernel.memory.dense_peak_bytes`): V with a gradient block, then V
with the Gram matrix of the smaller side and its eigendecomposition.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lightning_nfk.kernel._data import Data
from lightning_nfk.kernel.config import OperatorOptions
from lightning_nfk.kernel.distributed import Reduce, all_reduce_sum
from lightning_nfk.kernel.energies.base import Energy
from lightning_nfk.kernel.linalg import (
    frobenius_squared,
    gather_rows,
    gram_eigh,
    other_singular_vectors,
)
from lightning_nfk.kernel.precision import kernel_mode
from lightning_nfk.kernel.preparation import prepare_fisher_vectors


class ExactNFK:
    """The exact NFK of a fitting set: V, its full spectrum, and (on first access) the
    singular vectors and the Gram matrix.

    Only the Gram matrix of the smaller side and its eigendecomposition are computed by
    :func:`exact_nfk` (the paper's Alg. 1); ``left``, ``right`` and ``gram`` each cost one
    more N x P product, paid when first read.

    Attributes:
        fisher_vectors: V, (N, P), working dtype.
        singular_values: (r,) all singular values of V, r = min(N, P), descending (float64).
        mean_score: (P,) z or None; fisher_diagonal: (P,) I or None.
    """

    def __init__(
        self,
        fisher_vectors: Tensor,
        singular_values: Tensor,
        gram_vectors: Tensor,
        mean_score: Tensor | None,
        fisher_diagonal: Tensor | None,
    ) -> None:
        self.fisher_vectors = fisher_vectors
        self.singular_values = singular_values
        self._gram_vectors = gram_vectors  # from gram_eigh: left if N <= P, else right
        self.mean_score = mean_score
        self.fisher_diagonal = fisher_diagonal

    @property
    def _left_side(self) -> bool:
        n, p = self.fisher_vectors.shape
        return n <= p

    @functools.cached_property
    def _other(self) -> Tensor:
        return other_singular_vectors(self.fisher_vectors, self.singular_values, self._gram_vectors)

    @property
    def left(self) -> Tensor:
        """(N, r) left singular vectors :math:`\\Phi`."""
        return self._gram_vectors.to(self.fisher_vectors.dtype) if self._left_side else self._other

    @property
    def right(self) -> Tensor:
        """(P, r) right singular vectors :math:`P`."""
        return self._other if self._left_side else self._gram_vectors.to(self.fisher_vectors.dtype)

    @functools.cached_property
    def gram(self) -> Tensor:
        """:math:`K = V V^\\top`, (N, N)."""
        return self.fisher_vectors @ self.fisher_vectors.T

    @property
    def eigenvalues(self) -> Tensor:
        """Kernel operator eigenvalues :math:`\\sigma_i^2 / N`."""
        return self.singular_values.square() / self.fisher_vectors.shape[0]

    @property
    def total_variance(self) -> Tensor:
        """:math:`\\|V\\|_F^2 = \\operatorname{tr} K` (float64)."""
        return frobenius_squared(self.fisher_vectors)

    def embed(self, fisher_vectors: Tensor, k: int) -> Tensor:
        """:math:`e(x) = V_x P_{:, :k}` for explicit Fisher vectors of other inputs."""
        return fisher_vectors @ self.right[:, :k]


def exact_nfk(
    energy: Energy,
    data: Data,
    *,
    damping: float = 1e-8,
    dtype: torch.dtype | None = None,
    memory_budget: int | None = None,
    reduce: Reduce = all_reduce_sum,
) -> ExactNFK:
    """The paper's Algorithm 1: the exact NFK of ``data``, forming V and the Gram matrix.

    Same energies, statistics, checks and sharding as :class:`LowRankNFK` (under
    ``torch.distributed`` every process gets the full result).

    Raises:
        ValueError: when the peak (V with a gradient block, then V with the Gram matrix's
            eigendecomposition) needs more than ``memory_budget`` bytes (default: half of
            what the device has available), before anything is allocated.
    """
    options = OperatorOptions(
        damping=damping, strategy="dense", dtype=dtype, memory_budget=memory_budget
    )
    op = prepare_fisher_vectors(energy, data, options, reduce=reduce)
    v = gather_rows(op.local_materialize(data), reduce)
    with kernel_mode(op.energy):  # float32/64 arithmetic (no TF32) for the Gram matrix
        sigma, vecs = gram_eigh(v)
    return ExactNFK(v, sigma, vecs, op.statistics.mean_score, op.statistics.fisher_diagonal)
