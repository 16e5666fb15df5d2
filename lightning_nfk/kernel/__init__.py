"""The NFK engine: pure torch (no Lightning import).

Energies (what defines the kernel), the Fisher-vector operator, randomized SVD,
:class:`LowRankNFK` and the exact reference :func:`exact_nfk`.
"""

from lightning_nfk.kernel.distributed import all_reduce_sum
from lightning_nfk.kernel.energies import (
    ClassifierEnergy,
    Energy,
    GANEnergy,
    NTKEnergy,
    VAEEnergy,
)
from lightning_nfk.kernel.exact import ExactNFK, exact_nfk
from lightning_nfk.kernel.fisher_vectors import FisherVectors, NonFiniteGradientError
from lightning_nfk.kernel.low_rank_nfk import LowRankNFK, kernel_mode
from lightning_nfk.kernel.metrics import (
    components_for,
    cumulative_explained_variance,
    effective_rank,
    stable_rank,
    subspace_drift,
)
from lightning_nfk.kernel.per_example import ScoreJacobian
from lightning_nfk.kernel.randomized_svd import RitzPairs, subspace_iteration

__all__ = [
    "ClassifierEnergy",
    "Energy",
    "ExactNFK",
    "FisherVectors",
    "GANEnergy",
    "LowRankNFK",
    "NTKEnergy",
    "NonFiniteGradientError",
    "RitzPairs",
    "ScoreJacobian",
    "VAEEnergy",
    "all_reduce_sum",
    "components_for",
    "cumulative_explained_variance",
    "effective_rank",
    "exact_nfk",
    "kernel_mode",
    "stable_rank",
    "subspace_drift",
    "subspace_iteration",
]
