"""The spectrum summaries against values worked out by hand (diagonal spectra, planes at
known angles)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_nfk.kernel.metrics import (
    components_for,
    cumulative_explained_variance,
    effective_rank,
    stable_rank,
    subspace_drift,
)

# sigma = (2, 1, 1): sigma^2 = (4, 1, 1); with a trace of 8 (2 more outside the top 3)
SIGMA = torch.tensor([2.0, 1.0, 1.0])
TRACE = 8.0


def test_cumulative_explained_variance():
    got = cumulative_explained_variance(SIGMA, TRACE)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor([4 / 8, 5 / 8, 6 / 8], dtype=torch.float64))


def test_effective_rank():
    # p = (4, 1, 1) / 6: exp(H) = exp(-(2/3 ln 2/3 + 2 * 1/6 ln 1/6))
    p = torch.tensor([4 / 6, 1 / 6, 1 / 6], dtype=torch.float64)
    assert effective_rank(SIGMA) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-12)
    assert effective_rank(torch.ones(5)) == pytest.approx(5.0, rel=1e-12)  # flat: k
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)  # one: 1


def test_stable_rank():
    assert stable_rank(SIGMA, TRACE) == pytest.approx(8 / 4)
    assert stable_rank(torch.ones(4), 4.0) == pytest.approx(4.0)


@pytest.mark.parametrize(("fraction", "k90"), [(0.5, 1), (0.6, 2), (0.75, 3), (0.9, -1)])
def test_components_for(fraction, k90):
    assert components_for(SIGMA, TRACE, fraction) == k90  # c = (0.5, 0.625, 0.75)


def test_subspace_drift_of_planes_at_known_angles():
    e = torch.eye(4, dtype=torch.float64)
    a = e[:, :2]  # span(e1, e2)
    assert subspace_drift(a, a) == pytest.approx(0.0, abs=1e-15)
    assert subspace_drift(a, e[:, 2:]) == pytest.approx(1.0)  # orthogonal planes
    # rotate e2 towards e3 by theta: principal angles (0, theta), drift sin^2(theta) / 2
    theta = 0.3
    b = torch.stack([e[:, 0], math.cos(theta) * e[:, 1] + math.sin(theta) * e[:, 2]], dim=1)
    assert subspace_drift(a, b) == pytest.approx(math.sin(theta) ** 2 / 2, rel=1e-12)
    assert subspace_drift(a, -b) == pytest.approx(math.sin(theta) ** 2 / 2, rel=1e-12)  # signs
