"""LowRankNFK against an independent dense float64 reference (tests/helpers/models.py)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_nfk.kernel import LowRankNFK, exact_nfk, kernel_mode
from lightning_nfk.kernel.per_example import ScoreJacobian
from tests.helpers.models import make_case, reference, reference_gradients

# vit: SDPA, LayerNorm, a class token; gpt: a causal LM's SequenceEnergy on padded
# token inputs (ids over mask), both through vmap (SDPA's math backend, kernel_mode)
CASES = ["mlp", "cnn", "gan", "vae", "ntk", "vit", "gpt"]
STRATEGIES = ["dense", "blocked", "matrix_free"]


def _operator(nfk: LowRankNFK, case):
    """The fitted operator of ``nfk`` (for V @ M and V^T @ M checks)."""
    return nfk.operator


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Elementwise, relative to the largest entry (round-off scales with the matrix, not the entry)."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def _same_float64_spectrum(a: LowRankNFK, b: LowRankNFK, n: int) -> None:
    """Singular values of two float64 fits of n examples in other chunk shapes or orders:
    round-off of sums over the n examples, relative to sigma_1 (atol); rtol tight."""
    atol = n * torch.finfo(torch.float64).eps * b.singular_values[0].item()
    torch.testing.assert_close(a.singular_values, b.singular_values, rtol=1e-12, atol=atol)


def _match_signs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Flip the columns of ``a`` to agree in sign with ``b``."""
    signs = torch.sign((a * b).sum(dim=0))
    return a * signs


@pytest.fixture(scope="module", params=CASES)
def case_and_ref(request):
    case = make_case(request.param)
    return case, reference(case)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_dense_float64_reference(case_and_ref, strategy):
    case, ref = case_and_ref
    k = 4
    nfk = LowRankNFK(case.energy, k=k, oversample=12, n_iter=12, strategy=strategy, seed=1)
    nfk.fit(case.x)
    assert nfk.strategy_used == strategy
    n = case.x.shape[0]

    # statistics
    op = _operator(nfk, case)
    if ref.fisher is not None:
        _close(nfk.fisher_diagonal, ref.fisher, rtol=1e-10)
    if case.name in ("mlp", "cnn", "gan", "vit", "gpt"):
        _close(nfk.mean_score, ref.z, rtol=1e-10)
    else:
        assert nfk.mean_score is None
    # ||V||_F^2 is exact unless the rows are never formed and the statistics do not cover
    # the fitting data (then it is Hutchinson's estimate, tested separately).
    estimated = strategy == "matrix_free" and case.name in ("gan", "ntk")
    assert nfk.total_variance_is_exact is not estimated
    total = ref.v.square().sum()
    if not estimated:
        torch.testing.assert_close(nfk.total_variance, total, rtol=1e-10, atol=0)

    # V @ M and V^T @ M
    m = torch.randn(ref.v.shape[1], 3, dtype=torch.float64)
    _close(op.local_matmat(case.x, m), ref.v @ m, rtol=1e-10)
    y = torch.randn(n, 3, dtype=torch.float64)
    _close(op.rmatmat(case.x, y), ref.v.T @ y, rtol=1e-10)

    # spectrum: rtol set by the randomized SVD's convergence (gap-dependent), far above
    # float64 round-off but far below any modelling error; atol is the round-off floor,
    # sums over the n examples: n eps relative to the largest value (sigma_1, lambda_1, 1).
    eps, s1 = torch.finfo(torch.float64).eps, ref.sigma[0].item()
    torch.testing.assert_close(nfk.singular_values, ref.sigma[:k], rtol=1e-9, atol=n * eps * s1)
    lam1 = s1**2 / n
    torch.testing.assert_close(
        nfk.eigenvalues, ref.sigma[:k] ** 2 / n, rtol=2e-9, atol=2 * n * eps * lam1
    )
    ratio = ref.sigma[:k] ** 2 / nfk.total_variance
    torch.testing.assert_close(nfk.explained_variance_ratio, ratio, rtol=2e-9, atol=2 * n * eps)

    # embeddings of held-out inputs, up to the sign of each component. Loose on purpose:
    # subspace iteration's vector error is about the square root of its eigenvalue error
    # (here ~1e-12), so 1e-5 relative to the embedding scale.
    expected = ref.fisher_vectors(reference_gradients(case, case.x_new)) @ ref.right[:, :k]
    got = nfk.transform(case.x_new)
    _close(_match_signs(got, expected), expected, rtol=1e-5)
    # on the fitting set: e(X) = Phi diag(sigma), also free from the last pass
    emb = nfk.transform(case.x)
    fit_expected = ref.v @ ref.right[:, :k]
    _close(_match_signs(nfk.fit_embedding, fit_expected), fit_expected, rtol=1e-5)
    _close(_match_signs(emb, fit_expected), fit_expected, rtol=1e-5)
    torch.testing.assert_close(
        torch.linalg.vector_norm(emb, dim=0), ref.sigma[:k], rtol=1e-9, atol=n * eps * s1
    )


def test_gan_and_ntk_matrix_free_total_variance_is_an_estimate():
    case = make_case("ntk")
    ref = reference(case)
    nfk = LowRankNFK(case.energy, k=4, oversample=40, n_iter=2, strategy="matrix_free").fit(case.x)
    assert not nfk.total_variance_is_exact
    # Hutchinson with l = 44 Gaussian probes: a loose check (relative sd about sqrt(2/l)).
    assert abs(nfk.total_variance.item() / ref.v.square().sum().item() - 1) < 0.6


def test_float32_close_to_float64_reference():
    case = make_case("cnn")
    ref = reference(case)
    energy32 = case.energy.to(torch.float32)
    nfk = LowRankNFK(energy32, k=4, oversample=12, n_iter=12).fit(case.x.float())
    assert nfk.singular_values.dtype == torch.float32
    # float32 round-off of sums over the n = 48 examples, relative to sigma_1
    n, eps32 = len(case.x), torch.finfo(torch.float32).eps
    torch.testing.assert_close(
        nfk.singular_values.double(),
        ref.sigma[:4],
        rtol=n * eps32,
        atol=n * eps32 * ref.sigma[0].item(),
    )


def test_dtype_float64_runs_on_a_copy():
    case = make_case("mlp")
    energy32 = case.energy.to(torch.float32)
    module = energy32.module
    before = {k: v.clone() for k, v in module.state_dict().items()}
    nfk = LowRankNFK(energy32, k=4, oversample=12, n_iter=12, dtype=torch.float64).fit(
        case.x.float()
    )
    assert nfk.singular_values.dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in module.parameters())
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key])
    ref = reference(case)  # case.energy is the float64 twin of the same weights
    # the fit saw x rounded to float32 (relative error eps32 / 2 per entry), the reference
    # the float64 x: V, hence each sigma_i, moves by a few eps32 sigma_1 (Weyl)
    eps32 = torch.finfo(torch.float32).eps
    torch.testing.assert_close(
        nfk.singular_values, ref.sigma[:4], rtol=8 * eps32, atol=8 * eps32 * ref.sigma[0].item()
    )


@pytest.mark.parametrize("strategy", ["blocked", "matrix_free"])
@pytest.mark.parametrize("batch_size", [1, 7, 48])
def test_invariant_to_batch_size(strategy, batch_size):
    case = make_case("cnn")
    base = LowRankNFK(case.energy, k=3, oversample=8, n_iter=6, strategy=strategy).fit(case.x)
    loader = DataLoader(TensorDataset(case.x, torch.zeros(len(case.x))), batch_size=batch_size)
    other = LowRankNFK(case.energy, k=3, oversample=8, n_iter=6, strategy=strategy).fit(loader)
    # other chunk shapes, other GEMM kernels and summation orders: float64 round-off of sums
    # over the n examples, relative to sigma_1 (atol); rtol as tight as before
    n, eps = len(case.x), torch.finfo(torch.float64).eps
    s1 = base.singular_values[0].item()
    torch.testing.assert_close(
        other.singular_values, base.singular_values, rtol=1e-12, atol=n * eps * s1
    )
    # ||V||_F^2 is about n P (unit-variance columns), far from zero: relative round-off only
    torch.testing.assert_close(other.total_variance, base.total_variance, rtol=1e-12, atol=0)
    # embeddings up to sign: a row of V P sums P products; round-off relative to the
    # embeddings' scale (atol), amplified in the vectors by 1 / gap (rtol as before)
    expected = base.transform(case.x_new).abs()
    atol = base.num_parameters * eps * expected.max().item()
    torch.testing.assert_close(other.transform(case.x_new).abs(), expected, rtol=1e-9, atol=atol)


def test_memory_budget_chunking_does_not_change_result():
    case = make_case("mlp")
    small = LowRankNFK(
        # the float64 sketch takes 98 kB of it; the gradient blocks get the rest
        case.energy,
        k=3,
        oversample=8,
        strategy="blocked",
        memory_budget=140_000,
    ).fit(case.x)
    assert 1 < small.operator.max_rows < 8
    big = LowRankNFK(case.energy, k=3, oversample=8, strategy="blocked").fit(case.x)
    _same_float64_spectrum(small, big, len(case.x))  # other chunk shapes


def test_same_seed_same_answer_different_seed_close():
    case = make_case("mlp")
    kw = {"k": 3, "oversample": 4, "n_iter": 1, "strategy": "blocked"}
    a = LowRankNFK(case.energy, seed=3, **kw).fit(case.x)
    b = LowRankNFK(case.energy, seed=3, **kw).fit(case.x)
    c = LowRankNFK(case.energy, seed=4, **kw).fit(case.x)
    # same seed, same data, same shapes, one machine: the same computation, bit for bit
    assert torch.equal(a.singular_values, b.singular_values)
    assert torch.equal(a.components, b.components)
    assert not torch.equal(a.singular_values, c.singular_values)
    # another seed is another sketch: with n_iter=1 the Ritz values are far from converged,
    # so they agree only within the randomized SVD's error. Each sigma_i^2 is within its
    # relative residual of the true eigenvalue (RitzPairs.residuals), so the two fits are
    # within the sum of their residual bounds; plus the float64 round-off floor.
    ea, ec = a.singular_values.square(), c.singular_values.square()
    floor = len(case.x) * torch.finfo(torch.float64).eps * ea[0]
    assert not a.residuals.isnan().any() and not c.residuals.isnan().any()
    assert torch.all((ea - ec).abs() <= a.residuals * ea + c.residuals * ec + floor), (ea, ec)


def test_auto_strategy_picks_dense_for_small_and_blocked_beyond_budget():
    case = make_case("mlp")
    assert LowRankNFK(case.energy, k=3, oversample=4).fit(case.x).strategy_used == "dense"
    nfk = LowRankNFK(case.energy, k=3, oversample=4, memory_budget=80_000).fit(case.x)
    assert nfk.strategy_used == "blocked"
    # min(N, P) = min(300, 279) > 256 (n_iter + 1): the power passes are cheaper than Alg. 1
    x = torch.randn(300, 6, dtype=torch.float64)
    assert LowRankNFK(case.energy, k=3, oversample=4, n_iter=0).fit(x).strategy_used == "blocked"
    assert LowRankNFK(case.energy, k=3, oversample=4, n_iter=1).fit(x).strategy_used == "dense"


def test_exact_nfk_matches_reference():
    case = make_case("vae")
    ref = reference(case)
    ex = exact_nfk(case.energy, case.x)
    n, p = ref.v.shape
    eps, s1 = torch.finfo(torch.float64).eps, ref.sigma[0].item()
    # per-example gradients by two routes: round-off relative to the largest entry
    _close(ex.fisher_vectors, ref.v, rtol=1e-12)
    # eigh of the Gram matrix against an SVD: float64 round-off of sums over the n
    # examples, relative to sigma_1 (the top 10 are far from zero)
    torch.testing.assert_close(
        ex.singular_values[:10], ref.sigma[:10], rtol=1e-10, atol=n * eps * s1
    )
    # each Gram entry sums P products: round-off <= P eps of the largest entry
    gram = ref.v @ ref.v.T
    torch.testing.assert_close(ex.gram, gram, rtol=1e-12, atol=p * eps * gram.abs().max().item())
    # ||V||_F^2 is about n P (unit-variance columns), far from zero: relative round-off only
    torch.testing.assert_close(ex.total_variance, ref.v.square().sum(), rtol=1e-12, atol=0)
    # lambda_i = sigma_i^2 / n from eigh: within ~n eps lambda_1 (Weyl)
    torch.testing.assert_close(
        ex.eigenvalues[:3], ref.sigma[:3] ** 2 / n, rtol=n * eps, atol=n * eps * s1**2 / n
    )


def test_snapshot_fit_is_immune_to_later_training():
    case = make_case("mlp")
    nfk = LowRankNFK(case.energy, k=3, oversample=4).fit(case.x)
    before = nfk.transform(case.x_new)
    with torch.no_grad():
        for p in case.energy.module.parameters():
            p.add_(1.0)
    torch.testing.assert_close(nfk.transform(case.x_new), before, rtol=0, atol=0)


def test_score_jacobian_names_follow_module_order():
    case = make_case("vae")
    jac = ScoreJacobian(case.energy)
    assert jac.names == [n for n, _ in case.energy.module.named_parameters()]
    with kernel_mode(case.energy):
        assert not case.energy.module.training


def test_shuffled_loader_with_labels_gives_the_same_kernel():
    case = make_case("mlp")
    base = LowRankNFK(case.energy, k=3, oversample=8, strategy="blocked").fit(case.x)
    loader = DataLoader(
        TensorDataset(case.x, torch.arange(len(case.x))),
        batch_size=5,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    other = LowRankNFK(case.energy, k=3, oversample=8, strategy="blocked").fit(loader)
    assert other.num_examples == len(case.x)
    _same_float64_spectrum(other, base, len(case.x))  # other order and chunk shapes


@pytest.mark.parametrize("n", [20, 400], ids=["N<P", "N>P"])
def test_exact_nfk_singular_vectors(n):
    case = make_case("mlp", n=n)  # P = 279
    ref = reference(case)
    ex = exact_nfk(case.energy, case.x)
    r = min(n, ref.v.shape[1])
    assert ex.left.shape == (n, r) and ex.right.shape == (ref.v.shape[1], r)
    k = 5
    # Against the independent SVD of tests/helpers/models.py, up to the sign of each pair;
    # rtol 1e-8 relative to the largest entry: vector round-off is amplified by 1 / gap.
    signs = torch.sign((ex.right[:, :k] * ref.right[:, :k]).sum(dim=0))
    _close(ex.right[:, :k] * signs, ref.right[:, :k], rtol=1e-8)
    ref_left = ref.v @ ref.right[:, :k] / ref.sigma[:k]  # Phi = V P / sigma
    _close(ex.left[:, :k] * signs, ref_left, rtol=1e-8)
    # embed: Fisher vectors of held-out inputs against the reference's V_x P
    v_new = ref.fisher_vectors(reference_gradients(case, case.x_new))
    expected = v_new @ ref.right[:, :k]
    _close(ex.embed(v_new, k) * signs, expected, rtol=1e-8)


@pytest.mark.parametrize("n_iter", [0, 2])
def test_fit_transform_is_the_fit_embedding_or_transform(n_iter):
    case = make_case("mlp")
    x = case.x.double()
    # blocked: the randomized fit (dense always has its embedding)
    options = {
        "k": 3,
        "oversample": 4,
        "n_iter": n_iter,
        "dtype": torch.float64,
        "strategy": "blocked",
    }
    nfk = LowRankNFK(case.energy, **options)
    got = nfk.fit_transform(x)
    assert got.shape == (x.shape[0], 3)
    expected = nfk.transform(x)  # one more pass: the same embeddings up to round-off
    _close(_match_signs(got, expected), expected, rtol=1e-8)
    if n_iter:
        assert got is nfk.fit_embedding  # free from the last pass
    else:
        assert nfk.fit_embedding is None


def test_results_are_declared_properties():
    # IDEs and type checkers read them from the class (no __getattr__ lookup)
    for name in (
        "singular_values", "components", "residuals", "eigenvalues", "gram_eigenvalues",
        "explained_variance_ratio", "total_variance", "strategy_used", "num_examples",
    ):  # fmt: skip
        assert isinstance(getattr(LowRankNFK, name), property), name
    with pytest.raises(RuntimeError, match="not fitted yet"):
        _ = LowRankNFK(make_case("mlp").energy, k=2).singular_values
