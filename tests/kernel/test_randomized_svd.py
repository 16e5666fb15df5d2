"""subspace_iteration on explicit matrices: exact recovery, convergence, robustness."""

from __future__ import annotations

import itertools

import pytest
import torch

from lightning_nfk.kernel import subspace_iteration


def _matrix(spectrum: torch.Tensor, n: int, p: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, len(spectrum), generator=g, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(p, len(spectrum), generator=g, dtype=torch.float64))
    return ((u * spectrum.double()) @ w.T).to(dtype), w


def _run(a: torch.Tensor, k: int, oversample: int, n_iter: int, seed: int = 0, **options):
    return subspace_iteration(
        lambda z: a.T @ (a @ z),
        a.shape[1],
        k,
        oversample=oversample,
        n_iter=n_iter,
        generator=torch.Generator().manual_seed(seed),
        dtype=a.dtype,
        **options,
    )


@pytest.mark.parametrize("n_iter", [0, 1, 3], ids=["single-pass", "one-iteration", "three"])
def test_exact_recovery_of_known_rank(n_iter):
    s = torch.tensor([9.0, 7.0, 4.0, 2.0, 1.0, 0.5])
    a, w = _matrix(s, 60, 200)
    ritz = _run(a, k=6, oversample=3, n_iter=n_iter)
    # exact up to round-off: rtol as before, plus the eigensolvers' absolute floor of a few
    # eps ||A|| (||A|| = s_1^2)
    eps = torch.finfo(torch.float64).eps
    torch.testing.assert_close(
        ritz.eigenvalues, s.double() ** 2, rtol=1e-12, atol=16 * eps * s[0].item() ** 2
    )
    # the Ritz vectors span the row space exactly
    proj = w @ (w.T @ ritz.vectors)
    torch.testing.assert_close(proj, ritz.vectors, rtol=0, atol=1e-12)
    if n_iter > 0:
        assert ritz.residuals.max() < 1e-10
    else:
        assert ritz.residuals.isnan().all()
    torch.testing.assert_close(
        ritz.vectors.T @ ritz.vectors, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_error_decreases_with_n_iter_and_residuals_bound_it():
    s = 0.85 ** torch.arange(50, dtype=torch.float64)
    a, _ = _matrix(s, 80, 300, seed=1)
    # round-off floor of the relative errors: a few eps ||A|| absolute, ||A|| = s_1^2
    floor = 64 * torch.finfo(torch.float64).eps * s[0] ** 2 / s[:5] ** 2
    errors = []
    for n_iter in (0, 1, 2, 4, 8, 16):
        ritz = _run(a, k=5, oversample=3, n_iter=n_iter)
        rel = (ritz.eigenvalues - s[:5] ** 2).abs() / s[:5] ** 2
        errors.append(rel.max().item())
        # a Ritz value is within its residual of a true eigenvalue
        if n_iter > 0:
            assert torch.all(rel <= ritz.residuals + floor)
    # monotone until both reach the round-off floor
    assert all(b <= a_ * 1.01 + floor.max().item() for a_, b in itertools.pairwise(errors))
    assert errors[0] > 1e-3 and errors[-1] < 1e-10


def test_same_seed_same_answer():
    a, _ = _matrix(torch.linspace(5, 1, 20), 40, 100)
    r1, r2 = _run(a, 4, 4, 2, seed=7), _run(a, 4, 4, 2, seed=7)
    assert torch.equal(r1.vectors, r2.vectors) and torch.equal(r1.eigenvalues, r2.eigenvalues)


def test_float32_ill_conditioned_stays_accurate():
    # condition number of V^T V Z about 1e8: float32 Cholesky-QR would break down here.
    s = torch.logspace(0, -4, 30)
    a, _ = _matrix(s, 100, 400, seed=2, dtype=torch.float32)
    ritz = _run(a, k=5, oversample=10, n_iter=6)
    rel = (ritz.eigenvalues - s[:5].double() ** 2).abs() / s[:5].double() ** 2
    assert rel.max() < 1e-5
    assert ritz.vectors.dtype == torch.float32


def test_trace_estimate_is_unbiased():
    a, _ = _matrix(torch.linspace(3, 1, 40), 60, 120, seed=3)
    estimates = [_run(a, 2, 30, 0, seed=s).trace_estimate.item() for s in range(40)]
    truth = a.square().sum().item()
    assert abs(sum(estimates) / len(estimates) / truth - 1) < 0.05


@pytest.mark.parametrize(
    ("k", "oversample", "n_iter", "match"),
    [
        (0, 2, 1, r"`k` \+ `oversample` \(0 \+ 2\) must be between 1 and the operator size \(10\)"),
        (8, 3, 1, r"`k` \+ `oversample` \(8 \+ 3\) must be between 1 and the operator size \(10\)"),
        (2, 2, -1, r"`n_iter` must be >= 0, got -1"),
    ],
    ids=["k0", "too-wide", "negative-n_iter"],
)
def test_invalid_arguments(k, oversample, n_iter, match):
    with pytest.raises(ValueError, match=match):
        subspace_iteration(
            lambda z: z, 10, k, oversample=oversample, n_iter=n_iter, generator=torch.Generator()
        )
