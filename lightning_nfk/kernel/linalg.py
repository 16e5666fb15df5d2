"""Small dense linear algebra shared by the exact path: truncated SVD of an explicit matrix, row gathering."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_nfk.kernel.distributed import Reduce, rank_and_world_size


def exact_decomposition(v: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` SVD of an explicit matrix ``v`` (N x P) through its smaller Gram matrix.

    The Gram matrix (:math:`V V^\\top` if N <= P, else :math:`V^\\top V`) is formed in
    ``v.dtype`` and diagonalised in float64.

    Returns:
        ``(sigma, right, left)``: (k,) float64 singular values, descending; (P, k) right and
        (N, k) left singular vectors in ``v.dtype``. Columns whose singular value is zero
        (rank-deficient ``v``) are zero in the vectors derived through the division.
    """
    n, p = v.shape
    if not 1 <= k <= min(n, p):
        raise ValueError(f"`k` ({k}) must be between 1 and min(N, P) = {min(n, p)}.")
    small = v @ v.T if n <= p else v.T @ v
    evals, vecs = torch.linalg.eigh(small.double())
    evals, vecs = evals.flip(0)[:k].clamp_min(0.0), vecs.flip(1)[:, :k]
    sigma = evals.sqrt()
    tol = sigma[0] * max(n, p) * torch.finfo(v.dtype).eps if sigma[0] > 0 else 1.0
    inv = torch.where(sigma > tol, 1.0 / sigma, torch.zeros_like(sigma)).to(v.dtype)
    vecs = vecs.to(v.dtype)
    if n <= p:
        left, right = vecs, (v.T @ vecs) * inv
    else:
        right, left = vecs, (v @ vecs) * inv
    return sigma, right, left


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
