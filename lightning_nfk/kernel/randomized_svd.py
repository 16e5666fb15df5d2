"""Randomized subspace iteration on the normal operator :math:`A = V^\\top V`.

Halko, Martinsson and Tropp, *Finding structure with randomness* (SIAM Review 2011,
arXiv:0909.4061), Algorithm 4.4 with Rayleigh-Ritz extraction (Algorithm 5.1 applied to
:math:`V^\\top V`); the paper's Algorithm 4. One product :math:`V^\\top (V Z)` is one pass over
the data, so ``n_iter`` iterations plus the final product cost ``n_iter + 1`` passes::

    Z_0 = orth(Omega),  Omega ~ N(0, 1)^{P x l}    (seeded torch.Generator, same on every rank)
    Z_i = orth(V^T V Z_{i-1}),  i = 1..n_iter
    M   = V^T V Z_n ;  H = Z_n^T M = (V Z_n)^T (V Z_n)  (l x l, float64)
    H = W diag(sigma^2) W^T ;  P = Z_n W                (top k)

:math:`\\sigma_i^2` are exactly the squared singular values of :math:`Y = V Z_n`, so this is
the SVD step of the paper's algorithm without keeping :math:`Y`. ``orth`` is Householder QR
in at least float32 (float32 Cholesky-QR of :math:`V^\\top V Z` broke down at condition numbers near 3e4).

Warm start (``start``): the first columns of the test matrix are given (e.g. the previous
fit's components, for a model that trained a little since), the rest Gaussian, so the
iteration continues from a subspace near the answer instead of a random one; at least one
column stays Gaussian (it finds directions the start lacks, and estimates the trace).
With ``tol`` (a number, or one per component) the iteration stops once every top-k Ritz
pair's relative residual is at most its tolerance (``n_iter`` stays the cap): a warm
start then takes only the passes it needs. The check is a Rayleigh-Ritz step on the
(Z, A Z) the iteration holds anyway: no extra pass. Under DDP the ranks agree on the stop
through ``agree`` (a sum over processes of each rank's "not yet" flag), so that no rank
runs a product the others skip, whatever the round-off of their own QR and eigh.

``n_iter = 0`` (one pass) would make that Rayleigh-Ritz step act on a random subspace, so
it instead takes Halko et al.'s basic scheme (their Algorithms 4.1 and 5.1, :math:`q = 0`)
from the same single pass: with :math:`Y = V Z_0`, :math:`Q = Y R^{-1}` where
:math:`R^\\top R = Y^\\top Y = Z_0^\\top M`, and :math:`V^\\top Q = M R^{-1}`, the SVD of
:math:`Q^\\top V` needs no further pass. It squares the sketch's condition number, so it is
kept for this one-pass case (float64 small algebra; residuals are not available: NaN).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

NormalMatmat = Callable[[Tensor], Tensor]
_ROWS64 = 1 << 16  # rows of a P x l operand copied to float64 at a time


def _inner64(a: Tensor, b: Tensor) -> Tensor:
    """:math:`A^\top B` (l x l) accumulated in float64, a slice of rows at a time: no float64
    copy of the P x l operands (for P in the millions, each would be as large as the
    sketch itself)."""
    out = torch.zeros(a.shape[1], b.shape[1], dtype=torch.float64, device=a.device)
    for ab, bb in zip(a.split(_ROWS64), b.split(_ROWS64)):
        out += ab.double().T @ bb.double()
    return out


@dataclass
class RitzPairs:
    """Top eigenpairs of :math:`A = V^\\top V` found by subspace iteration.

    Attributes:
        eigenvalues: (k,) :math:`\\sigma_i^2`, descending, float64.
        vectors: (P, k) orthonormal Ritz vectors (right singular vectors of V).
        residuals: (k,) :math:`\\|A p_i - \\sigma_i^2 p_i\\| / \\sigma_i^2`, a computable bound
            on each eigenvalue's relative error, float64.
        trace_estimate: Hutchinson's estimate of :math:`\\operatorname{tr} A = \\|V\\|_F^2` from
            the Gaussian test matrix (first pass), float64.
        coefficients: (l, k) W with ``vectors = Z W`` for the Z of the last product (so
            :math:`V \\cdot` vectors :math:`= (V Z) W`), float64; None for ``n_iter = 0``.
        products: the products :math:`A Z` computed (passes over the data).
    """

    eigenvalues: Tensor
    vectors: Tensor
    residuals: Tensor
    trace_estimate: Tensor
    coefficients: Tensor | None = None
    products: int = 0


def orthonormalize(m: Tensor) -> tuple[Tensor, Tensor]:
    """Householder QR in at least float32 with autocast off; returns (Q, R) in ``m.dtype``."""
    work = m if m.dtype in (torch.float32, torch.float64) else m.float()
    with torch.autocast(device_type=m.device.type, enabled=False):
        q, r = torch.linalg.qr(work)
    return q.to(m.dtype), r.to(m.dtype)


def subspace_iteration(
    normal_matmat: NormalMatmat,
    dim: int,
    k: int,
    *,
    oversample: int = 10,
    n_iter: int = 10,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    start: Tensor | None = None,
    tol: float | Tensor | None = None,
    agree: Callable[[Tensor], Tensor] | None = None,
) -> RitzPairs:
    """Top-``k`` eigenpairs of a PSD operator given only ``Z -> A Z``.

    Args:
        normal_matmat: ``Z (dim, l) -> A Z (dim, l)``, already summed over processes.
        dim: the operator's size :math:`P`.
        k: number of eigenpairs kept.
        oversample: extra columns, ``l = k + oversample``.
        n_iter: power iterations (``n_iter + 1`` products in all).
        generator: a CPU ``torch.Generator`` for the test matrix; seed it identically on
            every process.
        dtype: dtype of the test matrix and products.
        device: device of the products.
        start: (dim, s) first columns of the test matrix, s < l (a warm start: e.g. the
            previous fit's components); the other ``l - s`` columns are Gaussian.
        tol: stop once every top-``k`` relative residual is at most ``tol`` (a number, or
            a (k,) tensor: one per component), checked after each product; ``n_iter``
            iterations at most.
        agree: the sum over processes (e.g. ``all_reduce`` SUM) that makes the ranks
            stop together; None: one process.

    Returns:
        The :class:`RitzPairs`.

    Raises:
        ValueError: if ``k + oversample > dim``, ``n_iter < 0``, or ``start`` is not a
            finite (dim, s < l) matrix.
    """
    l = k + oversample
    if k < 1 or oversample < 0 or l > dim:
        raise ValueError(
            f"`k` + `oversample` ({k} + {oversample}) must be between 1 and the operator size "
            f"({dim})."
        )
    if n_iter < 0:
        raise ValueError(f"`n_iter` must be >= 0, got {n_iter}.")
    if start is not None and not (
        start.ndim == 2 and start.shape[0] == dim and 1 <= start.shape[1] < l
    ):
        raise ValueError(
            f"`start` must be a ({dim}, s) matrix with 1 <= s < k + oversample = {l} (one "
            f"column at least stays Gaussian), got shape {tuple(start.shape)}."
        )
    s = 0 if start is None else start.shape[1]
    omega = torch.randn(dim, l - s, generator=generator, dtype=dtype, device="cpu").to(device)
    if start is not None:
        if not bool(torch.isfinite(start).all()):
            raise ValueError("`start` holds NaN or infinite entries.")
        omega = torch.cat([start.to(device, dtype), omega], dim=1)
    z, r = orthonormalize(omega)
    del omega  # P x l: one sketch less in memory for the whole fit
    m = normal_matmat(z)
    # Hutchinson on the Gaussian columns G = Z R_g (l - s >= 1 of them): ||V G||_F^2 / (l - s)
    # = tr(R_g^T (Z^T A Z) R_g) / (l - s)
    h0 = _inner64(z, m)
    r_g = r[:, s:].double()
    trace_estimate = torch.trace(r_g.T @ h0 @ r_g) / (l - s)
    products = 1
    if n_iter == 0 and start is None:
        return _single_pass(z, m, k, trace_estimate)
    # the Rayleigh-Ritz step costs O(P l^2) in float64: after a product only with `tol`, and
    # not on a cold start's random first subspace
    ritz = _rayleigh_ritz(z, m, k) if tol is not None and start is not None else None
    for _ in range(n_iter):
        if ritz is not None and _converged(ritz[2], tol, agree, device):
            break
        # the old basis and product go before the QR and the pass that replace them: a
        # P x l operand less at each peak (for P in the hundred millions, gigabytes)
        del z
        z, _ = orthonormalize(m)
        del m
        m = normal_matmat(z)
        products += 1
        ritz = _rayleigh_ritz(z, m, k) if tol is not None else None
    evals, w, residuals = ritz if ritz is not None else _rayleigh_ritz(z, m, k)
    vectors = z @ w.to(z.dtype)
    return RitzPairs(evals.clamp_min(0.0), vectors, residuals, trace_estimate, w, products)


def _converged(
    residuals: Tensor,
    tol: float | Tensor | None,
    agree: Callable[[Tensor], Tensor] | None,
    device: torch.device | str,
) -> bool:
    """Whether every residual is within its tolerance, on every process (one host read)."""
    bound = tol.to(residuals.device) if isinstance(tol, Tensor) else tol
    pending = (~(residuals <= bound)).any().to(device=device, dtype=torch.float32).reshape(1)
    if agree is not None:
        pending = agree(pending)
    return not bool(pending.item())


def _rayleigh_ritz(z: Tensor, m: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` Ritz values and coefficients W (float64) of A on span(Z), from M = A Z,
    and each pair's relative residual :math:`\\|M w - \\lambda Z w\\| / \\lambda`."""
    h = _inner64(z, m)
    evals, w = torch.linalg.eigh(0.5 * (h + h.T))  # ascending
    evals, w = evals.flip(0)[:k], w.flip(1)[:, :k]
    res = torch.zeros_like(evals)
    for zb, mb in zip(z.split(_ROWS64), m.split(_ROWS64)):
        res += (mb.double() @ w - (zb.double() @ w) * evals).square().sum(dim=0)
    residuals = res.sqrt() / evals.abs().clamp_min(torch.finfo(torch.float64).tiny)
    return evals, w, residuals


def _single_pass(z: Tensor, m: Tensor, k: int, trace_estimate: Tensor) -> RitzPairs:
    """SVD of Q^T V from one pass (Z, M = V^T V Z): Halko et al. 2011, Alg. 4.1 + 5.1."""
    h = _inner64(z, m)  # Y^T Y
    s, w = torch.linalg.eigh(0.5 * (h + h.T))
    keep = s > s.max() * z.shape[0] * torch.finfo(z.dtype).eps
    t = w[:, keep] / s[keep].sqrt()  # Q = Y t is orthonormal
    bt = torch.cat([mb.double() @ t for mb in m.split(_ROWS64)])  # V^T Q, (P, r)
    c = bt.T @ bt  # (Q^T V)(Q^T V)^T, (r, r)
    evals, u = torch.linalg.eigh(0.5 * (c + c.T))
    evals, u = evals.flip(0)[:k].clamp_min(0.0), u.flip(1)[:, :k]
    if evals.shape[0] < k:  # fewer than k directions in the sketch: pad with zeros
        pad = k - evals.shape[0]
        evals = torch.cat([evals, evals.new_zeros(pad)])
        u = torch.cat([u, u.new_zeros(u.shape[0], pad)], dim=1)
    sigma = evals.sqrt()
    inv = torch.where(sigma > 0, 1.0 / sigma, torch.zeros_like(sigma))
    vectors = (bt @ u * inv).to(z.dtype)
    residuals = torch.full((k,), float("nan"), dtype=torch.float64, device="cpu")
    return RitzPairs(evals, vectors, residuals, trace_estimate, products=1)
