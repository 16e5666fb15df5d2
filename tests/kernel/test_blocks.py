"""Per-block spectra (``fit(..., blocks=)``): against the dense float64 torch.func
reference for every strategy and energy family, the identity sketch of small blocks, the
one-pass fit, and the argument errors (raised before any pass)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_nfk.kernel import LowRankNFK
from lightning_nfk.kernel.blocks import resolve_blocks
from tests.helpers.models import make_case, reference

EPS64 = torch.finfo(torch.float64).eps


def _reference_blocks(case, ref):
    """{name: (singular values, trace)} of V's column blocks, the blocks 'auto' names,
    from the reference V and the module's own parameter names (not the engine's layout)."""
    names = [n for n, _ in case.energy.module.named_parameters()]
    sizes = [p.numel() for _, p in case.energy.module.named_parameters()]
    out, start = {}, 0
    cols: dict[str, list[int]] = {}
    for n, size in zip(names, sizes):
        cols.setdefault(n.split(".")[0], []).extend(range(start, start + size))
        start += size
    for top, c in cols.items():
        vb = ref.v[:, c]
        out[top] = (torch.linalg.svdvals(vb), vb.square().sum().item())
    return out


@pytest.mark.parametrize("name", ["mlp", "cnn", "gan", "vae", "gpt"])
@pytest.mark.parametrize("strategy", ["blocked", "matrix_free", "dense"])
def test_block_spectra_match_the_reference(name, strategy):
    case = make_case(name)
    ref = reference(case)
    k = 4
    nfk = LowRankNFK(case.energy, k=k, oversample=8, n_iter=25, strategy=strategy, seed=1)
    nfk.fit(case.x, blocks="auto")
    expected = _reference_blocks(case, ref)
    got = nfk.block_spectra
    assert list(got) == list(expected)
    for block, (sigma, trace) in expected.items():
        b = got[block]
        kb = min(k, b.num_parameters)
        assert b.singular_values.shape == (kb,)
        # traces: exact sums (float64 round-off) where the kernel's is exact (a GAN's
        # statistics come from model samples: matrix_free then estimates both)
        exact = nfk.total_variance_is_exact or b.num_parameters <= 12
        assert b.total_variance_is_exact == exact
        if exact:
            assert math.isclose(b.total_variance, trace, rel_tol=1e-9)
        else:
            assert 0.2 * trace < b.total_variance < 5 * trace
        # eigenvalues within their residual bound (and float64 round-off of the top one)
        lam, lam_ref = b.singular_values.square(), sigma[:kb].square()
        bound = b.residuals + 1e3 * EPS64 * lam_ref[0] / lam_ref
        assert torch.all((lam - lam_ref).abs() / lam_ref <= bound), (block, lam, lam_ref)
        assert torch.all(b.residuals < 1e-4)  # 25 iterations converge on these spectra
        if exact:
            ratio = float(lam_ref.sum()) / trace
            assert math.isclose(b.explained_variance, ratio, rel_tol=1e-6)
        assert 1 <= b.effective_rank <= kb
    if nfk.total_variance_is_exact:  # the blocks partition the parameters: traces add up
        shares = [b.trace_share for b in got.values()]
        assert math.isclose(sum(shares), 1.0, rel_tol=1e-9), shares


def test_blocks_leave_the_whole_kernel_unchanged():
    case = make_case("cnn")
    plain = LowRankNFK(case.energy, k=4, oversample=6, n_iter=4, strategy="blocked").fit(case.x)
    with_blocks = LowRankNFK(case.energy, k=4, oversample=6, n_iter=4, strategy="blocked")
    with_blocks.fit(case.x, blocks=["0", "5"])
    torch.testing.assert_close(
        with_blocks.singular_values, plain.singular_values, rtol=1e-9, atol=0
    )
    assert with_blocks.products == plain.products
    assert plain.block_spectra == {}


def test_a_block_smaller_than_the_sketch_is_exact_and_prefixes_may_overlap():
    case = make_case("mlp")
    ref = reference(case)
    # "4.bias": 3 parameters, fewer than k + oversample = 10, so sketched by the identity;
    # "4" holds it too (blocks may overlap); one iteration only
    nfk = LowRankNFK(case.energy, k=4, oversample=6, n_iter=1, strategy="blocked")
    nfk.fit(case.x, blocks=["4.bias", "4"])
    small = nfk.block_spectra["4.bias"]
    assert small.num_parameters == 3 and small.singular_values.shape == (3,)
    # set, not computed: an identity sketch is exact, its residuals are 0 by construction
    assert small.residuals.shape == (3,) and float(small.residuals.abs().max()) == 0.0
    p = sum(q.numel() for q in case.energy.module.parameters())
    exact = torch.linalg.svdvals(ref.v[:, p - 3 :])
    # a softmax's bias gradients sum to 1, so this block has rank 2: its third singular
    # value is the square root of an eigenvalue at round-off (about sqrt(eps) sigma_1)
    atol = 4 * math.sqrt(EPS64) * exact[0].item()
    torch.testing.assert_close(small.singular_values, exact, rtol=1e-10, atol=atol)
    assert nfk.block_spectra["4"].num_parameters == 12 * 3 + 3


def test_one_pass_fit_gives_block_spectra_without_residuals():
    case = make_case("mlp")
    nfk = LowRankNFK(case.energy, k=4, oversample=6, n_iter=0, strategy="blocked")
    nfk.fit(case.x, blocks="auto")
    assert nfk.products == 1
    for b in nfk.block_spectra.values():
        assert torch.all(b.singular_values > 0)
        assert b.num_parameters <= 10 or torch.isnan(b.residuals).all()


def test_matrix_free_trace_is_estimated_when_no_statistics_cover_the_data():
    # NTKEnergy has no centring or Fisher: no statistics pass gives ||V_b||^2, and
    # matrix_free forms no rows, so the traces of large blocks are Hutchinson estimates
    case = make_case("ntk")
    ref = reference(case)
    nfk = LowRankNFK(case.energy, k=4, oversample=6, n_iter=3, strategy="matrix_free")
    nfk.fit(case.x, blocks="auto")
    expected = _reference_blocks(case, ref)
    for name, (_, trace) in expected.items():
        b = nfk.block_spectra[name]
        if b.num_parameters <= 10:  # identity sketch: exact
            assert b.total_variance_is_exact
            assert math.isclose(b.total_variance, trace, rel_tol=1e-9)
        else:
            assert not b.total_variance_is_exact
            assert 0.2 * trace < b.total_variance < 5 * trace


def test_non_contiguous_blocks_take_and_embed_their_rows():
    layout = [("a.w", (2,)), ("b.w", (3,)), ("a.v", (1,))]
    (a,) = resolve_blocks(["a"], layout)
    assert a.size == 3 and a.tensors == (0, 2)
    t = torch.arange(6.0)[:, None]
    assert a.take(t).flatten().tolist() == [0.0, 1.0, 5.0]
    assert a.embed(a.take(t), 6).flatten().tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 5.0]
    (b,) = resolve_blocks(["b"], layout)
    assert b.columns == slice(2, 5)


@pytest.mark.parametrize(
    "blocks, error, match",
    [
        ("all", ValueError, "`blocks` must be 'auto'"),
        ([], ValueError, "`blocks` is empty"),
        (["0", "0"], ValueError, r"`blocks` repeats \['0'\]"),
        (["encoder"], ValueError, r"prefix 'encoder' names none.*\['0', '2', '4'\]"),
        ([0], TypeError, "parameter-name prefixes"),
        ("0", ValueError, "a single prefix goes in a list"),
    ],
)
def test_bad_blocks_are_refused_before_any_pass(blocks, error, match):
    case = make_case("mlp")
    seen = []
    nfk = LowRankNFK(case.energy, k=4, oversample=6)
    with pytest.raises(error, match=match):
        nfk.fit(case.x, progress=seen.append, blocks=blocks)
    assert seen == []
