"""Warm starts and residual tolerances of the subspace iteration: against explicit
matrices and the dense float64 torch.func reference."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_nfk.kernel import LowRankNFK, subspace_iteration
from tests.helpers.models import make_case, reference
from tests.kernel.test_randomized_svd import _matrix, _run

EPS64 = torch.finfo(torch.float64).eps


def _iterate(a, k, oversample, n_iter, start=None, tol=None, seed=0):
    return _run(a, k, oversample, n_iter, seed, start=start, tol=tol)


def test_start_on_the_answer_needs_one_product():
    s = 0.8 ** torch.arange(40, dtype=torch.float64)
    a, _ = _matrix(s, 80, 300, seed=4)
    exact = torch.linalg.svd(a, full_matrices=False).Vh[:5].T  # top-5 right singular vectors
    ritz = _iterate(a, 5, 4, n_iter=10, start=exact, tol=1e-8)
    assert ritz.products == 1
    torch.testing.assert_close(
        ritz.eigenvalues, s[:5] ** 2, rtol=1e-12, atol=64 * EPS64 * s[0].item() ** 2
    )
    assert ritz.residuals.max() < 1e-8


def test_tol_stops_early_and_the_residuals_bound_the_error():
    s = 0.85 ** torch.arange(50, dtype=torch.float64)
    a, _ = _matrix(s, 80, 300, seed=1)
    full = _iterate(a, 5, 3, n_iter=30)
    assert full.products == 31
    stopped = _iterate(a, 5, 3, n_iter=30, tol=1e-3)
    assert stopped.products < full.products
    assert stopped.residuals.max() <= 1e-3
    rel = (stopped.eigenvalues - s[:5] ** 2).abs() / s[:5] ** 2
    assert torch.all(rel <= stopped.residuals + 64 * EPS64 * s[0] ** 2 / s[:5] ** 2)


def test_a_nearby_start_converges_in_fewer_products_than_a_cold_one():
    # a matrix and a slightly moved copy: the first's components start the second's fit
    s = 0.85 ** torch.arange(50, dtype=torch.float64)
    a, _ = _matrix(s, 80, 300, seed=1)
    moved = a + 1e-3 * torch.randn(
        a.shape, generator=torch.Generator().manual_seed(9), dtype=a.dtype
    )
    before = _iterate(a, 5, 3, n_iter=30, tol=1e-6)
    cold = _iterate(moved, 5, 3, n_iter=30, tol=1e-6)
    warm = _iterate(moved, 5, 3, n_iter=30, tol=1e-6, start=before.vectors)
    assert warm.products < cold.products
    # both within their residuals of the truth, hence of each other
    bound = warm.residuals + cold.residuals + 64 * EPS64 * s[0] ** 2 / warm.eigenvalues
    assert torch.all((warm.eigenvalues - cold.eigenvalues).abs() / warm.eigenvalues <= bound)


def test_trace_estimate_uses_the_gaussian_columns_only():
    a, _ = _matrix(torch.linspace(3, 1, 40), 60, 120, seed=3)
    start = torch.linalg.svd(a, full_matrices=False).Vh[:2].T  # biased: the top directions
    estimates = [
        _iterate(a, 2, 30, 0, start=start, seed=s).trace_estimate.item() for s in range(40)
    ]
    truth = a.square().sum().item()
    assert abs(sum(estimates) / len(estimates) / truth - 1) < 0.05


@pytest.mark.parametrize(
    ("start", "match"),
    [
        (
            torch.zeros(9, 2),
            r"`start` must be a \(10, s\) matrix with 1 <= s < k \+ oversample = 4 \(one "
            r"column at least stays Gaussian\), got shape \(9, 2\)",
        ),
        (torch.zeros(10, 4), r"got shape \(10, 4\)"),
        (torch.full((10, 2), float("nan")), r"`start` holds NaN or infinite entries"),
    ],
    ids=["rows", "columns", "nan"],
)
def test_invalid_start(start, match):
    with pytest.raises(ValueError, match=match):
        subspace_iteration(
            lambda z: z, 10, 2, oversample=2, n_iter=1, generator=torch.Generator(), start=start
        )


# -- LowRankNFK ----------------------------------------------------------------------------
def test_low_rank_nfk_warm_start_matches_the_float64_reference():
    case = make_case("cnn")
    ref = reference(case)
    options = {"k": 4, "oversample": 8, "strategy": "blocked"}
    for n_iter in (6, 20):
        cold = LowRankNFK(case.energy, n_iter=n_iter, **options).fit(case.x)
        assert cold.products == n_iter + 1
        # the same model from the cold fit's components: one product reaches its residuals
        tol = cold.residuals.max().item()
        warm = LowRankNFK(case.energy, n_iter=20, seed=1, **options)
        warm.fit(case.x, start=cold.components, tol=tol)
        assert warm.products == 1 and warm.residuals.max() <= tol
        # float64 Ritz values within their residuals of the reference eigenvalues
        rel = (warm.singular_values.square() - ref.sigma[:4].square()).abs() / ref.sigma[:4] ** 2
        assert torch.all(rel <= warm.residuals + 64 * EPS64), (n_iter, rel, warm.residuals)
    assert tol < 1e-8  # n_iter = 20: the check above is at 1e-8


class _Counted:
    """Batches of ``x`` that count how often they are iterated."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.passes = x, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.x.split(16))


def _bad_fit_arguments(p: int) -> list:
    wrong = rf"`start` must be a floating-point \(P, s\) tensor with P = {p} \(the kernel's "
    return [
        ({"tol": 0.0}, r"`tol` must be a finite number > 0 or None, got 0.0"),
        ({"tol": True}, r"`tol` must be a finite number > 0 or None, got True"),
        ({"tol": float("inf")}, r"`tol` must be a finite number > 0 or None, got inf"),
        ({"tol": torch.ones(3)}, r"`tol` as a tensor must hold k = 4 finite numbers > 0"),
        (
            {"start": torch.zeros(3)},
            wrong + r"parameters\) and 1 <= s < k \+ oversample = 12, got \(3,\)",
        ),
        ({"start": torch.zeros(p + 1, 4)}, wrong),
        ({"start": torch.zeros(p, 12)}, wrong),
        ({"start": torch.zeros(p, 4, dtype=torch.int64)}, wrong),
        ({"start": torch.full((p, 4), float("nan"))}, r"`start` holds NaN or infinite entries"),
    ]


def test_fit_refuses_bad_start_and_tol_before_any_pass():
    case = make_case("mlp")
    p = sum(math.prod(shape) for _, shape in case.energy.kernel_layout())
    for kwargs, match in _bad_fit_arguments(p):
        nfk = LowRankNFK(case.energy, k=4, oversample=8, n_iter=2, strategy="blocked")
        data = _Counted(case.x)
        with pytest.raises(ValueError, match=match):
            nfk.fit(data, **kwargs)
        assert data.passes == 0 and not nfk.is_fitted, kwargs
