"""The one way into the Fisher-vector operator: :func:`prepare_fisher_vectors` takes an
energy and its fitting data to a :class:`~lightning_nfk.kernel.FisherVectors` whose
statistics are fitted, ready for products.

It makes the working energy (the model in the compute dtype), checks the data and the
energy on a few examples, agrees with the other processes on N, the memory budget and
any refusal (every rank raises together), resolves the strategy and sizes the gradient
blocks, then fits the statistics (mean score, diagonal Fisher). Every fit, exact or
randomized, and every benchmark goes through it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_nfk.kernel._data import (
    Data,
    check_data,
    check_same_examples,
    count_examples,
    first_tensor,
    iter_chunks,
)
from lightning_nfk.kernel.config import NFKConfig, OperatorOptions, SketchOptions
from lightning_nfk.kernel.distributed import Reduce, all_reduce_sum, rank_and_world_size
from lightning_nfk.kernel.energies.base import Energy
from lightning_nfk.kernel.fisher_vectors import FisherVectors, Progress
from lightning_nfk.kernel.memory import (
    SKETCH_COPIES,
    activation_bytes,
    bytes_per_row,
    dense_block_rows,
    dense_peak_bytes,
    device_budget,
    sketch_bytes,
)
from lightning_nfk.kernel.per_example import ScoreJacobian
from lightning_nfk.kernel.precision import kernel_mode

_DENSE_EXAMPLES_PER_PASS = 256


def working_energy(energy: Energy, dtype: torch.dtype | None) -> Energy:
    """``energy`` in the compute dtype: ``dtype``, or the model's (float32 for half precision)."""
    current = next(p for p in energy.module.parameters() if p.requires_grad).dtype
    if dtype is None and current in (torch.float16, torch.bfloat16):
        dtype = torch.float32  # half-precision Fisher vectors overflow; QR is not accurate
    return energy if dtype is None or dtype == current else energy.to(dtype)


def _check_energy(jac: ScoreJacobian, data: Data) -> int:
    """On up to 4 examples: one scalar per example, deterministic, each example's score
    independent of the rest of its batch (no batch statistics). Returns the bytes of
    activations one example's backward keeps (:func:`activation_bytes`)."""
    for batch in data.split(4) if isinstance(data, Tensor) else data:
        x = first_tensor(batch)[:4]
        if x.shape[0] == 0:
            continue
        x = next(iter_chunks(x, 4, jac.device, jac.dtype))
        extras = jac.energy.extras(x)
        name = type(jac.energy).__name__
        out = jac.scores(x, extras)
        if out.shape != (x.shape[0],):
            raise ValueError(
                f"{name}.score must return one scalar per example, shape ({x.shape[0]},) for a "
                f"batch of {x.shape[0]}; got shape {tuple(out.shape)}."
            )
        if not _agree(out, jac.scores(x, extras)):
            raise ValueError(
                f"{name}.score is not deterministic: two evaluations of the same examples "
                "differ. The NFK needs a fixed function of the parameters (stochastic layers "
                "must be off in eval mode; random noise must be frozen per example, see "
                "Energy.extras)."
            )
        try:
            singles = [
                jac.scores(x[i : i + 1], tuple(e[i : i + 1] for e in extras)) for i in range(len(x))
            ]
        except (RuntimeError, ValueError) as e:  # e.g. BatchNorm1d on one example
            raise ValueError(
                f"{name}.score fails on a single example ({e}); the NFK differentiates each "
                "example's score alone, so the score must not need the rest of the batch."
            ) from e
        alone = torch.cat(singles)
        if not _agree(out, alone):
            raise ValueError(
                f"{name}.score of an example depends on the other examples of its batch "
                f"(scores of {len(x)} examples batched and one by one differ, max "
                f"{float((out - alone).nan_to_num().abs().max()):.3g}): a layer uses batch "
                "statistics in eval mode (BatchNorm with track_running_stats=False?). The NFK "
                "needs a per-example score: use running statistics or GroupNorm/LayerNorm."
            )
        return activation_bytes(jac, x, extras)
    return 0


def _agree(a: Tensor, b: Tensor) -> bool:
    """Equal up to sqrt(eps) of their scale, ignoring non-finite entries (a later, clearer
    error): kernels for other shapes, or GPU atomics, differ by a few eps; batch
    statistics or unfrozen noise by far more."""
    finite = a.isfinite() & b.isfinite()
    tol = torch.finfo(a.dtype).eps ** 0.5
    scale = float(a[finite].abs().max()) if finite.any() else 0.0
    return torch.allclose(a[finite], b[finite], rtol=tol, atol=tol * scale)


def prepare_fisher_vectors(
    energy: Energy,
    data: Data,
    options: OperatorOptions | NFKConfig | None = None,
    *,
    sketch: SketchOptions | None = None,
    reduce: Reduce = all_reduce_sum,
    progress: Progress | None = None,
    sketches: float = 1.0,
) -> FisherVectors:
    """The Fisher-vector operator of ``energy`` over ``data`` (this process's shard), its
    statistics fitted.

    Args:
        energy: the energy; the operator works on a copy in ``options.dtype`` when that
            differs from the model's (:func:`working_energy`), else on the model itself
            (through a snapshot of its parameters: later training does not change it).
        data: the fitting data, a tensor of inputs or an iterable of batches.
        options: the operator options; an :class:`~lightning_nfk.kernel.NFKConfig` gives
            both its operator and its sketch options.
        sketch: the randomized fit the operator is for: its width ``k + oversample`` is
            checked against ``min(N, P)`` and sizes the blocks of ``matrix_free``, and
            ``n_iter`` weighs ``strategy="auto"``. None: products of one column at a time
            (``exact_nfk``, ``materialize``).
        reduce: sum over the processes.
        progress: called with the number of examples of each chunk of the statistics pass.
        sketches: P x l sketches the fit holds besides the gradient blocks (more with
            parameter blocks: their operands in units of the kernel's), which the
            blocks' size leaves room for.

    Returns:
        The operator; ``num_examples`` is N over all processes.

    Raises:
        ValueError, TypeError: before any pass: empty or changing data, ``k + oversample >
            min(N, P)``, a dense problem over the memory budget, an energy that is not one
            deterministic per-example scalar (a refusal on one rank is raised on every
            rank); after the statistics: identical examples, a zero kernel.
        NonFiniteGradientError: non-finite scores or gradients.
    """
    if isinstance(options, NFKConfig):
        options, sketch = options.operator, sketch or options.sketch
    options = options or OperatorOptions()
    check_data(data)
    energy = working_energy(energy, options.dtype)
    with kernel_mode(energy):
        return _prepare(energy, data, options, sketch, reduce, progress, sketches)


def _prepare(
    energy: Energy,
    data: Data,
    options: OperatorOptions,
    sketch: SketchOptions | None,
    reduce: Reduce,
    progress: Progress | None,
    sketches: float,
) -> FisherVectors:
    jac = ScoreJacobian(energy)
    n_local = count_examples(data)
    _, world = rank_and_world_size()
    n, budget = _shared_sizes(jac, n_local, options, reduce)
    p = jac.num_parameters
    if n == 0:
        raise ValueError("`data` is empty: the NFK needs at least one fitting example.")
    if sketch is not None:
        sketch.check_columns(
            min(n, p), f"min(number of examples, number of parameters) = min({n}, {p})"
        )
    columns = 0 if sketch is None else sketch.columns
    passes = 1 if sketch is None else sketch.n_iter + 1

    def operator(strategy: str, budget: int, activations: int = 0) -> FisherVectors:
        return FisherVectors(
            jac,
            options,
            strategy,
            reduce,
            columns=columns,
            sketches=sketches,
            memory_budget=budget,
            activations=activations,
            num_examples=n,
        )

    # a dense problem that cannot fit even without activations, or a sketch over the
    # budget: refused before any evaluation
    first = _resolve_strategy(
        options, passes, n, p, jac.dtype.itemsize, budget, operator("blocked", budget), world
    )
    if first != "dense" and sketch is not None:
        _check_sketch_fits(p, columns, sketches, jac.dtype.itemsize, budget, options)
    activations = _checked_activations(jac, data, n_local, reduce)
    block = operator("blocked", budget, activations)
    strategy = _resolve_strategy(options, passes, n, p, jac.dtype.itemsize, budget, block, world)
    if strategy != "dense" and sketch is not None:  # again, with the measured activations
        _check_sketch_fits(p, columns, sketches, jac.dtype.itemsize, budget, options, activations)
    if strategy == "dense":  # the gradient blocks get what V leaves
        rows = options.chunk_size or dense_block_rows(
            n, p, jac.dtype.itemsize, block.bytes_per_row, budget, world
        )
        budget = rows * block.bytes_per_row
    op = operator(strategy, budget, activations)
    stats = op.fit_statistics(data, progress)
    if stats.sum_of_squares == 0:
        raise ValueError(
            "The Fisher vectors of the fitting data are all zero (||V||_F = 0): the kernel is "
            "zero. Does the energy depend on the kernel module's parameters?"
        )
    return op


def _check_sketch_fits(
    p: int,
    columns: int,
    sketches: float,
    itemsize: int,
    budget: int,
    options: OperatorOptions,
    activations: int = 0,
) -> None:
    """Refuse, before any pass, a randomized fit whose P x l operands and one gradient
    row exceed the memory budget (the gradient blocks would get nothing, and the fit
    would run over the budget unbounded)."""
    need = int(sketches * sketch_bytes(p, columns, itemsize))
    if need + bytes_per_row(p, itemsize, activations) <= budget:
        return
    whose = "`memory_budget`" if options.memory_budget else "the memory budget"
    if not options.memory_budget:
        whose += " (half of the device's available memory; set `memory_budget` to choose)"
    blocks = f" (x {sketches:.2f} with the parameter blocks')" if sketches > 1 else ""
    raise ValueError(
        f"The randomized fit holds {SKETCH_COPIES} P x l operands{blocks} with P = {p} "
        f"parameters and l = k + oversample = {columns}: {need / 2**20:.1f} MiB, and at "
        f"least one gradient row beside them: more than {whose}: {budget / 2**20:.1f} "
        "MiB. Lower k + oversample, restrict the kernel to "
        "fewer parameters (the energy's `parameters=`), or raise `memory_budget`."
    )


def _shared_sizes(
    jac: ScoreJacobian, n_local: int, options: OperatorOptions, reduce: Reduce
) -> tuple[int, int]:
    """N over all ranks and the smallest memory budget of all ranks (one collective), so
    that every rank sizes and picks the same strategy."""
    rank, world = rank_and_world_size()
    budget = options.memory_budget or device_budget(jac.device, processes_per_host=world)
    shared = torch.zeros(1 + world, dtype=torch.float64, device=jac.device)
    shared[0], shared[1 + rank] = n_local, budget
    shared = reduce(shared).tolist()
    return int(shared[0]), int(min(shared[1:]))


def _checked_activations(jac: ScoreJacobian, data: Data, n_local: int, reduce: Reduce) -> int:
    """Check this rank's data (the same examples in every pass, a score the energy can
    differentiate) and return the largest activations of all ranks (one collective: the
    same sizing everywhere). Every rank raises when any rank refused its shard."""
    rank, world = rank_and_world_size()
    error, activations = None, 0
    if n_local > 0:
        try:
            check_same_examples(data)
            activations = _check_energy(jac, data)
        except (ValueError, TypeError) as e:
            error = e
    checked = torch.zeros(1 + world, dtype=torch.float64, device=jac.device)
    checked[0], checked[1 + rank] = float(error is not None), activations
    checked = reduce(checked).tolist()
    if error is not None:
        raise error
    if checked[0] > 0:
        raise ValueError("Another process refused its shard of the fitting data (see its error).")
    return int(max(checked[1:]))


def _resolve_strategy(
    options: OperatorOptions,
    passes: int,
    n: int,
    p: int,
    itemsize: int,
    budget: int,
    block: FisherVectors,
    world: int,
) -> str:
    rows = options.chunk_size or dense_block_rows(
        n, p, itemsize, block.bytes_per_row, budget, world
    )
    need = dense_peak_bytes(n, p, itemsize, rows * block.bytes_per_row, world)
    fits = need <= budget
    if options.strategy == "dense" and not fits:
        whose = "`memory_budget`" if options.memory_budget else "the memory budget"
        if not options.memory_budget:
            whose += " (half of the device's available memory; set `memory_budget` to choose)"
        raise ValueError(
            f"The dense fit (exact_nfk, strategy='dense') needs V ({n} x {p}) with a gradient "
            f"block, then V with its Gram matrix's eigendecomposition, in memory: "
            f"{need / 2**20:.0f} MiB at its peak, more than {whose}: {budget / 2**20:.0f} MiB. "
            "Raise `memory_budget`, fit fewer examples, or use LowRankNFK with "
            "strategy='blocked' or 'auto'."
        )
    if options.strategy != "auto":
        return options.strategy
    # Alg. 1 costs one gradient pass plus a min(N, P)^2 max(N, P) Gram; the randomized fit
    # `passes` (n_iter + 1) gradient passes and one for the statistics. Measured crossover
    # on LeNet-5: about 400 (n_iter + 1) examples; 256 (n_iter + 1) keeps a margin.
    cheap = min(n, p) <= _DENSE_EXAMPLES_PER_PASS * passes
    return "dense" if fits and cheap else "blocked"
