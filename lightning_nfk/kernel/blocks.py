"""Per-block spectra: the NFK of a group of the kernel's parameters, from the same passes.

A block :math:`b` is a set of the kernel's parameter tensors (e.g. one transformer layer);
its Fisher vectors are the columns :math:`V_b` of :math:`V` that belong to it, and its
kernel :math:`K_b = V_b V_b^\\top` (so :math:`K = \\sum_b K_b` for a partition). Its
spectrum says how low-rank the part of the kernel that block carries is, and its trace
:math:`\\|V_b\\|_F^2` how much of the kernel it carries.

Each block runs its own subspace iteration on :math:`V_b^\\top V_b`, in lockstep with the
whole kernel's: every pass over the data computes :math:`V^\\top (V Z)` and, for each
block, :math:`V_b^\\top (V_b Z_b)` from the same per-example gradient block :math:`G`
(two GEMMs on its column slice :math:`G_{:,b}`): the gradients are computed once, and the
blocks together cost one more sketch's products when they partition the parameters.
(``matrix_free`` has no gradient block to slice: there each block costs a JVP and a VJP
of its own width, so ``B`` blocks cost ``B`` more products per pass.)

A block smaller than the sketch (:math:`P_b \\le k + \\text{oversample}`, e.g. a
LayerNorm or a bias) is sketched by the identity: one pass gives :math:`V_b^\\top V_b`
itself and its spectrum is exact. Blocks always start cold (a warm start of the whole
kernel does not carry over), and take as many passes as the whole kernel's iteration:
after a warm-started fit that stopped early, that may be one or two, and their residuals
say how far they are from converged.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_nfk.kernel.linalg import frobenius_squared, gram_eigh
from lightning_nfk.kernel.metrics import effective_rank
from lightning_nfk.kernel.randomized_svd import (
    _inner64,
    _rayleigh_ritz,
    _single_pass,
    orthonormalize,
)

Layout = Sequence[tuple[str, tuple[int, ...]]]


@dataclass(frozen=True)
class ParameterBlock:
    """A named group of the kernel's parameter tensors.

    Attributes:
        name: the block's name (its prefix, or the top-level child for ``"auto"``).
        tensors: positions of its tensors in the kernel's layout (``Energy.kernel_layout``).
        columns: its rows of the flattened parameter vector: a slice when they are
            contiguous, else a (P_b,) index tensor (CPU).
        size: P_b, its number of parameters.
    """

    name: str
    tensors: tuple[int, ...]
    columns: slice | Tensor
    size: int

    def take(self, t: Tensor, dim: int = 0) -> Tensor:
        """The block's entries of ``t`` along ``dim`` (a view when contiguous)."""
        if isinstance(self.columns, slice):
            return t[self.columns] if dim == 0 else t[:, self.columns]
        return t.index_select(dim, self.columns.to(t.device))

    def embed(self, t: Tensor, num_parameters: int) -> Tensor:
        """A (P, l) zero matrix holding the (P_b, l) ``t`` in the block's rows."""
        out = t.new_zeros(num_parameters, t.shape[1])
        if isinstance(self.columns, slice):
            out[self.columns] = t
        else:
            out.index_copy_(0, self.columns.to(t.device), t)
        return out


def resolve_blocks(blocks: str | Sequence[str], layout: Layout) -> tuple[ParameterBlock, ...]:
    """The :class:`ParameterBlock` s named by ``blocks`` in the kernel's ``layout``
    (``Energy.kernel_layout()``: names and shapes, in the order of the parameter vector).

    Args:
        blocks: ``"auto"``: one block per top-level child of the kernel module (the first
            component of the parameter names; a parameter of the module itself is a block
            of its own); or parameter-name prefixes: a block holds the parameters whose
            name is the prefix or starts with ``prefix + "."``. Blocks may overlap (e.g.
            ``["encoder", "encoder.layer.0"]``): each is a kernel of its own.

    Raises:
        TypeError: ``blocks`` is not ``"auto"`` or a sequence of strings.
        ValueError: an empty sequence, a repeated prefix, or a prefix that names none of
            the kernel's parameters (the message lists the top-level names).
    """
    check_blocks(blocks)
    names = [n for n, _ in layout]
    sizes = [math.prod(shape) for _, shape in layout]
    if blocks == "auto":
        prefixes = list(dict.fromkeys(n.split(".")[0] for n in names))
    else:
        prefixes = list(blocks)
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    out = []
    for prefix in prefixes:
        tensors = tuple(i for i, n in enumerate(names) if n == prefix or n.startswith(prefix + "."))
        if not tensors:
            top = list(dict.fromkeys(n.split(".")[0] for n in names))
            raise ValueError(
                f"`blocks` prefix {prefix!r} names none of the kernel's parameters; its "
                f"top-level names are {top}."
            )
        contiguous = all(starts[i + 1] == starts[j] for i, j in itertools.pairwise(tensors))
        columns: slice | Tensor = (
            slice(starts[tensors[0]], starts[tensors[-1] + 1])
            if contiguous
            else torch.cat([torch.arange(starts[i], starts[i + 1], device="cpu") for i in tensors])
        )
        out.append(ParameterBlock(prefix, tensors, columns, sum(sizes[i] for i in tensors)))
    return tuple(out)


def check_blocks(blocks: object) -> None:
    """``blocks`` is ``"auto"`` or a non-empty sequence of distinct strings (the prefixes
    are matched against a kernel's parameters by :func:`resolve_blocks`).

    Raises:
        TypeError, ValueError: naming the argument, the constraint and the value.
    """
    if isinstance(blocks, str):
        if blocks != "auto":
            raise ValueError(
                f"`blocks` must be 'auto' or a list of parameter-name prefixes, got {blocks!r} "
                "(a single prefix goes in a list)."
            )
        return
    if not isinstance(blocks, Sequence) or not all(isinstance(b, str) for b in blocks):
        raise TypeError(
            f"`blocks` must be 'auto' or a list of parameter-name prefixes (str), got {blocks!r}."
        )
    if not blocks:
        raise ValueError("`blocks` is empty: give 'auto' or at least one prefix.")
    repeated = sorted({b for b in blocks if list(blocks).count(b) > 1})
    if repeated:
        raise ValueError(f"`blocks` repeats {repeated}.")


@dataclass(frozen=True)
class BlockSpectrum:
    """The top of one block's spectrum (see :mod:`lightning_nfk.kernel.blocks`).

    Attributes:
        name: the block's name.
        num_parameters: P_b.
        singular_values: (k_b,) top singular values of :math:`V_b`, descending, float64,
            k_b = min(k, P_b).
        residuals: (k_b,) relative residuals bounding each eigenvalue's error (0 where
            exact; NaN for a one-pass fit).
        total_variance: :math:`\\|V_b\\|_F^2 = \\operatorname{tr} K_b`.
        total_variance_is_exact: False when estimated from the block's Gaussian columns.
        kernel_total_variance: the whole kernel's trace :math:`\\|V\\|_F^2`, for
            ``trace_share``.
    """

    name: str
    num_parameters: int
    singular_values: Tensor
    residuals: Tensor
    total_variance: float
    total_variance_is_exact: bool
    kernel_total_variance: float

    @property
    def explained_variance(self) -> float:
        """The top k_b's share of the block's trace, :math:`\\sum \\sigma_i^2 / \\|V_b\\|_F^2`."""
        if not self.total_variance > 0:
            return float("nan")
        return float(self.singular_values.square().sum()) / self.total_variance

    @property
    def effective_rank(self) -> float:
        """Roy and Vetterli's effective rank of the top k_b (NaN for a zero block)."""
        if not float(self.singular_values[0]) > 0:
            return float("nan")
        return effective_rank(self.singular_values)

    @property
    def trace_share(self) -> float:
        """The block's share of the whole kernel's trace, :math:`\\|V_b\\|_F^2 / \\|V\\|_F^2`
        (for blocks that partition the parameters, the shares sum to 1). With the diagonal
        Fisher from the fitting data itself (``fisher="data"``) each column of V has
        squared norm :math:`N I / (I + \\text{damping}) \\approx N` where the gradient is
        not zero, so the share is then that of the block's active parameters."""
        return self.total_variance / self.kernel_total_variance


class BlockSketch:
    """The blocks' subspace iterations, advanced one pass at a time beside the whole
    kernel's (:func:`~lightning_nfk.kernel.randomized_svd.subspace_iteration`): each pass
    takes :meth:`operands` and hands back the products to :meth:`record`.

    Args:
        blocks: the blocks.
        k, oversample: the sketch of the whole kernel (each block's is capped at P_b).
        seed: seeds the blocks' Gaussian test matrices (one generator, blocks in order;
            the same on every process).
    """

    def __init__(
        self,
        blocks: Sequence[ParameterBlock],
        k: int,
        oversample: int,
        seed: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.blocks, self.k, self.l = tuple(blocks), k, k + oversample
        generator = torch.Generator().manual_seed(seed + 1)  # not the whole kernel's draw
        self.z: list[Tensor] = []
        self.gaussian: list[Tensor | None] = []  # R of the Gaussian test matrix
        for b in self.blocks:
            if self.exact(b):
                self.z.append(torch.eye(b.size, dtype=dtype, device=device))
                self.gaussian.append(None)
            else:
                omega = torch.randn(b.size, self.l, generator=generator, dtype=dtype, device="cpu")
                z, r = orthonormalize(omega.to(device))
                self.z.append(z)
                self.gaussian.append(r.double())
        self.m: list[Tensor] | None = None
        self.trace_estimates: list[float] = []
        self.passes = 0

    def exact(self, block: ParameterBlock) -> bool:
        """Whether ``block`` is sketched by the identity (P_b <= k + oversample)."""
        return block.size <= self.l

    def operands(self) -> list[Tensor]:
        """Each block's Z for the next pass: orth(A_b Z_b) of the last pass (the identity
        for exact blocks)."""
        if self.m is not None:
            self.z = [
                z if self.exact(b) else orthonormalize(m)[0]
                for b, z, m in zip(self.blocks, self.z, self.m)
            ]
            self.m = None
        return self.z

    def record(self, products: list[Tensor]) -> None:
        """The products A_b Z_b of the pass that took :meth:`operands`."""
        self.m = products
        if self.passes == 0:  # Hutchinson on the first, Gaussian, sketch (exact for identity)
            for z, m, r in zip(self.z, products, self.gaussian):
                h = _inner64(z, m)
                self.trace_estimates.append(
                    float(torch.trace(h))
                    if r is None
                    else float(torch.trace(r.T @ h @ r)) / r.shape[1]
                )
        self.passes += 1

    def spectra(
        self,
        totals: Sequence[float] | None,
        kernel_total: float,
        *,
        single_pass: bool,
    ) -> dict[str, BlockSpectrum]:
        """The blocks' spectra after the last pass; ``totals``: their exact traces, or None
        for the estimates of the first pass. ``single_pass``: Halko et al.'s one-pass
        extraction (for ``n_iter = 0``, as the whole kernel's)."""
        if self.m is None:
            raise RuntimeError("BlockSketch.spectra needs a pass recorded after the last operands.")
        out = {}
        for i, (b, z, m) in enumerate(zip(self.blocks, self.z, self.m)):
            kb = min(self.k, b.size)
            if single_pass and not self.exact(b):
                ritz = _single_pass(z, m, kb, torch.zeros((), dtype=torch.float64, device="cpu"))
                evals, residuals = ritz.eigenvalues, ritz.residuals
            else:
                evals, _, residuals = _rayleigh_ritz(z, m, kb)
                if self.exact(b):
                    residuals = torch.zeros_like(residuals)
            exact = totals is not None or self.exact(b)
            total = totals[i] if totals is not None else self.trace_estimates[i]
            out[b.name] = BlockSpectrum(
                name=b.name,
                num_parameters=b.size,
                singular_values=evals.clamp_min(0.0).sqrt().cpu(),
                residuals=residuals.cpu(),
                total_variance=float(total),
                total_variance_is_exact=exact,
                kernel_total_variance=float(kernel_total),
            )
        return out


def dense_block_spectra(
    blocks: Sequence[ParameterBlock], v: Tensor, k: int, kernel_total: float
) -> dict[str, BlockSpectrum]:
    """Exact block spectra from the materialised V (N x P) of a ``dense`` fit."""
    out = {}
    for b in blocks:
        vb = b.take(v, dim=1)
        kb = min(k, b.size, vb.shape[0])
        sigma = gram_eigh(vb)[0][:kb]
        out[b.name] = BlockSpectrum(
            name=b.name,
            num_parameters=b.size,
            singular_values=sigma.double().cpu(),
            residuals=torch.zeros(kb, dtype=torch.float64, device="cpu"),
            total_variance=float(frobenius_squared(vb)),
            total_variance_is_exact=True,
            kernel_total_variance=float(kernel_total),
        )
    return out


def sketch_share(blocks: Sequence[ParameterBlock], num_parameters: int, columns: int) -> float:
    """The blocks' P_b x l_b operands together, in units of the kernel's P x l sketch
    (about 1 for blocks that partition the parameters; more where they overlap)."""
    return sum(b.size * min(columns, b.size) for b in blocks) / (num_parameters * columns)


def block_totals(blocks: Sequence[ParameterBlock], per_tensor: Tensor) -> list[float]:
    """Each block's :math:`\\|V_b\\|_F^2` from the per-tensor sums of squares."""
    per_tensor = per_tensor.double().cpu()
    return [float(per_tensor[list(b.tensors)].sum()) for b in blocks]
