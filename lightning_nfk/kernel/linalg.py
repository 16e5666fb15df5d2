"""Small dense linear algebra shared by the exact path: truncated SVD of an explicit matrix, row gathering."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_nfk.kernel.distributed import Reduce, rank_and_world_size


def gram_eigh(v: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs of the smaller Gram matrix of ``v`` (N x P): :math:`V V^\\top` if N <= P,
    else :math:`V^\\top V`, formed in ``v.dtype`` and diagonalised in float64.

    Returns:
        ``(sigma, vecs)``: all min(N, P) singular values of ``v`` (float64, descending) and
        the eigenvectors (float64): left singular vectors if N <= P, else right ones.
    """
    n, p = v.shape
    small = v @ v.T if n <= p else v.T @ v
    evals, vecs = torch.linalg.eigh(small.double())
    return evals.flip(0).clamp_min(0.0).sqrt(), vecs.flip(1)


def frobenius_squared(v: Tensor) -> Tensor:
    """:math:`\\|V\\|_F^2` (float64, 0-d, on ``v``'s device), summed over blocks of rows:
    ``vector_norm(v, dtype=float64)`` of all of a float32 ``v`` would copy it."""
    rows = max(1, 2**20 // max(1, v.shape[-1]))
    total = torch.zeros((), dtype=torch.float64, device=v.device)
    for block in v.split(rows):
        total += torch.linalg.vector_norm(block, dtype=torch.float64).square()
    return total


def other_singular_vectors(v: Tensor, sigma: Tensor, vecs: Tensor) -> Tensor:
    """From one side's singular vectors ``vecs`` (from :func:`gram_eigh`), the other side's:
    :math:`V^\\top U / \\sigma` or :math:`V W / \\sigma`, in ``v.dtype``. Columns whose
    singular value is zero (rank-deficient ``v``) are zero."""
    n, p = v.shape
    tol = sigma[0] * max(n, p) * torch.finfo(v.dtype).eps if sigma[0] > 0 else 1.0
    inv = torch.where(sigma > tol, 1.0 / sigma, torch.zeros_like(sigma)).to(v.dtype)
    vecs = vecs.to(v.dtype)
    return ((v.T @ vecs) if n <= p else (v @ vecs)) * inv


def exact_decomposition(v: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` SVD of an explicit matrix ``v`` (N x P) through its smaller Gram matrix.

    Returns:
        ``(sigma, right, left)``: (k,) float64 singular values, descending; (P, k) right and
        (N, k) left singular vectors in ``v.dtype`` (zero columns for zero singular values).
    """
    n, p = v.shape
    if not 1 <= k <= min(n, p):
        raise ValueError(f"`k` ({k}) must be between 1 and min(N, P) = {min(n, p)}.")
    sigma, vecs = gram_eigh(v)
    sigma, vecs = sigma[:k], vecs[:, :k]
    other = other_singular_vectors(v, sigma, vecs)
    vecs = vecs.to(v.dtype)
    return (sigma, other, vecs) if n <= p else (sigma, vecs, other)


def gather_rows(local: Tensor, reduce: Reduce) -> Tensor:
    """Concatenate every process's rows (in rank order) with a sum-reduce only."""
    rank, world = rank_and_world_size()
    if world == 1:
        return local
    counts = torch.zeros(world, dtype=torch.float64, device=local.device)
    counts[rank] = local.shape[0]
    counts = reduce(counts).long().tolist()
    full = torch.zeros(sum(counts), *local.shape[1:], dtype=local.dtype, device=local.device)
    start = sum(counts[:rank])
    full[start : start + local.shape[0]] = local
    return reduce(full)
