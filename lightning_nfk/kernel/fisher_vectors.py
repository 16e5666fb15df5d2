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
    def fit_statistics(self, data: Data) -> None:
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
                # a non-finite entry spoils its row's sum
                acc[-1] += (~torch.isfinite(row_sums)).sum()
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

    def load_statistics(self, mean_score: Tensor | None, fisher_diagonal: Tensor | None) -> None:
        self.mean_score = None if mean_score is None else mean_score.to(self.device, self.dtype)
        self.fisher_diagonal = fisher_diagonal
        if fisher_diagonal is not None:
            f = fisher_diagonal.to(self.device, torch.float64)
            self.scale = (f + self.damping).rsqrt().to(self.dtype)

    # -- products ------------------------------------------------------------------------------
    def rows(self, x: Tensor, extras: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """Fisher vectors :math:`V_b` (B x P) of a chunk, and the count of non-finite rows."""
        v = self.jacobian.gradients(x, extras)
        if self.mean_score is not None:
            v.sub_(self.mean_score)
        if self.scale is not None:
            v.mul_(self.scale)
        return v, (~torch.isfinite(v.sum(dim=1))).sum()

    # V Z = G (s * Z) - 1 (z . (s * Z)) and V^T Y = s * (G^T Y - z (1^T Y)): centring and
    # scaling are folded into the (P x l) operands once per pass instead of touching every
    # B x P gradient block (about 7% of a LeNet-5 pass).
    def _fold(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        t = z if self.scale is None else z * self.scale[:, None]
        return t, (None if self.mean_score is None else self.mean_score @ t)

    def _unfold(self, m: Tensor, y_sum: Tensor) -> Tensor:
        if self.mean_score is not None:
            m = m - self.mean_score[:, None] * y_sum[None, :]
        return m if self.scale is None else m * self.scale[:, None]

    def _matmat_folded(
        self, x: Tensor, extras: tuple[Tensor, ...], t: Tensor, c: Tensor | None
    ) -> tuple[Tensor, Tensor, list[Tensor] | None]:
        """V_b Z from the folded operands; the raw gradient blocks when they were formed."""
        if self.matrix_free:
            y, blocks = self.jacobian.jvp(x, extras, t), None
        else:
            blocks = self.jacobian.gradient_blocks(x, extras)
            y = t.new_zeros(x.shape[0], t.shape[1])
            for sl, block in zip(self.jacobian.slices, blocks):
                y.addmm_(block, t[sl])
        if c is not None:
            y = y - c[None, :]
        # Z has no zero entries almost surely, so a non-finite V row gives a non-finite Y row.
        return y, (~torch.isfinite(y).all(dim=1)).sum(), blocks

    def _rmatmat_raw(
        self,
        x: Tensor,
        extras: tuple[Tensor, ...],
        y: Tensor,
        blocks: list[Tensor] | None,
        out: Tensor,
    ) -> None:
        """out += G_b^T Y_b (unfolded: no centring or scaling)."""
        if blocks is None:
            out += self.jacobian.vjp(x, extras, y)
        else:
            for sl, block in zip(self.jacobian.slices, blocks):
                out[sl].addmm_(block.T, y)

    def matmat(self, data: Data, z: Tensor, what: str = "inputs") -> Tensor:
        """:math:`V Z` for this process's rows, (n_local, l); no collective.

        Raises:
            NonFiniteGradientError: naming how many of the ``what`` have non-finite gradients.
        """
        t, c = self._fold(z)
        parts, bad, count = [], 0, 0
        for x, extras in self.chunks(data):
            y, b, _ = self._matmat_folded(x, extras, t, c)
            parts.append(y)
            bad += int(b.item())
            count += x.shape[0]
        self._raise_if_bad(torch.tensor(bad), count, what)
        return torch.cat(parts) if parts else z.new_zeros(0, z.shape[1])

    def rmatmat(self, data: Data, y: Tensor) -> Tensor:
        """:math:`V^\\top Y` (P, l) for ``y`` (n_local, l) aligned with this process's rows,
        summed over processes."""
        out = y.new_zeros(self.num_parameters, y.shape[1])
        start = 0
        for x, extras in self.chunks(data):
            yb = y[start : start + x.shape[0]]
            start += x.shape[0]
            blocks = None if self.matrix_free else self.jacobian.gradient_blocks(x, extras)
            self._rmatmat_raw(x, extras, yb, blocks, out)
        if start != y.shape[0]:
            raise ValueError(f"`y` has {y.shape[0]} rows; the data has {start} examples.")
        return self.reduce(self._unfold(out, y.sum(dim=0)))

    def normal_matmat(
        self, data: Data, z: Tensor, *, frobenius: bool = False, keep_rows: bool = False
    ) -> tuple[Tensor, float | None]:
        """One pass: :math:`V^\\top (V Z)` (P x l) summed over processes, and, when
        ``frobenius`` and the rows are formed (not ``matrix_free``), :math:`\\|V\\|_F^2`.
        With ``keep_rows``, this process's :math:`V Z` (n_local x l) is left in ``last_rows``."""
        t, c = self._fold(z)
        m = torch.zeros_like(z)
        y_sum = z.new_zeros(z.shape[1])
        p = self.num_parameters
        frobenius = frobenius and not self.matrix_free
        cols = torch.zeros(2, p, dtype=torch.float64, device=self.device) if frobenius else None
        rows: list[Tensor] = []
        tail = torch.zeros(2, dtype=torch.float64, device=self.device)  # bad, count
        for x, extras in self.chunks(data):
            y, bad, blocks = self._matmat_folded(x, extras, t, c)
            self._rmatmat_raw(x, extras, y, blocks, m)
            y_sum += y.sum(dim=0)
            if cols is not None and blocks is not None:  # column sums of g and g^2
                for sl, block in zip(self.jacobian.slices, blocks):
                    g = block.to(torch.float64)
                    cols[0, sl] += g.sum(dim=0)
                    cols[1, sl] += g.square_().sum(dim=0)
            tail[0] += bad
            tail[1] += x.shape[0]
            if keep_rows:
                rows.append(y)
        m = self.reduce(self._unfold(m, y_sum))
        tail = self.reduce(tail)
        self._raise_if_bad(tail[0], tail[1].item(), "fitting examples")
        if keep_rows:
            self.last_rows = torch.cat(rows) if rows else z.new_zeros(0, z.shape[1])
        if cols is None:
            return m, None
        cols = self.reduce(cols)
        z64 = (
            torch.zeros(p, dtype=torch.float64, device=self.device)
            if self.mean_score is None
            else self.mean_score.double()
        )
        s64 = torch.ones_like(z64) if self.scale is None else self.scale.double()
        centred = cols[1] - 2 * z64 * cols[0] + tail[1] * z64 * z64  # sum_x (g_x - z)^2
        return m, (centred * s64 * s64).sum().item()

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
