"""The NFK engine: pure torch (no Lightning import).

Energies (what defines the kernel), the Fisher-vector operator, randomized SVD,
:class:`LowRankNFK` and the exact reference :func:`exact_nfk`.
"""

from lightning_nfk.kernel._data import pack_tokens, unpack_tokens
from lightning_nfk.kernel.config import (
    DEFAULT_MEMORY_BUDGET,
    NFKConfig,
    OperatorOptions,
    SketchOptions,
    Strategy,
)
from lightning_nfk.kernel.distributed import Reduce, all_reduce_sum
from lightning_nfk.kernel.energies import (
    ClassifierEnergy,
    Energy,
    GANEnergy,
    NTKEnergy,
    SequenceEnergy,
    VAEEnergy,
)
from lightning_nfk.kernel.exact import ExactNFK, exact_nfk
from lightning_nfk.kernel.fisher_vectors import FisherVectors, NonFiniteGradientError
from lightning_nfk.kernel.linalg import gather_rows
from lightning_nfk.kernel.linear_probe import (
    DEFAULT_L2_GRID,
    SCALINGS,
    LogisticRegression,
    Scaling,
    check_scaling,
    fit_logistic_regression,
    select_and_fit,
)
from lightning_nfk.kernel.low_rank_nfk import LowRankNFK
from lightning_nfk.kernel.metrics import (
    components_for,
    cumulative_explained_variance,
    effective_rank,
    stable_rank,
    subspace_drift,
)
from lightning_nfk.kernel.nfk_state import NFKFit
from lightning_nfk.kernel.per_example import ScoreJacobian
from lightning_nfk.kernel.precision import kernel_mode
from lightning_nfk.kernel.preparation import prepare_fisher_vectors, working_energy
from lightning_nfk.kernel.randomized_svd import RitzPairs, subspace_iteration

__all__ = [
    "DEFAULT_L2_GRID",
    "DEFAULT_MEMORY_BUDGET",
    "SCALINGS",
    "ClassifierEnergy",
    "Energy",
    "ExactNFK",
    "FisherVectors",
    "GANEnergy",
    "LogisticRegression",
    "LowRankNFK",
    "NFKConfig",
    "NFKFit",
    "NTKEnergy",
    "NonFiniteGradientError",
    "OperatorOptions",
    "Reduce",
    "RitzPairs",
    "Scaling",
    "ScoreJacobian",
    "SequenceEnergy",
    "SketchOptions",
    "Strategy",
    "VAEEnergy",
    "all_reduce_sum",
    "check_scaling",
    "components_for",
    "cumulative_explained_variance",
    "effective_rank",
    "exact_nfk",
    "fit_logistic_regression",
    "gather_rows",
    "kernel_mode",
    "pack_tokens",
    "prepare_fisher_vectors",
    "select_and_fit",
    "stable_rank",
    "subspace_drift",
    "subspace_iteration",
    "unpack_tokens",
    "working_energy",
]
