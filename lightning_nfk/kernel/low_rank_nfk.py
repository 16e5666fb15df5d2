"""Low-rank Neural Fisher Kernel: truncated SVD of the Fisher-vector matrix and embeddings.

Zhang, Zhai, Littwin, Susskind, *Learning Representation from Neural Fisher Kernel with
Low-Rank Approximation*, ICLR 2022: Eq. 4-5 (embeddings) and Algorithm 4 (randomized
SVD), computed by randomized subspace iteration (Halko et al. 2011, see
:mod:`lightning_nfk.kernel.randomized_svd`) on :math:`V^\\top V`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_nfk.kernel._data import Data, check_data, count_examples, first_tensor
from lightning_nfk.kernel.distributed import Reduce, all_reduce_sum, rank_and_world_size
from lightning_nfk.kernel.energies.base import Energy
from lightning_nfk.kernel.fisher_vectors import FisherVectors
from lightning_nfk.kernel.linalg import exact_decomposition, gather_rows
from lightning_nfk.kernel.per_example import ScoreJacobian
from lightning_nfk.kernel.randomized_svd import subspace_iteration

Strategy = Literal["auto", "dense", "blocked", "matrix_free"]
STRATEGIES = ("auto", "dense", "blocked", "matrix_free")
DEFAULT_MEMORY_BUDGET = 2**30
_MAX_BLOCK_ROWS = 1024
_MAX_MATRIX_FREE_ROWS = 128
_DENSE_EXAMPLES_PER_PASS = 256
_STATE_VERSION = 1


@contextlib.contextmanager
def kernel_mode(*owners: Energy | nn.Module) -> Iterator[None]:
    """Eval mode, gradients enabled, inference mode off, global RNG untouched; all restored.

    ``owners`` are energies (their kernel module and auxiliary modules) or plain modules.
    """
    modules: list[nn.Module] = []
    for owner in owners:
        if isinstance(owner, Energy):
            modules += [owner.module, *owner.auxiliary_modules()]
        else:
            modules.append(owner)
    flags = [(m, m.training) for root in modules for m in root.modules()]
    devices = sorted(
        {
            p.device.index or 0
            for root in modules
            for p in root.parameters()
            if p.device.type == "cuda"
        }
    )
    try:
        with (
            torch.random.fork_rng(devices=devices),
            torch.inference_mode(False),
            torch.enable_grad(),
        ):
            for root in modules:
                root.eval()
            yield
    finally:
        for m, training in flags:
            m.training = training


class LowRankNFK:
    """Rank-``k`` approximation of a model's Neural Fisher Kernel, and its embeddings.

    ``fit`` computes the truncated SVD :math:`V \\approx \\Phi\\,\\mathrm{diag}(\\sigma)P^\\top`
    of the N x P Fisher-vector matrix of the fitting data (DESIGN.md section 2) without
    forming :math:`V` or the Gram matrix :math:`K = V V^\\top`; ``transform`` gives the
    embedding :math:`e(x) = V_x P` of any input (on the fitting data,
    :math:`e(X) = \\Phi\\,\\mathrm{diag}(\\sigma)`).

    .. math::

        \\Lambda_i = \\sigma_i^2, \\qquad \\lambda_i = \\sigma_i^2 / N, \\qquad
        r_i = \\sigma_i^2 / \\|V\\|_F^2 .

    Strategies (all give the same answer up to round-off and the randomized SVD's error):

    * ``"dense"``: materialise :math:`V` (refused beyond ``memory_budget``); exact SVD (the
      paper's Alg. 1).
    * ``"blocked"``: per chunk of examples, the per-example gradient block :math:`G_b`
      once, then two GEMMs; one pass over the data per power iteration.
    * ``"matrix_free"``: :math:`VZ` by JVP and :math:`V^\\top Y` by VJP batched over the
      ``l`` columns (the paper's way); cost grows with ``l``.
    * ``"auto"``: ``dense`` when :math:`V` fits ``memory_budget`` and
      :math:`\\min(N, P) \\le 256\\,(n\\_iter + 1)` (where the exact Gram costs less than
      the power passes), else ``blocked``.

    Distributed: when ``torch.distributed`` is initialised (or ``reduce`` is given), each
    process passes its own disjoint shard of the fitting data; every sum is reduced and
    every process ends with the same spectrum and right singular vectors, equal to one
    process fitting the concatenated data.

    A kernel computation runs in eval mode on a snapshot of the parameters and buffers
    taken by ``fit``; it never changes parameters, buffers, ``.grad``, the train/eval
    mode or the global RNG stream.

    Args:
        energy: the :class:`~lightning_nfk.kernel.Energy` defining the kernel.
        k: number of components kept.
        oversample: extra columns of the random sketch (``l = k + oversample``); raise it
            first when the spectrum has a small gap.
        n_iter: power iterations, >= 0 (``n_iter + 1`` passes over the data).
        damping: absolute damping of the diagonal Fisher, >= 0.
        strategy: ``"auto"``, ``"dense"``, ``"blocked"`` or ``"matrix_free"``.
        dtype: working dtype; ``torch.float64`` runs everything in float64 on a copy of the
            model; ``None`` follows the model (float32 for a float16/bfloat16 model).
        seed: seed of the random test matrix (same on every process).
        memory_budget: bytes allowed for a gradient block or the dense :math:`V`.
        reduce: sum over processes; default: ``torch.distributed.all_reduce`` when
            initialised, else the identity.

    Raises:
        TypeError, ValueError: for invalid arguments, naming the argument and the value.

    Example:
        >>> import torch
        >>> from lightning_nfk.kernel import ClassifierEnergy, LowRankNFK
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        >>> x = torch.randn(64, 8)
        >>> nfk = LowRankNFK(ClassifierEnergy(net), k=4, oversample=6).fit(x)
        >>> nfk.singular_values.shape, nfk.transform(x[:3]).shape
        (torch.Size([4]), torch.Size([3, 4]))
    """

    def __init__(
        self,
        energy: Energy,
        k: int = 16,
        oversample: int = 10,
        n_iter: int = 10,
        damping: float = 1e-8,
        strategy: Strategy = "auto",
        dtype: torch.dtype | None = None,
        seed: int = 0,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        reduce: Reduce | None = None,
    ) -> None:
        if not isinstance(energy, Energy):
            raise TypeError(
                f"`energy` must be an lightning_nfk.kernel.Energy, got {type(energy).__name__}; "
                "wrap your model, e.g. ClassifierEnergy(model)."
            )
        check_hyperparameters(
            k=k,
            oversample=oversample,
            n_iter=n_iter,
            damping=damping,
            strategy=strategy,
            dtype=dtype,
            seed=seed,
            memory_budget=memory_budget,
        )
        if reduce is not None and not callable(reduce):
            raise TypeError(f"`reduce` must be callable or None, got {type(reduce).__name__}.")
        self.energy = energy
        self.k = k
        self.oversample = oversample
        self.n_iter = n_iter
        self.damping = float(damping)
        self.strategy = strategy
        self.dtype = dtype
        self.seed = seed
        self.memory_budget = memory_budget
        self.reduce: Reduce = reduce if reduce is not None else all_reduce_sum
        self._op: FisherVectors | None = None
        self._result: dict[str, Any] | None = None
        self._fit_embedding: Tensor | None = None

    # -- public results ----------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self._result is not None

    def _get(self, key: str) -> Any:
        if self._result is None:
            raise RuntimeError("This LowRankNFK is not fitted yet: call `fit(data)` first.")
        return self._result[key]

    @property
    def singular_values(self) -> Tensor:
        """(k,) singular values :math:`\\sigma_i` of :math:`V`, descending."""
        return self._get("singular_values")

    @property
    def eigenvalues(self) -> Tensor:
        """(k,) kernel operator eigenvalues :math:`\\lambda_i = \\sigma_i^2 / N` (Eq. 5)."""
        return self.singular_values.square() / self.num_examples

    @property
    def gram_eigenvalues(self) -> Tensor:
        """(k,) eigenvalues :math:`\\Lambda_i = \\sigma_i^2` of the Gram matrix :math:`K = V V^\\top`."""
        return self.singular_values.square()

    @property
    def total_variance(self) -> Tensor:
        """:math:`\\|V\\|_F^2 = \\operatorname{tr} K` (0-dim float64 tensor)."""
        return self._get("total_variance")

    @property
    def total_variance_is_exact(self) -> bool:
        """False when :math:`\\|V\\|_F^2` is Hutchinson's estimate from the random sketch
        (``matrix_free`` with an energy whose statistics do not cover the fitting data)."""
        return self._get("total_variance_is_exact")

    @property
    def explained_variance_ratio(self) -> Tensor:
        """(k,) :math:`\\sigma_i^2 / \\|V\\|_F^2` per component (sklearn's convention)."""
        return self.gram_eigenvalues / self.total_variance

    @property
    def components(self) -> Tensor:
        """(P, k) right singular vectors :math:`P` (orthonormal columns)."""
        return self._get("components")

    @property
    def residuals(self) -> Tensor:
        """(k,) relative residuals :math:`\\|V^\\top V p_i - \\sigma_i^2 p_i\\| / \\sigma_i^2`;
        a computable bound on each eigenvalue's relative error (zeros for ``dense``)."""
        return self._get("residuals")

    @property
    def fit_embedding(self) -> Tensor | None:
        """(n_local, k) embeddings :math:`e(x) = V_x P` of this process's fitting examples,
        in the order ``fit`` saw them, taken from the last pass at no extra cost
        (:math:`\\Phi\\,\\mathrm{diag}(\\sigma)` up to signs). None for ``n_iter = 0`` and
        after ``load``; ``transform`` gives the same for any inputs, at one more pass."""
        self._get("singular_values")
        return self._fit_embedding

    @property
    def num_examples(self) -> int:
        """N, the number of fitting examples over all processes."""
        return self._get("num_examples")

    @property
    def num_parameters(self) -> int:
        """P = |theta|."""
        return self._get("num_parameters")

    @property
    def strategy_used(self) -> str:
        """The strategy ``fit`` ran (``auto`` resolved)."""
        return self._get("strategy")

    @property
    def mean_score(self) -> Tensor | None:
        """(P,) mean score :math:`z`, or None when the energy does not centre."""
        return self._get("mean_score")

    @property
    def fisher_diagonal(self) -> Tensor | None:
        """(P,) diagonal Fisher :math:`I` (float64), or None when the energy does not normalise."""
        return self._get("fisher_diagonal")

    # -- fitting -----------------------------------------------------------------------------
    def _working_energy(self) -> Energy:
        current = next(p for p in self.energy.module.parameters() if p.requires_grad).dtype
        dtype = self.dtype
        if dtype is None and current in (torch.float16, torch.bfloat16):
            dtype = torch.float32  # half-precision Fisher vectors and QR are not accurate enough
        return self.energy if dtype is None or dtype == current else self.energy.to(dtype)

    def _operator(self, jac: ScoreJacobian, strategy: str) -> FisherVectors:
        rank, world = rank_and_world_size()
        row_bytes = 4 * jac.num_parameters * jac.dtype.itemsize
        max_rows = max(1, min(self.memory_budget // row_bytes, _MAX_BLOCK_ROWS))
        if strategy == "matrix_free":
            max_rows = min(max_rows, _MAX_MATRIX_FREE_ROWS)
        return FisherVectors(
            jac,
            damping=self.damping,
            strategy=strategy,
            max_rows=max_rows,
            reduce=self.reduce,
            rank=rank,
            world_size=world,
        )

    def _dense_bytes(self, n: int, p: int, itemsize: int) -> int:
        return n * p * itemsize + min(n, p) ** 2 * 8

    def _resolve_strategy(self, n: int, p: int, itemsize: int) -> str:
        fits = self._dense_bytes(n, p, itemsize) <= self.memory_budget
        if self.strategy == "dense" and not fits:
            raise ValueError(
                f"strategy='dense' needs V ({n} x {p}) and its Gram matrix in memory: "
                f"{self._dense_bytes(n, p, itemsize) / 2**20:.0f} MiB, more than `memory_budget` "
                f"({self.memory_budget / 2**20:.0f} MiB). Use strategy='blocked' (or 'auto'), or "
                "raise `memory_budget`."
            )
        if self.strategy != "auto":
            return self.strategy
        # Alg. 1 costs one gradient pass plus a min(N, P)^2 max(N, P) Gram; the randomized fit
        # n_iter + 2 gradient passes. Measured crossover on LeNet-5 (BENCHMARKS.md): about
        # 400 (n_iter + 1) examples; 256 (n_iter + 1) keeps a margin.
        cheap = min(n, p) <= _DENSE_EXAMPLES_PER_PASS * (self.n_iter + 1)
        return "dense" if fits and cheap else "blocked"

    def _check_energy(self, jac: ScoreJacobian, op: FisherVectors, data: Data) -> None:
        """One small forward: one scalar per example, deterministic (no dropout etc.)."""
        for batch in data.split(2) if isinstance(data, Tensor) else data:
            x = first_tensor(batch)[:2]
            if x.shape[0] == 0:
                continue
            x, extras = next(op.chunks(x))
            out = jac.scores(x, extras)
            if out.shape != (x.shape[0],):
                raise ValueError(
                    f"{type(jac.energy).__name__}.score must return one scalar per example, shape "
                    f"({x.shape[0]},) for a batch of {x.shape[0]}; got shape {tuple(out.shape)}."
                )
            again = jac.scores(x, extras)
            if not torch.equal(out, again):
                raise ValueError(
                    f"{type(jac.energy).__name__}.score is not deterministic: two evaluations of "
                    "the same examples differ. The NFK needs a fixed function of the parameters "
                    "(stochastic layers must be off in eval mode; random noise must be frozen "
                    "per example, see Energy.extras)."
                )
            return

    def fit(self, data: Data, progress: Callable[[int], None] | None = None) -> LowRankNFK:
        """Fit the rank-``k`` NFK on ``data`` (this process's shard of the fitting set).

        Args:
            data: a tensor of inputs ``(n, ...)``, or an iterable (e.g. a ``DataLoader``)
                of batches ``x`` or ``(x, ...)``. It must yield the same examples on every
                pass (no random augmentation; shuffling is fine).
            progress: called with the number of examples of each chunk processed, in every
                pass over ``data`` (at most ``n_iter + 2`` passes), e.g. ``bar.update``.

        Returns:
            self.

        Raises:
            ValueError: empty data, ``k + oversample > min(N, P)``, a dense problem over
                ``memory_budget``, an energy that does not return one scalar per example
                or is not deterministic; all before any pass over the data.
            NonFiniteGradientError: when some per-example gradients are not finite.
        """
        energy = self._working_energy()
        with kernel_mode(energy):
            op, n = self._prepare(data, energy, progress)
            if op.strategy == "dense":
                result = self._fit_dense(op, data)
            else:
                result = self._fit_randomized(op, data)
        op.progress = None
        self._op = op
        self._result = {
            **result,
            "num_examples": n,
            "num_parameters": op.num_parameters,
            "strategy": op.strategy,
            "mean_score": op.mean_score,
            "fisher_diagonal": op.fisher_diagonal,
        }
        return self

    def _prepare(
        self, data: Data, energy: Energy, progress: Callable[[int], None] | None = None
    ) -> tuple[FisherVectors, int]:
        """Validate, resolve the strategy, build the operator and fit its statistics."""
        check_data(data)
        jac = ScoreJacobian(energy)
        n_local = count_examples(data)
        count = self.reduce(torch.tensor([float(n_local)], dtype=torch.float64, device=jac.device))
        n, p = int(count.item()), jac.num_parameters
        if n == 0:
            raise ValueError("`data` is empty: the NFK needs at least one fitting example.")
        l = self.k + self.oversample
        if l > min(n, p):
            raise ValueError(
                f"`k` + `oversample` ({self.k} + {self.oversample} = {l}) must not exceed "
                f"min(number of examples, number of parameters) = min({n}, {p}). Lower `k` "
                "or `oversample`, or fit on more examples."
            )
        strategy = self._resolve_strategy(n, p, jac.dtype.itemsize)
        op = self._operator(jac, strategy)
        if n_local > 0:
            self._check_energy(jac, op, data)
        op.progress = progress
        op.fit_statistics(data)
        return op, n

    def _fit_dense(self, op: FisherVectors, data: Data) -> dict[str, Any]:
        local = op.materialize(data)
        v = gather_rows(local, self.reduce)
        sigma, right, _ = exact_decomposition(v, self.k)
        self._fit_embedding = local @ right
        total = torch.linalg.vector_norm(v.flatten(), dtype=torch.float64).square()
        return {
            "singular_values": sigma.to(op.dtype),
            "components": right,
            "residuals": torch.zeros(self.k, dtype=torch.float64),
            "total_variance": total.cpu(),
            "total_variance_is_exact": True,
        }

    def _fit_randomized(self, op: FisherVectors, data: Data) -> dict[str, Any]:
        # ||V||_F^2 from the first pass, unless the statistics already gave it exactly.
        first_pass_sumsq: list[float | None] = []

        def normal_matmat(z: Tensor) -> Tensor:
            want = not first_pass_sumsq and op.data_sum_of_squares is None
            m, sumsq = op.normal_matmat(data, z, frobenius=want, keep_rows=True)
            first_pass_sumsq.append(sumsq)
            return m

        ritz = subspace_iteration(
            normal_matmat,
            op.num_parameters,
            self.k,
            oversample=self.oversample,
            n_iter=self.n_iter,
            generator=torch.Generator().manual_seed(self.seed),
            dtype=op.dtype,
            device=op.device,
        )
        if op.data_sum_of_squares is not None:
            total, exact = op.data_sum_of_squares, True
        elif first_pass_sumsq[0] is not None:
            total, exact = first_pass_sumsq[0], True
        else:
            total, exact = ritz.trace_estimate.item(), False
        embedding = None
        if ritz.coefficients is not None and op.last_rows is not None:
            embedding = op.last_rows @ ritz.coefficients.to(op.last_rows.dtype)
        op.last_rows = None
        self._fit_embedding = embedding
        return {
            "singular_values": ritz.eigenvalues.sqrt().to(op.dtype).cpu(),
            "components": ritz.vectors,
            "residuals": ritz.residuals.cpu(),
            "total_variance": torch.tensor(total, dtype=torch.float64),
            "total_variance_is_exact": exact,
        }

    # -- embeddings ---------------------------------------------------------------------------
    def transform(self, data: Data) -> Tensor:
        """Embeddings :math:`e(x) = V_x P` (Eq. 4-5) of any inputs; shape (n, k).

        Local: no collective, each process embeds what it is given. On the fitting data
        this equals :math:`\\Phi\\,\\mathrm{diag}(\\sigma)` (up to the sign of each column).
        """
        check_data(data)
        op = self._fitted_operator()
        with kernel_mode(op.energy):
            return op.matmat(data, self.components.to(op.device, op.dtype))

    def _fitted_operator(self) -> FisherVectors:
        if self._op is None:
            raise RuntimeError("This LowRankNFK is not fitted yet: call `fit(data)` first.")
        return self._op

    # -- persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to embed again: hyper-parameters, parameter snapshot, statistics,
        spectrum and components (tensors and Python scalars only: ``weights_only``-loadable)."""
        op = self._fitted_operator()
        r = self._result
        assert r is not None
        return {
            "version": _STATE_VERSION,
            "hparams": {
                "k": self.k,
                "oversample": self.oversample,
                "n_iter": self.n_iter,
                "damping": self.damping,
                "strategy": self.strategy,
                "dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch."),
                "seed": self.seed,
                "memory_budget": self.memory_budget,
            },
            "theta": dict(op.jacobian.theta),
            "constants": dict(op.jacobian.constants),
            "result": {key: r[key] for key in _RESULT_KEYS},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a fitted state (from :meth:`state_dict`) onto this object's energy."""
        result = state["result"]
        energy = self._working_energy()
        jac = ScoreJacobian(energy)
        theta, constants = state["theta"], state["constants"]
        if list(theta) != jac.names or set(constants) != set(jac.constants):
            raise ValueError(
                "The saved parameter names do not match the energy's module: the state was "
                f"saved for parameters {list(theta)[:4]}..., the module has {jac.names[:4]}...."
            )
        jac.theta = {name: t.to(jac.device) for name, t in theta.items()}
        jac.constants = {name: t.to(jac.device) for name, t in constants.items()}
        op = self._operator(jac, result["strategy"])
        op.load_statistics(result["mean_score"], result["fisher_diagonal"])
        self._op = op
        self._result = dict(result)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save :meth:`state_dict` with ``torch.save``."""
        torch.save(self.state_dict(), path)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], energy: Energy, map_location: Any = None
    ) -> LowRankNFK:
        """Load a saved NFK for ``energy`` (same architecture), with ``weights_only=True``."""
        state = torch.load(path, map_location=map_location, weights_only=True)
        hparams = dict(state["hparams"])
        dtype = hparams.pop("dtype")
        nfk = cls(energy, dtype=None if dtype is None else getattr(torch, dtype), **hparams)
        nfk.load_state_dict(state)
        return nfk

    def __repr__(self) -> str:
        fitted = f", N={self.num_examples}, P={self.num_parameters}" if self.is_fitted else ""
        return (
            f"LowRankNFK({self.energy!r}, k={self.k}, oversample={self.oversample}, "
            f"n_iter={self.n_iter}, strategy={self.strategy!r}{fitted})"
        )


_RESULT_KEYS = (
    "singular_values",
    "components",
    "residuals",
    "total_variance",
    "total_variance_is_exact",
    "num_examples",
    "num_parameters",
    "strategy",
    "mean_score",
    "fisher_diagonal",
)


def check_hyperparameters(
    *,
    k: int,
    oversample: int,
    n_iter: int,
    damping: float,
    strategy: str,
    dtype: torch.dtype | None,
    seed: int,
    memory_budget: int,
) -> None:
    """The argument checks of :class:`LowRankNFK`, for callers that build one later
    (callbacks validate at construction, not at the first epoch end)."""
    _check_int("k", k, minimum=1)
    _check_int("oversample", oversample, minimum=0)
    _check_int("n_iter", n_iter, minimum=0)
    _check_int("seed", seed, minimum=None)
    _check_int("memory_budget", memory_budget, minimum=1)
    if (
        isinstance(damping, bool)
        or not isinstance(damping, (int, float))
        or not (math.isfinite(damping) and damping >= 0)
    ):
        raise ValueError(f"`damping` must be a finite number >= 0, got {damping!r}.")
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}.")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"`dtype` must be None or a floating torch.dtype, got {dtype!r}.")


def _check_int(name: str, value: object, *, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} ({value!r}).")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
