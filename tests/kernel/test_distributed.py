"""Two gloo processes on uneven shards give the single-process answer."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from lightning_nfk.kernel import LowRankNFK, exact_nfk
from tests.helpers.models import make_case
from tests.helpers.processes import init_gloo, run_two_gloo

RUNS = [
    ("cnn", "blocked"),
    ("cnn", "matrix_free"),
    ("cnn", "dense"),
    ("gan", "blocked"),
    ("vae", "blocked"),
]
SPLIT = 19  # rank 0 gets 19 rows, rank 1 the other 29: unequal on purpose


def _fit(case, strategy, data):
    nfk = LowRankNFK(case.energy, k=3, oversample=6, n_iter=6, strategy=strategy, seed=2)
    nfk.fit(data, blocks="auto")
    blocks = nfk.block_spectra.values()
    return {
        "block_singular_values": torch.cat([b.singular_values for b in blocks]),
        "block_traces": torch.tensor([b.total_variance for b in blocks], dtype=torch.float64),
        "singular_values": nfk.singular_values,
        "components": nfk.components,
        "total_variance": nfk.total_variance,
        "mean_score": nfk.mean_score,
        "fisher_diagonal": nfk.fisher_diagonal,
        "num_examples": nfk.num_examples,
    }


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world, port)
    try:
        torch.set_num_threads(1)
        results = {}
        for name, strategy in RUNS:
            case = make_case(name)
            shard = case.x[:SPLIT] if rank == 0 else case.x[SPLIT:]
            loader = DataLoader(TensorDataset(shard), batch_size=8)
            results[f"{name}-{strategy}"] = _fit(case, strategy, loader)
        # device budgets that differ by rank (free GPU memory does): rank 0's would make
        # `auto` choose dense, rank 1's blocked; every rank must take the smallest
        # (rank 1's: room for the float64 sketch, 107 kB, not for a dense V)
        budget = 2**34 if rank == 0 else 150_000
        with mock.patch("lightning_nfk.kernel.preparation.device_budget", lambda *a, **k: budget):
            case = make_case("cnn")
            nfk = LowRankNFK(case.energy, k=3, oversample=6, n_iter=2)
            nfk.fit(case.x[:SPLIT] if rank == 0 else case.x[SPLIT:])
        results["auto"] = {
            "strategy": nfk.strategy_used,
            "max_rows": torch.tensor(nfk.operator.max_rows),
        }
        results["exact"] = exact_nfk(
            make_case("mlp").energy,
            make_case("mlp").x[:SPLIT] if rank == 0 else make_case("mlp").x[SPLIT:],
        ).singular_values
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    run_two_gloo(_worker, tmp, 240, "the 2-process engine run")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("run", [f"{n}-{s}" for n, s in RUNS])
def test_two_processes_equal_one(two_process_results, run):
    name, strategy = run.split("-", 1)
    case = make_case(name)
    single = _fit(case, strategy, case.x)
    r0, r1 = two_process_results[0][run], two_process_results[1][run]
    assert r0["num_examples"] == r1["num_examples"] == len(case.x)
    for key, value in single.items():
        if key == "num_examples" or value is None:
            continue
        # every rank holds the same spectrum and right singular vectors (bit for bit: both
        # ranks run the same float64 algebra, on this machine, on the same all-reduced sums)...
        assert torch.equal(r0[key], r1[key]), key
        # ...equal to one process on the concatenated data, up to the order of sums: float64
        # round-off relative to the largest entry, amplified by the singular vectors'
        # sensitivity (observed up to ~550 eps for the GAN's components)
        eps = torch.finfo(value.dtype).eps
        torch.testing.assert_close(
            r0[key], value, rtol=1e-9, atol=4096 * eps * value.abs().max().item()
        )


def test_every_rank_takes_the_smallest_device_budget(two_process_results):
    r0, r1 = (r["auto"] for r in two_process_results)
    assert r0["strategy"] == r1["strategy"] == "blocked"
    assert r0["max_rows"] == r1["max_rows"] < 48


def test_exact_path_gathers_all_rows(two_process_results):
    case = make_case("mlp")
    expected = exact_nfk(case.energy, case.x).singular_values
    # The spectrum comes from eigh of the N x N Gram matrix (rank N - 1 after centring: the
    # last singular value is numerically zero, ~1e-7 here, its value set by round-off).
    # Compare the Gram eigenvalues sigma^2: a backward-stable eigh moves each by at most
    # ~N eps ||K||_2 = N eps sigma_1^2 (Weyl), an absolute bound, whatever the CPU's kernels.
    # Missing or duplicated rows would change the spectrum by O(1) relative.
    n, eps = len(case.x), torch.finfo(expected.dtype).eps
    for r in two_process_results:
        torch.testing.assert_close(
            r["exact"].square(),
            expected.square(),
            rtol=n * eps,
            atol=n * eps * expected[0].item() ** 2,
        )


class _Noisy(torch.utils.data.Dataset):
    """A dataset whose items change at every read (random augmentation)."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.randn(6)


def _refusing_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world, port)
    try:
        case = make_case("mlp")
        # rank 0's shard is augmented, rank 1's is fine: only rank 0 can see the problem
        data = DataLoader(_Noisy(), batch_size=8) if rank == 0 else case.x[SPLIT:]
        try:
            LowRankNFK(case.energy, k=3, oversample=6).fit(data)
            message = "no error"
        except ValueError as e:
            message = str(e)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


def test_a_refusal_on_one_rank_reaches_every_rank(tmp_path):
    run_two_gloo(_refusing_worker, tmp_path, 120, "the 2-process refusal run")
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert "does not yield the same examples on every pass" in messages[0]
    assert messages[1] == "Another process refused its shard of the fitting data (see its error)."
