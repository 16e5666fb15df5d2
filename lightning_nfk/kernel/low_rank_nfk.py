"""Low-rank Neural Fisher Kernel: truncated SVD of the Fisher-vector matrix and embeddings.

Zhang, Zhai, Littwin, Susskind, *Learning Representation from Neural Fisher Kernel with
Low-Rank Approximation*, ICLR 2022: Eq. 4-5 (embeddings) and Algorithm 4 (randomized
SVD), computed by randomized subspace iteration (Halko et al. 2011, see
:mod:`lightning_nfk.kernel.randomized_svd`) on :math:`V^\\top V`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_nfk._io import atomic_torch_save
from lightning_nfk.kernel._data import Data, check_data, has_fixed_order
from lightning_nfk.kernel.blocks import (
    BlockSketch,
    BlockSpectrum,
    ParameterBlock,
    block_totals,
    dense_block_spectra,
    resolve_blocks,
    sketch_share,
)
from lightning_nfk.kernel.config import NFKConfig, check_tol
from lightning_nfk.kernel.distributed import Reduce, all_reduce_sum
from lightning_nfk.kernel.energies.base import Energy
from lightning_nfk.kernel.fisher_vectors import FisherVectors, PassResult, Progress
from lightning_nfk.kernel.linalg import exact_decomposition, frobenius_squared, gather_rows
from lightning_nfk.kernel.nfk_state import (
    STATE_VERSION,
    NFKFit,
    check_state,
    check_tensors,
    migrate,
)
from lightning_nfk.kernel.per_example import ScoreJacobian
from lightning_nfk.kernel.precision import kernel_mode
from lightning_nfk.kernel.preparation import prepare_fisher_vectors, working_energy
from lightning_nfk.kernel.randomized_svd import subspace_iteration

# Above 400 lines for a reason: the fit's results are explicit properties (one per NFKFit
# field, visible to IDEs and type checkers), about 80 of them.


class LowRankNFK:
    """Rank-``k`` approximation of a model's Neural Fisher Kernel, and its embeddings.

    ``fit`` computes the truncated SVD :math:`V \\approx \\Phi\\,\\mathrm{diag}(\\sigma)P^\\top`
    of the N x P Fisher-vector matrix of the fitting data (docs/design.md, section 1) without
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
        config: the :class:`NFKConfig` (k, oversample, n_iter, damping, strategy, dtype,
            seed, memory_budget, chunk_size).
        reduce: sum over processes; default: ``torch.distributed.all_reduce`` when
            initialised, else the identity. Ranks and world size always come from
            ``torch.distributed``: an injected ``reduce`` must sum over its default group.
        **options: :class:`NFKConfig` fields, the short form (``LowRankNFK(energy, k=16)``);
            with ``config`` they override its fields.

    Raises:
        TypeError, ValueError: for invalid arguments, naming the argument and the value
            (``TypeError`` for a wrong type, ``ValueError`` for a value out of range).

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
        config: NFKConfig | None = None,
        *,
        reduce: Reduce | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(energy, Energy):
            raise TypeError(
                f"`energy` must be an lightning_nfk.kernel.Energy, got {type(energy).__name__}; "
                "wrap your model, e.g. ClassifierEnergy(model)."
            )
        if config is not None and not isinstance(config, NFKConfig):
            raise TypeError(f"`config` must be an NFKConfig or None, got {type(config).__name__}.")
        unknown = set(options) - {f.name for f in dataclasses.fields(NFKConfig)}
        if unknown:
            raise TypeError(f"Unknown LowRankNFK option(s) {sorted(unknown)}; see NFKConfig.")
        self.config = dataclasses.replace(config or NFKConfig(), **options)
        if reduce is not None and not callable(reduce):
            raise TypeError(f"`reduce` must be callable or None, got {type(reduce).__name__}.")
        self.energy = energy
        self.reduce: Reduce = reduce if reduce is not None else all_reduce_sum
        self._op: FisherVectors | None = None
        self._fit: NFKFit | None = None
        self._fit_embedding: Tensor | None = None
        self._block_spectra: dict[str, BlockSpectrum] = {}
        self._fixed_order = True

    # -- public results ----------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self._fit is not None

    @property
    def result(self) -> NFKFit:
        """The fit's :class:`NFKFit`; its fields and properties are also properties of this
        object (``nfk.singular_values``, ``nfk.eigenvalues``, ..., and ``nfk.strategy_used``
        for its ``strategy``)."""
        if self._fit is None:
            raise RuntimeError("This LowRankNFK is not fitted yet: call `fit(data)` first.")
        return self._fit

    # the fit's results, also readable as `result.<name>` (NFKFit)
    @property
    def singular_values(self) -> Tensor:
        """(k,) singular values of V, descending."""
        return self.result.singular_values

    @property
    def components(self) -> Tensor:
        """(P, k) right singular vectors P (the kernel's principal directions)."""
        return self.result.components

    @property
    def residuals(self) -> Tensor:
        """(k,) relative residuals bounding each eigenvalue's error (zeros for ``dense``, NaN for ``n_iter = 0``)."""
        return self.result.residuals

    @property
    def products(self) -> int:
        """Products :math:`V^\\top V Z` (passes besides the statistics) the fit took."""
        return self.result.products

    @property
    def total_variance(self) -> Tensor:
        """:math:`\\|V\\|_F^2 = \\operatorname{tr} K`."""
        return self.result.total_variance

    @property
    def total_variance_is_exact(self) -> bool:
        """Whether ``total_variance`` is exact (else a trace estimate)."""
        return self.result.total_variance_is_exact

    @property
    def num_examples(self) -> int:
        """N, the fitting examples over all processes."""
        return self.result.num_examples

    @property
    def num_parameters(self) -> int:
        """P, the parameters the kernel differentiates."""
        return self.result.num_parameters

    @property
    def mean_score(self) -> Tensor | None:
        """(P,) z, the mean score gradient (None for energies without one)."""
        return self.result.mean_score

    @property
    def fisher_diagonal(self) -> Tensor | None:
        """(P,) I, the diagonal Fisher (None for energies without one)."""
        return self.result.fisher_diagonal

    @property
    def eigenvalues(self) -> Tensor:
        """(k,) eigenvalues of the NFK operator, :math:`\\sigma^2 / N`."""
        return self.result.eigenvalues

    @property
    def gram_eigenvalues(self) -> Tensor:
        """(k,) eigenvalues of the Gram matrix :math:`V V^\\top`, :math:`\\sigma^2`."""
        return self.result.gram_eigenvalues

    @property
    def explained_variance_ratio(self) -> Tensor:
        """(k,) each component's share of ``total_variance``."""
        return self.result.explained_variance_ratio

    @property
    def strategy_used(self) -> str:
        """The strategy the fit ran (``"auto"`` resolved)."""
        return self.result.strategy

    @property
    def block_spectra(self) -> dict[str, BlockSpectrum]:
        """The parameter blocks' spectra of the last ``fit(..., blocks=...)``, by block name
        (:class:`~lightning_nfk.kernel.blocks.BlockSpectrum`); empty when none were asked
        for, and after ``load``."""
        self.result  # noqa: B018  (raises when not fitted)
        return self._block_spectra

    @property
    def snapshot(self) -> dict[str, Tensor]:
        """The kernel module's parameters and buffers as the fit saw them, by the module's
        own names (those of its ``state_dict``): the network the components belong to."""
        jac = self._fitted_operator().jacobian
        return {**jac.theta, **jac.constants}

    @property
    def fit_embedding(self) -> Tensor | None:
        """(n_local, k) embeddings :math:`e(x) = V_x P` of this process's fitting examples,
        in dataset order, taken from the last pass at no extra cost
        (:math:`\\Phi\\,\\mathrm{diag}(\\sigma)` up to signs). None for ``n_iter = 0`` and
        after ``load``; ``transform`` gives the same for any inputs, at one more pass.

        Raises:
            RuntimeError: when ``fit`` read a loader with a random sampler (``shuffle=True``):
                its rows came in an order that cannot be recovered.
        """
        self.result  # noqa: B018  (raises when not fitted)
        if not self._fixed_order:
            raise RuntimeError(
                "`fit_embedding` is not available: `fit` read a DataLoader with a random "
                "sampler, so its rows came in an order that cannot be recovered. Use "
                "`transform(data)` on the examples you want, or fit on a loader with "
                "shuffle=False (the spectrum does not depend on the order)."
            )
        return self._fit_embedding

    # -- fitting -----------------------------------------------------------------------------
    def fit(
        self,
        data: Data,
        progress: Progress | None = None,
        *,
        start: Tensor | None = None,
        tol: float | Tensor | None = None,
        blocks: str | Sequence[str] | None = None,
    ) -> LowRankNFK:
        """Fit the rank-``k`` NFK on ``data`` (this process's shard of the fitting set).

        Args:
            data: a tensor of inputs ``(n, ...)``, or an iterable (e.g. a ``DataLoader``)
                of batches ``x`` or ``(x, ...)``. It must yield the same examples on every
                pass: random augmentation is refused. Shuffling does not change the
                spectrum, but then ``fit_embedding`` is not available.
            progress: called with the number of examples of each chunk processed, in every
                pass over ``data`` (at most ``n_iter + 2`` passes), e.g. ``bar.update``.
            start: a warm start for the subspace iteration: (P, s) directions in the
                kernel's parameter space, s < k + oversample, typically an earlier fit's
                ``components`` of the same model (the other columns of the sketch are
                Gaussian). Ignored by the ``dense`` strategy.
            tol: stop the subspace iteration once every top-k relative residual is at most
                ``tol`` (a number, or a (k,) tensor: one per component, e.g. an earlier
                fit's ``residuals``), ``n_iter`` iterations at most; ``products`` says how
                many passes it took. Ignored by the ``dense`` strategy.
            blocks: also the spectra of parameter blocks, from the same passes
                (:mod:`~lightning_nfk.kernel.blocks`): ``"auto"`` (the kernel module's
                top-level children) or parameter-name prefixes; read them from
                ``block_spectra``. They cost one more sketch's products and memory
                (``matrix_free``: one per block); they are not saved by ``save``.

        Returns:
            self.

        Raises:
            ValueError: before any pass: empty or augmented data, ``k + oversample >
                min(N, P)``, a dense problem over ``memory_budget``, an energy that does not
                return one deterministic scalar per example of its own, a ``start`` of
                another shape than (P, s < k + oversample) or not finite, a ``tol`` that
                is not positive and finite, ``blocks`` naming no parameter; after the
                statistics: identical examples or a zero kernel (``||V||_F = 0``, else found
                after the passes; the previous fit is then kept). Raised on every rank.
            NonFiniteGradientError: when some scores or per-example gradients are not finite.
        """
        self._check_tol(tol)
        self._check_start(start)
        parts, sketches = (), 1.0
        if blocks is not None:
            layout = self.energy.kernel_layout()
            parts = resolve_blocks(blocks, layout)
            p = sum(math.prod(shape) for _, shape in layout)
            sketches += sketch_share(parts, p, self.config.k + self.config.oversample)
        op = prepare_fisher_vectors(
            self.energy,
            data,
            self.config,
            reduce=self.reduce,
            progress=progress,
            sketches=sketches,
        )
        n = op.num_examples
        # the passes enter kernel_mode themselves; the sketch's algebra between them (QR,
        # Rayleigh-Ritz, the dense eigendecomposition) needs its float32/64 as well
        with kernel_mode(op.energy):
            if op.strategy == "dense":
                found = self._fit_dense(op, data, progress, parts)
            else:
                found = self._fit_randomized(op, data, progress, start, tol, parts)
            sigma, components, residuals, total, exact, embedding, products, spectra = found
        if not total > 0:
            raise ValueError(
                "The Fisher vectors of the fitting data are all zero (||V||_F = 0): the kernel "
                "is zero. Does the energy depend on the kernel module's parameters?"
            )
        self._op, self._fit_embedding, self._block_spectra = op, embedding, spectra
        self._fixed_order = has_fixed_order(data)
        self._fit = NFKFit(
            singular_values=sigma,
            components=components.to(op.device, op.dtype),  # where transform uses them
            residuals=residuals,
            total_variance=torch.tensor(total, dtype=torch.float64, device="cpu"),
            total_variance_is_exact=exact,
            num_examples=n,
            num_parameters=op.num_parameters,
            strategy=op.strategy,
            mean_score=op.statistics.mean_score,
            fisher_diagonal=op.statistics.fisher_diagonal,
            products=products,
        )
        return self

    def _check_tol(self, tol: object) -> None:
        if isinstance(tol, Tensor):
            k = self.config.k
            if tol.shape != (k,) or not bool(((tol > 0) & tol.isfinite()).all()):
                raise ValueError(
                    f"`tol` as a tensor must hold k = {k} finite numbers > 0, got shape "
                    f"{tuple(tol.shape)}."
                )
        else:
            check_tol("tol", tol)

    def _check_start(self, start: Tensor | None) -> None:
        """Before any pass: shape (P, s < k + oversample), floating point, finite."""
        if start is None:
            return
        p = sum(math.prod(shape) for _, shape in self.energy.kernel_layout())
        l = self.config.k + self.config.oversample
        shape = tuple(start.shape) if isinstance(start, Tensor) else type(start).__name__
        if (
            not isinstance(start, Tensor)
            or not start.is_floating_point()
            or start.ndim != 2
            or start.shape[0] != p
            or not 1 <= start.shape[1] < l
        ):
            raise ValueError(
                f"`start` must be a floating-point (P, s) tensor with P = {p} (the kernel's "
                f"parameters) and 1 <= s < k + oversample = {l}, got {shape}."
            )
        if not bool(torch.isfinite(start).all()):
            raise ValueError("`start` holds NaN or infinite entries.")

    def _fit_dense(
        self,
        op: FisherVectors,
        data: Data,
        progress: Progress | None,
        parts: tuple[ParameterBlock, ...],
    ):
        local = op.local_materialize(data, progress)
        v = gather_rows(local, self.reduce)
        sigma, right, _ = exact_decomposition(v, self.config.k)
        total = frobenius_squared(v).item()
        residuals = torch.zeros(self.config.k, dtype=torch.float64, device="cpu")
        spectra = dense_block_spectra(parts, v, self.config.k, total)
        return sigma.to(op.dtype), right, residuals, total, True, local @ right, 0, spectra

    def _fit_randomized(
        self,
        op: FisherVectors,
        data: Data,
        progress: Progress | None,
        start: Tensor | None,
        tol: float | Tensor | None,
        parts: tuple[ParameterBlock, ...],
    ):
        c = self.config
        sketch = (
            BlockSketch(parts, c.k, c.oversample, c.seed, op.dtype, op.device) if parts else None
        )
        # the first pass (its ||V||_F^2) and the last (its rows); not every pass's P x l
        # product, which would hold n_iter + 1 sketches in memory
        passes: list[PassResult] = []

        def normal_matmat(z: Tensor) -> Tensor:
            # ||V||_F^2 from the first pass, unless the statistics already gave it exactly
            want = not passes and op.statistics.sum_of_squares is None
            result = op.normal_matmat(
                data,
                z,
                frobenius=want,
                progress=progress,
                blocks=parts,
                block_z=sketch.operands() if sketch is not None else (),
            )
            if sketch is not None:
                sketch.record(result.block_products)
            result = result._replace(block_products=None)
            passes[1:] = [result._replace(product=None)]
            if len(passes) == 1:
                passes.insert(0, result._replace(product=None))
            return result.product

        ritz = subspace_iteration(
            normal_matmat,
            op.num_parameters,
            self.config.k,
            oversample=self.config.oversample,
            n_iter=self.config.n_iter,
            generator=torch.Generator().manual_seed(self.config.seed),
            dtype=op.dtype,
            device=op.device,
            start=start,
            tol=tol,
            agree=self.reduce,
        )
        total, exact = op.statistics.sum_of_squares, True
        if total is None:
            total = passes[0].sum_of_squares
        if total is None:
            total, exact = ritz.trace_estimate.item(), False
        rows, w = passes[-1].rows, ritz.coefficients
        embedding = None if w is None else rows @ w.to(rows.dtype)  # V P = (V Z) W
        sigma = ritz.eigenvalues.sqrt().to(op.dtype).cpu()
        spectra = {}
        if sketch is not None:
            per_tensor = op.statistics.per_tensor
            if per_tensor is None:
                per_tensor = passes[0].per_tensor
            totals = None if per_tensor is None else block_totals(parts, per_tensor)
            # one pass (n_iter = 0, or a warm fit that stopped at once): the blocks' cold
            # sketch has seen a single product, Halko et al.'s one-pass extraction
            spectra = sketch.spectra(totals, total, single_pass=sketch.passes == 1)
        return (
            sigma,
            ritz.vectors,
            ritz.residuals.cpu(),
            total,
            exact,
            embedding,
            ritz.products,
            spectra,
        )

    # -- embeddings ---------------------------------------------------------------------------
    def fit_transform(
        self,
        data: Data,
        progress: Progress | None = None,
        *,
        start: Tensor | None = None,
        tol: float | Tensor | None = None,
        blocks: str | Sequence[str] | None = None,
    ) -> Tensor:
        """:meth:`fit` on ``data``, then the (n_local, k) embeddings of this process's
        fitting examples: ``fit_embedding`` (free from the last pass) when the fit has it,
        else :meth:`transform` of ``data`` (one more pass, e.g. for ``n_iter = 0``).

        Raises:
            RuntimeError: ``data`` is a loader with a random sampler (see
                ``fit_embedding``): its order cannot be recovered.
        """
        self.fit(data, progress, start=start, tol=tol, blocks=blocks)
        embedding = self.fit_embedding
        return embedding if embedding is not None else self.transform(data)

    def transform(self, data: Data, *, check_finite: bool = True) -> Tensor:
        """Embeddings :math:`e(x) = V_x P` (Eq. 4-5) of any inputs; shape (n, k).

        Local: no collective, each process embeds what it is given. On the fitting data
        this equals :math:`\\Phi\\,\\mathrm{diag}(\\sigma)` (up to the sign of each column).
        The components already sit on the operator's device in its dtype (since ``fit`` or
        ``load``): nothing is copied per call.

        Args:
            data: a tensor of inputs ``(n, ...)`` or an iterable of batches, as for ``fit``.
            check_finite: raise when some inputs have non-finite scores or per-example
                gradients, which costs one host sync per call. With False there is no host
                sync (for per-step use on an accelerator, e.g. online distillation targets):
                such inputs then come back as rows of NaN or inf instead of an error.

        Raises:
            NonFiniteGradientError: some inputs have non-finite scores or per-example
                gradients (only with ``check_finite=True``).
        """
        check_data(data)
        op = self._fitted_operator()
        return op.local_matmat(data, self.components, check_finite=check_finite)

    @property
    def operator(self) -> FisherVectors:
        """The fitted Fisher-vector operator (parameter snapshot, statistics, strategy): for
        products with other matrices than the components.

        Raises:
            RuntimeError: not fitted.
        """
        return self._fitted_operator()

    def _fitted_operator(self) -> FisherVectors:
        if self._op is None:
            raise RuntimeError("This LowRankNFK is not fitted yet: call `fit(data)` first.")
        return self._op

    # -- persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to embed again: the energy's class, the config, the parameter
        snapshot, statistics, spectrum and components (tensors and Python scalars only:
        ``weights_only``-loadable)."""
        op = self._fitted_operator()
        return {
            "version": STATE_VERSION,
            "energy": type(self.energy).__name__,
            "energy_settings": self.energy.settings(),
            "config": self.config.as_dict(),
            "theta": dict(op.jacobian.theta),
            "constants": dict(op.jacobian.constants),
            "result": {f.name: getattr(self.result, f.name) for f in dataclasses.fields(NFKFit)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a fitted state (from :meth:`state_dict`) onto this object's energy.

        Raises:
            ValueError: a state of another energy class, or parameters whose names, shapes
                or dtypes differ from the energy's module.
        """
        check_state(state, self.energy)
        state = migrate(state)
        self.config = NFKConfig.from_dict(state["config"])
        jac = ScoreJacobian(working_energy(self.energy, self.config.dtype))
        check_tensors("parameter", state["theta"], jac.theta)
        check_tensors("buffer or frozen parameter", state["constants"], jac.constants)
        jac.theta = {name: t.to(jac.device) for name, t in state["theta"].items()}
        jac.constants = {name: t.to(jac.device) for name, t in state["constants"].items()}
        fit = NFKFit(**state["result"])
        op = FisherVectors(
            jac, self.config.operator, fit.strategy, self.reduce, columns=self.config.columns
        )
        op.load_statistics(fit.mean_score, fit.fisher_diagonal)
        # once, here: transform then never copies them (whatever `map_location` gave)
        fit = dataclasses.replace(fit, components=fit.components.to(op.device, op.dtype))
        self._op, self._fit, self._fit_embedding = op, fit, None
        self._block_spectra = {}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save :meth:`state_dict` with ``torch.save``, atomically (a temporary file beside
        ``path``, then renamed: a reader or a crash never sees half a file)."""
        atomic_torch_save(self.state_dict(), path)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], energy: Energy, map_location: Any = None
    ) -> LowRankNFK:
        """Load a saved NFK for ``energy`` (same energy class and architecture), with
        ``weights_only=True``.

        Raises:
            ValueError: an empty or foreign file (not a saved LowRankNFK), another energy
                class, or parameters that differ in name, shape or dtype.
        """
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except (EOFError, RuntimeError, pickle.UnpicklingError) as e:
            raise ValueError(
                f"{os.fspath(path)!r} is not a file saved by LowRankNFK.save: {e!r}"
            ) from e
        check_state(state, energy, path)
        nfk = cls(energy)
        nfk.load_state_dict(state)
        return nfk

    def __repr__(self) -> str:
        fitted = f", N={self.num_examples}, P={self.num_parameters}" if self.is_fitted else ""
        return f"LowRankNFK({self.energy!r}, {self.config}{fitted})"
