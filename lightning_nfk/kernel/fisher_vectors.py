"""The Fisher-vector operator :math:`V` (N x P) of an energy over the fitting data.

DESIGN.md section 2: with :math:`g_x = \\nabla_\\theta s_\\theta(x)`,

.. math::

    z = \\mathbb{E}_q[g], \\qquad U_x = g_x - z, \\qquad I = \\mathbb{E}_{\\text{FIM}}[U \\odot U],
    \\qquad V_x = U_x / \\sqrt{I + \\text{damping}}.

:math:`V` is never formed (except by :meth:`FisherVectors.materialize`): a pass over the data
computes :math:`V^\\top (V Z)` either from per-example gradient blocks (``blocked``: two
GEMMs per block, whatever ``l`` is) or from JVP/VJP products batched over the ``l`` columns
(``matrix_free``: the paper's way). Sums over the data are reduced across processes once
per pass; each process only ever sees its own rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from lightning_nfk.kernel._data import Data, iter_chunks
from lightning_nfk.kernel.distributed import Reduce
from lightning_nfk.kernel.energies.base import Energy
from lightning_nfk.kernel.per_example import ScoreJacobian


class NonFiniteGradientError(FloatingPointError):
    """Raised when some examples have non-finite per-example gradients."""


class FisherVectors:
    """Matrix-free Fisher vectors of an energy (statistics, products, rows).

    Args:
        jacobian: the energy's :class:`ScoreJacobian` (parameter snapshot).
        damping: absolute damping added to the diagonal Fisher, >= 0.
        strategy: ``"matrix_free"`` for products by JVP/VJP, else per-example gradient
            blocks (``"blocked"``, ``"dense"``).
        max_rows: rows per chunk (bounds the memory of a gradient block).
        reduce: sum over processes.
        rank, world_size: this process's place (only used to share model samples).
    """

    def __init__(
        self,
        jacobian: ScoreJacobian,
        *,
        damping: float,
        strategy: str,
        max_rows: int,
        reduce: Reduce,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.jacobian = jacobian
        self.energy: Energy = jacobian.energy
        self.damping = damping
        self.strategy = strategy
        self.matrix_free = strategy == "matrix_free"
        self.max_rows = max_rows
        self.reduce = reduce
        self.rank, self.world_size = rank, world_size
        self.dtype, self.device = jacobian.dtype, jacobian.device
        self.num_parameters = jacobian.num_parameters
        self.mean_score: Tensor | None = None  # z, (P,), working dtype
        self.fisher_diagonal: Tensor | None = None  # I, (P,), float64
        self.scale: Tensor | None = None  # 1 / sqrt(I + damping), (P,), working dtype
        self.data_sum_of_squares: float | None = None  # ||V||_F^2 when the sums allow it
        self.progress: Callable[[int], None] | None = None  # called with each chunk's size
        self.last_rows: Tensor | None = None  # V Z of the last pass with keep_rows

    # -- data ------------------------------------------------------------------------------
    def chunks(self, data: Data) -> Iterator[tuple[Tensor, tuple[Tensor, ...]]]:
        """(x, extras) chunks of the data, with the energy's per-example extras."""
        for x in iter_chunks(data, self.max_rows, self.device, self.dtype):
            yield x, self.energy.extras(x)
            if self.progress is not None:
                self.progress(x.shape[0])

    def _sample_chunks(self) -> Iterator[tuple[Tensor, tuple[Tensor, ...]]]:
        batches = self.energy.sample_batches(
            rank=self.rank, world_size=self.world_size, device=self.device, dtype=self.dtype
        )
        for batch in batches:
            for x in batch.to(self.dtype).split(self.max_rows):
                yield x, self.energy.extras(x)

    def _raise_if_bad(self, bad: Tensor, total: float, what: str) -> None:
        if bad.item() > 0:
            raise NonFiniteGradientError(
                f"{int(bad.item())} of {int(total)} {what} have non-finite per-example "
                "gradients of the energy; the Fisher kernel is undefined for them. Check the "
                "inputs and the model's numerics (e.g. log of 0, overflow)."
            )

    # -- statistics ----------------------------------------------------------------------------
    def fit_statistics(self, data: Data, num_examples: int) -> None:
        """Mean score, diagonal Fisher and (where the sums allow) :math:`\\|V\\|_F^2`.

        One pass per distinct source (fitting data, model samples). Sums of :math:`g` and
        :math:`g \\odot g` are accumulated in float64 and reduced once per source, so the
        result does not depend on batching or on the number of processes.
        """
        energy = self.energy
        sources = [s for s in dict.fromkeys((energy.centring, energy.fisher)) if s is not None]
        p = self.num_parameters
        sums: dict[str, tuple[Tensor, Tensor, float]] = {}
        for source in sources:
            chunks = self.chunks(data) if source == "data" else self._sample_chunks()
            acc = torch.zeros(2 * p + 2, dtype=torch.float64, device=self.device)
            for x, extras in chunks:
                row_sums = torch.zeros(x.shape[0], dtype=torch.float64, device=self.device)
                for sl, block in zip(
                    self.jacobian.slices, self.jacobian.gradient_blocks(x, extras)
                ):
                    g = block.to(torch.float64)
                    row_sums += g.sum(dim=1)
                    acc[sl] += g.sum(dim=0)
                    acc[p + sl.start : p + sl.stop] += g.square_().sum(dim=0)
                acc[-1] += (
                    ~torch.isfinite(row_sums)
                ).sum()  # a non-finite entry spoils its row sum
                acc[-2] += x.shape[0]
            acc = self.reduce(acc)
            count = acc[-2].item()
            what = "fitting examples" if source == "data" else "model samples"
            self._raise_if_bad(acc[-1], count, what)
            if count == 0:
                raise ValueError(f"{type(energy).__name__} produced no {what} for its statistics.")
            sums[source] = (acc[:p], acc[p : 2 * p], count)

        z = torch.zeros(p, dtype=torch.float64, device=self.device)
        if energy.centring is not None:
            s1, _, n = sums[energy.centring]
            z = s1 / n
            self.mean_score = z.to(self.dtype)
        scale64 = torch.ones_like(z)
        if energy.fisher is not None:
            s1, s2, n = sums[energy.fisher]
            fisher = ((s2 - 2 * z * s1) / n + z * z).clamp_min_(0.0)
            self.fisher_diagonal = fisher
            scale64 = (fisher + self.damping).rsqrt()
            self.scale = scale64.to(self.dtype)
        if "data" in sums:
            s1, s2, n = sums["data"]
            centred = s2 - 2 * z * s1 + n * z * z  # sum_x U_x^2
            self.data_sum_of_squares = (centred * scale64 * scale64).sum().item()
        elif not sources:
            self.data_sum_of_squares = None

    def load_statistics(self, mean_score: Tensor | None, fisher_diagonal: Tensor | None) -> None:
        self.mean_score = None if mean_score is None else mean_score.to(self.device, self.dtype)
        self.fisher_diagonal = fisher_diagonal
        if fisher_diagonal is not None:
            f = fisher_diagonal.to(self.device, torch.float64)
            self.scale = (f + self.damping).rsqrt().to(self.dtype)

    # -- products ------------------------------------------------------------------------------
    def row_blocks(self, x: Tensor, extras: tuple[Tensor, ...]) -> list[Tensor]:
        """Fisher vectors of a chunk, one (B, numel) block per parameter (never concatenated:
        the products below run block by block, which saves copying B x P entries)."""
        blocks = self.jacobian.gradient_blocks(x, extras)
        for sl, block in zip(self.jacobian.slices, blocks):
            if self.mean_score is not None:
                block.sub_(self.mean_score[sl])
            if self.scale is not None:
                block.mul_(self.scale[sl])
        return blocks

    def rows(self, x: Tensor, extras: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """Fisher vectors :math:`V_b` (B x P) of a chunk, and the count of non-finite rows."""
        v = torch.cat(self.row_blocks(x, extras), dim=1)
        return v, (~torch.isfinite(v.sum(dim=1))).sum()

    def _blocks_matmat(self, blocks: list[Tensor], z: Tensor) -> tuple[Tensor, Tensor]:
        y = z.new_zeros(blocks[0].shape[0], z.shape[1])
        for sl, block in zip(self.jacobian.slices, blocks):
            y.addmm_(block, z[sl])
        # Z has no zero entries almost surely, so a non-finite V row gives a non-finite Y row.
        return y, (~torch.isfinite(y).all(dim=1)).sum()

    def matmat_chunk(
        self, x: Tensor, extras: tuple[Tensor, ...], z: Tensor
    ) -> tuple[Tensor, Tensor]:
        """:math:`V_b Z` (B x l) of a chunk, and the count of non-finite rows."""
        if not self.matrix_free:
            return self._blocks_matmat(self.row_blocks(x, extras), z)
        t = z if self.scale is None else z * self.scale[:, None]
        y = self.jacobian.jvp(x, extras, t)
        if self.mean_score is not None:
            y = y - (self.mean_score @ t)[None, :]
        return y, (~torch.isfinite(y).all(dim=1)).sum()

    def _rmatmat_chunk(self, x: Tensor, extras: tuple[Tensor, ...], y: Tensor) -> Tensor:
        r = self.jacobian.vjp(x, extras, y)
        if self.mean_score is not None:
            r = r - self.mean_score[:, None] * y.sum(dim=0)[None, :]
        if self.scale is not None:
            r = r * self.scale[:, None]
        return r

    def matmat(self, data: Data, z: Tensor) -> Tensor:
        """:math:`V Z` for this process's rows, (n_local, l)."""
        parts = [self.matmat_chunk(x, extras, z)[0] for x, extras in self.chunks(data)]
        return torch.cat(parts) if parts else z.new_zeros(0, z.shape[1])

    def rmatmat(self, data: Data, y: Tensor) -> Tensor:
        """:math:`V^\\top Y` (P, l) for ``y`` (n_local, l) aligned with this process's rows,
        summed over processes."""
        out = y.new_zeros(self.num_parameters, y.shape[1])
        start = 0
        for x, extras in self.chunks(data):
            yb = y[start : start + x.shape[0]]
            start += x.shape[0]
            if self.matrix_free:
                out += self._rmatmat_chunk(x, extras, yb)
            else:
                for sl, block in zip(self.jacobian.slices, self.row_blocks(x, extras)):
                    out[sl].addmm_(block.T, yb)
        if start != y.shape[0]:
            raise ValueError(f"`y` has {y.shape[0]} rows; the data has {start} examples.")
        return self.reduce(out)

    def normal_matmat(
        self, data: Data, z: Tensor, *, frobenius: bool = False, keep_rows: bool = False
    ) -> tuple[Tensor, float | None]:
        """One pass: :math:`V^\\top (V Z)` (P x l) summed over processes, and, when
        ``frobenius`` and the rows are formed (not ``matrix_free``), :math:`\\|V\\|_F^2`.
        With ``keep_rows``, this process's :math:`V Z` (n_local x l) is left in ``last_rows``."""
        m = torch.zeros_like(z)
        rows: list[Tensor] = []
        tail = torch.zeros(3, dtype=torch.float64, device=self.device)  # sumsq, bad, count
        frobenius = frobenius and not self.matrix_free
        for x, extras in self.chunks(data):
            if self.matrix_free:
                y, bad = self.matmat_chunk(x, extras, z)
                m += self._rmatmat_chunk(x, extras, y)
            else:
                blocks = self.row_blocks(x, extras)
                y, bad = self._blocks_matmat(blocks, z)
                for sl, block in zip(self.jacobian.slices, blocks):
                    m[sl].addmm_(block.T, y)
                    if frobenius:
                        flat = block.reshape(-1)
                        tail[0] += torch.dot(flat, flat).double()
            tail[1] += bad
            tail[2] += x.shape[0]
            if keep_rows:
                rows.append(y)
        m = self.reduce(m)
        tail = self.reduce(tail)
        self._raise_if_bad(tail[1], tail[2].item(), "fitting examples")
        if keep_rows:
            self.last_rows = torch.cat(rows) if rows else z.new_zeros(0, z.shape[1])
        return m, (tail[0].item() if frobenius else None)

    def materialize(self, data: Data) -> Tensor:
        """This process's rows of :math:`V` (n_local x P)."""
        parts, bad, count = [], torch.zeros((), device=self.device), 0
        for x, extras in self.chunks(data):
            v, b = self.rows(x, extras)
            parts.append(v)
            bad += b
            count += x.shape[0]
        tail = torch.tensor([bad.item(), count], dtype=torch.float64, device=self.device)
        tail = self.reduce(tail)
        self._raise_if_bad(tail[0], tail[1].item(), "fitting examples")
        if not parts:
            return torch.zeros(0, self.num_parameters, dtype=self.dtype, device=self.device)
        return torch.cat(parts)
