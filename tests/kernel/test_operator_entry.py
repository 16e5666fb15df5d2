"""The operator's one entry (prepare_fisher_vectors) and the two option parts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_nfk.kernel import (
    LowRankNFK,
    NFKConfig,
    OperatorOptions,
    SketchOptions,
    prepare_fisher_vectors,
)
from tests.helpers.models import make_case, reference


def test_the_config_is_its_two_parts():
    config = NFKConfig(k=5, oversample=3, n_iter=2, seed=7, damping=1e-6, strategy="blocked")
    assert config.sketch == SketchOptions(k=5, oversample=3, n_iter=2, seed=7)
    assert config.operator == OperatorOptions(damping=1e-6, strategy="blocked")
    assert NFKConfig.compose(config.sketch, config.operator) == config
    # every field belongs to exactly one part
    names = [f.name for f in dataclasses.fields(NFKConfig)]
    parts = [f.name for p in (SketchOptions, OperatorOptions) for f in dataclasses.fields(p)]
    assert sorted(names) == sorted(parts)


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: SketchOptions(k=0), ValueError, r"`k` must be >= 1, got 0"),
        (lambda: SketchOptions(n_iter=1.5), TypeError, r"`n_iter` must be an int"),
        (lambda: OperatorOptions(damping=-1.0), ValueError, r"`damping` must be a finite"),
        (lambda: OperatorOptions(strategy="svd"), ValueError, r"`strategy` must be one of"),
        (lambda: OperatorOptions(dtype=torch.bfloat16), ValueError, r"half-precision"),
        (lambda: NFKConfig(chunk_size=0), ValueError, r"`chunk_size` must be >= 1, got 0"),
    ],
)
def test_each_part_validates_its_own_options(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_one_entry_for_every_form():
    case = make_case("mlp")
    x = case.x.double()
    energy = case.energy
    ref = reference(case)
    by_parts = prepare_fisher_vectors(energy, x, OperatorOptions(dtype=torch.float64))
    by_config = prepare_fisher_vectors(energy, x, NFKConfig(k=3, dtype=torch.float64))
    assert by_parts.num_examples == by_config.num_examples == len(x)
    m = torch.randn(ref.v.shape[1], 2, dtype=torch.float64)
    for op in (by_parts, by_config):
        torch.testing.assert_close(op.local_matmat(x, m), ref.v @ m, rtol=1e-10, atol=1e-12)
    # the same operator by the other strategy gives the same products
    free = by_parts.with_strategy("matrix_free")
    assert free.strategy == "matrix_free" and by_parts.strategy != "matrix_free"
    torch.testing.assert_close(free.local_matmat(x, m), ref.v @ m, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"`strategy` must be 'blocked' or 'matrix_free'"):
        by_parts.with_strategy("dense")


def test_a_sketch_wider_than_the_data_is_refused_before_any_pass():
    case = make_case("mlp", n=6)
    with pytest.raises(ValueError, match=r"`k` \+ `oversample` \(4 \+ 4 = 8\) must not exceed"):
        prepare_fisher_vectors(case.energy, case.x, sketch=SketchOptions(k=4, oversample=4))
    # without a sketch (the exact path) six examples are enough
    assert prepare_fisher_vectors(case.energy, case.x).num_examples == 6


def test_the_fitted_operator_is_public():
    case = make_case("mlp")
    nfk = LowRankNFK(case.energy, k=2, oversample=4).fit(case.x)
    assert nfk.operator.num_examples == len(case.x)
    with pytest.raises(RuntimeError, match="not fitted"):
        LowRankNFK(case.energy).operator  # noqa: B018
