"""The Fisher-vector operator :math:`V` (N x P) of an energy over the fitting data.

docs/design.md, sections 1 and 3: with :math:`g_x = \\nabla_\\theta s_\\theta(x)`,

.. math::

    z = \\mathbb{E}_q[g], \\qquad U_x = g_x - z, \\qquad I = \\mathbb{E}_{\\text{FIM}}[U \\odot U],
    \\qquad V_x = U_x / \\sqrt{I + \\text{damping}}.

:math:`V` is never formed (except by :meth:`FisherVectors.materialize`): a pass over the data
computes :math:`V^\\top (V Z)` either from per-example gradient blocks (``blocked``: two
GEMMs per block, whatever ``l`` is) or from JVP/VJP products batched over the ``l`` columns
(``matrix_free``: the paper's way). Sums over the data are reduced across processes once
per pass; each process only ever sees its own rows.

The operator is built by :func:`~lightning_nfk.kernel.prepare_fisher_vectors` (the
preparation module), the one way in for the exact and randomized fits. Products named
``local_*`` return this process's rows and involve no collective; the others
(``fit_statistics``, ``rmatmat``, ``normal_matmat``) are summed over the processes. Each
runs in :func:`~lightning_nfk.kernel.precision.kernel_mode` (eval mode, float32/64, the
global RNG untouched).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor

from lightning_nfk.kernel._data import Data, count_examples, iter_chunks
from lightning_nfk.kernel.blocks import ParameterBlock
from lightning_nfk.kernel.config import OperatorOptions
from lightning_nfk.kernel.distributed import Reduce, rank_and_world_size
from lightning_nfk.kernel.memory import (
    DENSE_BLOCK_ROWS,
    bytes_per_row,
    device_budget,
    sketch_bytes,
)
from lightning_nfk.kernel.per_example import ScoreJacobian
from lightning_nfk.kernel.precision import kernel_mode

Progress = Callable[[int], None]
_MAX_BLOCK_ROWS = 1024
_MAX_MATRIX_FREE_ROWS = 128
_Method = TypeVar("_Method", bound=Callable)


def _in_kernel_mode(method: _Method) -> _Method:
    """Run an operator's pass in :func:`kernel_mode` of its energy."""

    @functools.wraps(method)
    def wrapper(self: FisherVectors, *args, **kwargs):
        with kernel_mode(self.energy):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class NonFiniteGradientError(FloatingPointError):
    """Raised when some examples have non-finite scores or per-example gradients."""


def raise_if_nonfinite(bad: float, total: float, what: str) -> None:
    """The one message for non-finite scores or gradients: how many of how many."""
    if bad > 0:
        raise NonFiniteGradientError(
            f"{int(bad)} of {int(total)} {what} have non-finite scores or per-example "
            "gradients of the energy; the Fisher kernel is undefined for them. Check the "
            "inputs and the model's numerics (e.g. log of 0, overflow)."
        )


def nonfinite_rows(t: Tensor) -> Tensor:
    """Number of rows of ``t`` (B, m) with a non-finite entry (0-dim tensor)."""
    return (~torch.isfinite(t).all(dim=1)).sum()


@dataclass(frozen=True)
class Statistics:
    """Mean score, diagonal Fisher and, where the sums give it, :math:`\\|V\\|_F^2`."""

    mean_score: Tensor | None  # z, (P,), working dtype
    fisher_diagonal: Tensor | None  # I, (P,), float64
    sum_of_squares: float | None = None  # ||V||_F^2 of the fitting data
    # its terms per parameter tensor (float64, CPU), for the traces of parameter blocks
    per_tensor: Tensor | None = None


class PassResult(NamedTuple):
    """One pass over the data: :math:`V^\\top (V Z)` summed over processes, :math:`\\|V\\|_F^2`
    when asked for and the rows were formed, and this process's rows :math:`V Z`; with
    parameter blocks, each block's :math:`V_b^\\top (V_b Z_b)` (summed over processes)
    and, with the norm, its terms per parameter tensor (float64, CPU)."""

    product: Tensor
    sum_of_squares: float | None
    rows: Tensor
    block_products: list[Tensor] | None = None
    per_tensor: Tensor | None = None


class FisherVectors:
    """Matrix-free Fisher vectors of an energy (statistics, products, rows). Built, and its
    statistics fitted, by :func:`~lightning_nfk.kernel.prepare_fisher_vectors`; a saved
    fit rebuilds one with :meth:`load_statistics`.

    Args:
        jacobian: the energy's :class:`ScoreJacobian` (parameter snapshot).
        options: damping and chunk size (``chunk_size``, else from the memory budget).
        strategy: ``"matrix_free"`` for products by JVP/VJP, else per-example gradient
            blocks (``"blocked"``, ``"dense"``).
        reduce: sum over processes.
        columns: the width ``l`` of the products the operator is for (the sketch's
            ``k + oversample``; 0 for one column at a time): sizes the blocks.
        sketches: P x l sketches sharing the budget with the blocks (more than 1 with
            parameter blocks: theirs in units of the kernel's).
        memory_budget: bytes for a block; ``None``: ``options.memory_budget``, else the
            device's default (:func:`~lightning_nfk.kernel.memory.device_budget`).
        activations: bytes of activations one example's backward keeps
            (:func:`~lightning_nfk.kernel.memory.activation_bytes`; 0 when unknown).
        num_examples: N over all processes, when known.
    """

    def __init__(
        self,
        jacobian: ScoreJacobian,
        options: OperatorOptions,
        strategy: str,
        reduce: Reduce,
        *,
        columns: int = 0,
        sketches: float = 1.0,
        memory_budget: int | None = None,
        activations: int = 0,
        num_examples: int | None = None,
    ) -> None:
        self.jacobian, self.energy = jacobian, jacobian.energy
        self.damping, self.strategy, self.reduce = options.damping, strategy, reduce
        self.num_examples = num_examples
        self.matrix_free = strategy == "matrix_free"
        self.rank, self.world_size = rank_and_world_size()  # to share out model samples
        self.dtype, self.device = jacobian.dtype, jacobian.device
        self.num_parameters = p = jacobian.num_parameters
        budget = memory_budget or options.memory_budget or device_budget(self.device)
        width = columns if self.matrix_free else 0
        self.bytes_per_row = bytes_per_row(p, self.dtype.itemsize, activations, width)
        if strategy == "dense":  # V comes out of the budget: `memory_budget` is what it leaves
            cap, fixed = DENSE_BLOCK_ROWS, 0
        else:  # the randomized fit's P x l operands come out of the same budget
            cap = _MAX_MATRIX_FREE_ROWS if self.matrix_free else _MAX_BLOCK_ROWS
            fixed = int(sketches * sketch_bytes(p, columns, self.dtype.itemsize))
        blocks = max(0, budget - fixed)
        self.max_rows = options.chunk_size or max(1, min(blocks // self.bytes_per_row, cap))
        self.statistics = Statistics(None, None)
        self.scale: Tensor | None = None  # 1 / sqrt(I + damping), (P,), working dtype

    @property
    def mean_score(self) -> Tensor | None:
        return self.statistics.mean_score

    def with_strategy(self, strategy: str) -> FisherVectors:
        """This operator (snapshot, statistics, block size) computing its products by
        ``strategy``: ``"matrix_free"`` (JVP/VJP) or ``"blocked"`` (gradient blocks)."""
        if strategy not in ("blocked", "matrix_free"):
            raise ValueError(f"`strategy` must be 'blocked' or 'matrix_free', got {strategy!r}.")
        op = copy.copy(self)
        op.strategy, op.matrix_free = strategy, strategy == "matrix_free"
        return op

    # -- data ------------------------------------------------------------------------------
    def chunks(
        self, data: Data, progress: Progress | None = None
    ) -> Iterator[tuple[Tensor, tuple[Tensor, ...]]]:
        """(x, extras) chunks of the data, with the energy's per-example extras."""
        for x in iter_chunks(data, self.max_rows, self.device, self.dtype):
            yield x, self.energy.extras(x)
            if progress is not None:
                progress(x.shape[0])

    def _sample_chunks(self) -> Iterator[tuple[Tensor, tuple[Tensor, ...]]]:
        batches = self.energy.sample_batches(
            rank=self.rank, world_size=self.world_size, device=self.device, dtype=self.dtype
        )
        for batch in batches:
            for x in batch.detach().to(self.dtype).split(self.max_rows):
                yield x, self.energy.extras(x)

    def _column_sums(self, block: Tensor, out: Tensor) -> Tensor:
        """Adds the column sums of g and g * g (float64) into ``out`` (2, P); returns the
        float64 row sums of g (non-finite where a row is). One parameter's columns at a
        time, so that the float64 copy stays small."""
        row_sums = out.new_zeros(block.shape[0])
        for sl in self.jacobian.slices:
            g = block[:, sl].to(torch.float64)
            row_sums += g.sum(dim=1)
            out[0, sl] += g.sum(dim=0)
            out[1, sl] += g.square_().sum(dim=0)
        return row_sums

    def _centred_sum_of_squares(self, sums: Tensor, n: float, z: Tensor, s: Tensor) -> Tensor:
        """(P,) :math:`\\sum_x (g_x - z)^2 s^2` from column sums (float64)."""
        return (sums[1] - 2 * z * sums[0] + n * z * z) * s * s

    # -- statistics ----------------------------------------------------------------------------
    @_in_kernel_mode
    def fit_statistics(self, data: Data, progress: Progress | None = None) -> Statistics:
        """Mean score, diagonal Fisher and (where the sums allow) :math:`\\|V\\|_F^2`; the
        operator keeps them for its products.

        One pass per distinct source (fitting data, model samples). Sums of :math:`g` and
        :math:`g \\odot g` are accumulated in float64 and reduced once per source, so the
        result does not depend on batching or on the number of processes.

        Raises:
            NonFiniteGradientError: some examples have non-finite gradients.
            ValueError: no model samples, or fitting examples whose centred score gradients
                are all zero (identical examples: the kernel is zero).
        """
        energy = self.energy
        sources = [s for s in dict.fromkeys((energy.centring, energy.fisher)) if s is not None]
        p = self.num_parameters
        sums: dict[str, tuple[Tensor, float]] = {}
        for source in sources:
            chunks = self.chunks(data, progress) if source == "data" else self._sample_chunks()
            # [sum of g | non-finite rows] over [sum of g * g | rows]: one reduce per source
            acc = torch.zeros(2, p + 1, dtype=torch.float64, device=self.device)
            column_sums, nonfinite, count = acc[:, :p], acc[0, p], acc[1, p]
            for x, extras in chunks:
                row_sums = self._column_sums(self.jacobian.gradients(x, extras), column_sums)
                nonfinite += nonfinite_rows(row_sums[:, None])
                count += x.shape[0]
            acc = self.reduce(acc)
            column_sums, nonfinite, count = acc[:, :p], acc[0, p].item(), acc[1, p].item()
            what = "fitting examples" if source == "data" else "model samples"
            raise_if_nonfinite(nonfinite, count, what)
            if count == 0:
                raise ValueError(f"{type(energy).__name__} produced no {what} for its statistics.")
            sums[source] = (column_sums, count)

        z = torch.zeros(p, dtype=torch.float64, device=self.device)
        if energy.centring is not None:
            s, n = sums[energy.centring]
            z = s[0] / n
        scale64, fisher = torch.ones_like(z), None
        if energy.fisher is not None:
            s, n = sums[energy.fisher]
            fisher = (self._centred_sum_of_squares(s, n, z, scale64) / n).clamp_min_(0.0)
            scale64 = (fisher + self.damping).rsqrt()
        total = None
        if "data" in sums:
            s, n = sums["data"]
            spread = self._centred_sum_of_squares(s, n, z, torch.ones_like(z)).sum()
            eps = torch.finfo(self.dtype).eps
            if energy.centring == "data" and spread <= (16 * eps) ** 2 * s[1].sum():
                raise ValueError(
                    f"The {int(n)} fitting examples have the same score gradient (up to "
                    "round-off), so every centred Fisher vector is zero and the kernel is zero: "
                    "fit on distinct examples (identical copies of one input?)."
                )
            per_column = self._centred_sum_of_squares(s, n, z, scale64)
            total, per_tensor = per_column.sum().item(), self._per_tensor(per_column)
        else:
            per_tensor = None
        return self.load_statistics(
            None if energy.centring is None else z.to(self.dtype), fisher, total, per_tensor
        )

    def _per_tensor(self, per_column: Tensor) -> Tensor:
        """(T,) sums of a (P,) vector over each parameter tensor's columns (float64, CPU)."""
        return torch.stack([per_column[sl].sum() for sl in self.jacobian.slices]).cpu()

    def load_statistics(
        self,
        mean_score: Tensor | None,
        fisher_diagonal: Tensor | None,
        sum_of_squares: float | None = None,
        per_tensor: Tensor | None = None,
    ) -> Statistics:
        """Set the statistics (fitted or restored from a saved state)."""
        if mean_score is not None:
            mean_score = mean_score.to(self.device, self.dtype)
        self.statistics = Statistics(mean_score, fisher_diagonal, sum_of_squares, per_tensor)
        if fisher_diagonal is not None:
            f = fisher_diagonal.to(self.device, torch.float64)
            self.scale = (f + self.damping).rsqrt().to(self.dtype)
        return self.statistics

    # -- products ------------------------------------------------------------------------------
    # V Z = G (s * Z) - 1 (z . (s * Z)) and V^T Y = s * (G^T Y - z (1^T Y)): centring and
    # scaling are folded into the (P x l) operands once per pass instead of touching every
    # B x P gradient block (about 7% of a LeNet-5 pass).
    def _fold(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        t = z if self.scale is None else z * self.scale[:, None]
        return t, (None if self.mean_score is None else self.mean_score @ t)

    def _unfold(self, m: Tensor, y_sum: Tensor) -> Tensor:
        """In place on the accumulator ``m``: no P x l temporaries."""
        if self.mean_score is not None:
            m.addr_(self.mean_score, y_sum.to(m.dtype), alpha=-1)
        return m if self.scale is None else m.mul_(self.scale[:, None])

    def _matmat_folded(
        self, x: Tensor, extras: tuple[Tensor, ...], t: Tensor, c: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """V_b Z from the folded operands; the raw gradient block G_b (B, P) when it was
        formed (one GEMM for the whole block: per parameter tensor, a deep network's
        hundred small GEMMs cost more kernel launches than the copy into one block)."""
        if self.matrix_free:
            y, block = self.jacobian.jvp(x, extras, t), None
        else:
            block = self.jacobian.gradients(x, extras)
            y = block @ t
        # Z has no zero entries almost surely, so a non-finite V row gives a non-finite Y row.
        return (y if c is None else y - c[None, :]), block

    def _rmatmat_raw(
        self,
        x: Tensor,
        extras: tuple[Tensor, ...],
        y: Tensor,
        block: Tensor | None,
        out: Tensor,
    ) -> None:
        """out += G_b^T Y_b (unfolded: no centring or scaling)."""
        if block is None:
            out += self.jacobian.vjp(x, extras, y)
        else:
            out.addmm_(block.T, y)

    @_in_kernel_mode
    def local_matmat(
        self,
        data: Data,
        z: Tensor,
        progress: Progress | None = None,
        *,
        check_finite: bool = True,
    ) -> Tensor:
        """:math:`V Z` for this process's rows, (n_local, l); no collective.

        Args:
            check_finite: raise on rows with non-finite gradients (one host sync); with
                False no host sync, and such rows come back non-finite.

        Raises:
            NonFiniteGradientError: naming how many inputs have non-finite gradients.
        """
        t, c = self._fold(z)
        parts = [self._matmat_folded(x, e, t, c)[0] for x, e in self.chunks(data, progress)]
        out = torch.cat(parts) if parts else z.new_zeros(0, z.shape[1])
        if check_finite:
            raise_if_nonfinite(nonfinite_rows(out).item(), out.shape[0], "inputs")
        return out

    @_in_kernel_mode
    def rmatmat(self, data: Data, y: Tensor) -> Tensor:
        """:math:`V^\\top Y` (P, l) for ``y`` (n_local, l) aligned with this process's rows,
        summed over processes."""
        out, start = y.new_zeros(self.num_parameters, y.shape[1]), 0
        for x, extras in self.chunks(data):
            block = None if self.matrix_free else self.jacobian.gradients(x, extras)
            self._rmatmat_raw(x, extras, y[start : start + x.shape[0]], block, out)
            start += x.shape[0]
        if start != y.shape[0]:
            raise ValueError(f"`y` has {y.shape[0]} rows; the data has {start} examples.")
        return self.reduce(self._unfold(out, y.sum(dim=0)))

    @_in_kernel_mode
    def normal_matmat(
        self,
        data: Data,
        z: Tensor,
        *,
        frobenius: bool = False,
        progress: Progress | None = None,
        blocks: Sequence[ParameterBlock] = (),
        block_z: Sequence[Tensor] = (),
    ) -> PassResult:
        """One pass: :math:`V^\\top (V Z)` (P x l) summed over processes, this process's rows
        :math:`V Z`, and, when ``frobenius`` and the rows are formed (not ``matrix_free``),
        :math:`\\|V\\|_F^2`. With parameter ``blocks`` (:mod:`~lightning_nfk.kernel.blocks`)
        and their operands ``block_z`` ((P_b, l_b) each), also each block's
        :math:`V_b^\\top (V_b Z_b)` from the same gradients."""
        t, c = self._fold(z)
        m = torch.zeros_like(z)
        p = self.num_parameters
        frobenius = frobenius and not self.matrix_free
        cols = torch.zeros(2, p, dtype=torch.float64, device=self.device)
        rows: list[Tensor] = []
        sub = _BlockProducts(self, blocks, block_z)
        for x, extras in self.chunks(data, progress):
            y, block = self._matmat_folded(x, extras, t, c)
            self._rmatmat_raw(x, extras, y, block, m)
            sub.add(x, extras, block)
            if frobenius and block is not None:
                self._column_sums(block, cols)
            rows.append(y)
        y_all = torch.cat(rows) if rows else z.new_zeros(0, z.shape[1])
        m = self.reduce(self._unfold(m, y_all.sum(dim=0)))
        block_products = sub.result() if blocks else None
        nonfinite, count = self.reduce(_row_counts(y_all)).tolist()
        raise_if_nonfinite(nonfinite, count, "fitting examples")
        if not frobenius:
            return PassResult(m, None, y_all, block_products)
        cols = self.reduce(cols)
        z64 = torch.zeros(p, dtype=torch.float64, device=self.device)
        if self.mean_score is not None:
            z64 = self.mean_score.double()
        s64 = torch.ones_like(z64) if self.scale is None else self.scale.double()
        per_column = self._centred_sum_of_squares(cols, count, z64, s64)
        return PassResult(
            m, per_column.sum().item(), y_all, block_products, self._per_tensor(per_column)
        )

    @_in_kernel_mode
    def local_materialize(self, data: Data, progress: Progress | None = None) -> Tensor:
        """This process's rows of :math:`V` (n_local x P)."""
        # filled in place: V once in memory, not its chunks and their concatenation
        v = torch.empty(
            count_examples(data), self.num_parameters, dtype=self.dtype, device=self.device
        )
        # checked a block at a time: `isfinite` of all of V would hold (itemsize + 3) N P
        # bytes more (a copy and three boolean masks)
        counts = torch.zeros(2, dtype=torch.float64, device=self.device)
        start = 0
        for x, extras in self.chunks(data, progress):
            rows = v[start : start + x.shape[0]]
            rows.copy_(self.jacobian.gradients(x, extras))
            if self.mean_score is not None:
                rows.sub_(self.mean_score)
            if self.scale is not None:
                rows.mul_(self.scale)
            counts += _row_counts(rows)
            start += x.shape[0]
        if start != v.shape[0]:
            raise ValueError(f"`data` gave {start} examples; it had {v.shape[0]} when counted.")
        nonfinite, count = self.reduce(counts).tolist()
        raise_if_nonfinite(nonfinite, count, "fitting examples")
        return v


class _BlockProducts:
    """Accumulates :math:`V_b^\\top (V_b Z_b)` for each parameter block over a pass: two GEMMs
    on the block's column slice of a gradient block, or (``matrix_free``) a JVP and a VJP
    with the block's operand embedded in P rows. Centring and scaling are folded into the
    operands as for the whole kernel (``_fold``/``_unfold`` on the block's rows)."""

    def __init__(
        self, op: FisherVectors, blocks: Sequence[ParameterBlock], block_z: Sequence[Tensor]
    ) -> None:
        if len(blocks) != len(block_z):
            raise ValueError(f"{len(blocks)} parameter blocks but {len(block_z)} block operands.")
        self.op, self.blocks = op, tuple(blocks)
        mean, scale = op.mean_score, op.scale
        self.t, self.c = [], []
        for b, zb in zip(self.blocks, block_z):
            tb = zb if scale is None else zb * b.take(scale)[:, None]
            self.t.append(tb)
            self.c.append(None if mean is None else b.take(mean) @ tb)
        self.m = [torch.zeros_like(zb) for zb in block_z]
        # matrix_free: each operand embedded in P rows once per pass, not per chunk
        self.tangents = (
            [b.embed(tb, op.num_parameters) for b, tb in zip(self.blocks, self.t)]
            if op.matrix_free
            else []
        )
        self.y_sum = [zb.new_zeros(zb.shape[1]) for zb in block_z]

    def add(self, x: Tensor, extras: tuple[Tensor, ...], block: Tensor | None) -> None:
        op = self.op
        for i, (b, tb, cb, mb, ys) in enumerate(
            zip(self.blocks, self.t, self.c, self.m, self.y_sum)
        ):
            if block is None:  # matrix_free: the operand in the block's rows of P
                yb = op.jacobian.jvp(x, extras, self.tangents[i])
            else:
                gb = b.take(block, dim=1)
                yb = gb @ tb
            if cb is not None:
                yb = yb - cb[None, :]
            if block is None:
                mb += b.take(op.jacobian.vjp(x, extras, yb))
            else:
                mb.addmm_(gb.T, yb)
            ys += yb.sum(dim=0)

    def result(self) -> list[Tensor]:
        """The blocks' products, summed over processes (one collective for all)."""
        op, mean, scale = self.op, self.op.mean_score, self.op.scale
        for b, mb, ys in zip(self.blocks, self.m, self.y_sum):
            if mean is not None:
                mb.addr_(b.take(mean), ys.to(mb.dtype), alpha=-1)
            if scale is not None:
                mb.mul_(b.take(scale)[:, None])
        flat = op.reduce(torch.cat([mb.reshape(-1) for mb in self.m]))
        return [
            part.view_as(mb) for part, mb in zip(flat.split([mb.numel() for mb in self.m]), self.m)
        ]


def _row_counts(rows: Tensor) -> Tensor:
    """(2,) float64 on the rows' device: [rows with a non-finite entry, all rows]."""
    counts = torch.zeros(2, dtype=torch.float64, device=rows.device)
    counts[0] = nonfinite_rows(rows)
    counts[1] = rows.shape[0]
    return counts
