"""lightning_nfk.trainer_utils: held signals, the ranks' sums, seeded shards, item checks."""

from __future__ import annotations

import os
import signal
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, TensorDataset

from lightning_nfk.kernel import LowRankNFK
from lightning_nfk.trainer_utils import (
    check_items,
    deferred_interrupts,
    local_shard,
    seeded_subset,
    stack_items,
    strategy_sum,
)
from tests.helpers.models import make_case
from tests.helpers.processes import init_gloo, run_two_gloo

HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def _trainer(rank: int = 0, world: int = 1):
    # no `reduce` and no `barrier`: the package must sum with torch.distributed itself
    strategy = types.SimpleNamespace(root_device=torch.device("cpu"))
    return types.SimpleNamespace(strategy=strategy, global_rank=rank, world_size=world)


@pytest.fixture(autouse=True)
def _handlers_back():
    """A stop leaves SIGINT and SIGTERM ignored until Lightning's teardown restores them:
    here the test restores them (pytest's own SIGINT handler included)."""
    before = {s: signal.getsignal(s) for s in HELD}
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


@pytest.mark.parametrize(
    ("sig", "error", "code"),
    [(signal.SIGTERM, SIGTERMException, 143), (signal.SIGINT, KeyboardInterrupt, None)],
    ids=["sigterm", "sigint"],
)
def test_a_signal_is_held_until_the_section_ends(sig, error, code):
    reached_end = False
    with pytest.raises(error) as info, deferred_interrupts(_trainer()):
        os.kill(os.getpid(), sig)
        torch.zeros(1000).sum()  # the handler runs here: it must only record
        reached_end = True
    assert reached_end
    if code is not None:
        assert info.value.code == code
    # the run is stopping: further copies (torchrun's agent forwarding what the terminal
    # sent) are ignored until Lightning's teardown restores the handlers
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def test_a_signal_stops_the_section_at_the_next_reduce():
    trainer, reached = _trainer(), []
    reduce = strategy_sum(trainer)
    with pytest.raises(SIGTERMException), deferred_interrupts(trainer):
        t = torch.arange(3.0)
        assert reduce(t) is t  # no signal yet: the identity on one process
        reached.append("before")
        os.kill(os.getpid(), signal.SIGTERM)
        torch.zeros(10).sum()
        reached.append("signalled")
        reduce(t)  # the pass boundary: stop here
        reached.append("after the reduce")
    assert reached == ["before", "signalled"]


def test_the_same_signal_twice_does_not_interrupt_at_once():
    # torchrun's agent forwards SIGINT/SIGTERM to workers that already had it from the
    # terminal or SLURM: a second copy must not raise in the middle of a collective
    reached = []
    with pytest.raises(KeyboardInterrupt), deferred_interrupts(_trainer()):
        for i in range(3):
            os.kill(os.getpid(), signal.SIGINT)
            torch.zeros(10).sum()
            reached.append(i)
    assert reached == [0, 1, 2]


def test_no_signal_no_exception_and_the_handlers_are_back():
    held = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    before = {s: signal.getsignal(s) for s in HELD}
    with deferred_interrupts(_trainer()):
        assert all(signal.getsignal(s) is not before[s] for s in held)
        assert signal.getsignal(signal.SIGUSR2) is before[signal.SIGUSR2]  # not held
    assert {s: signal.getsignal(s) for s in HELD} == before


def test_the_slurm_environments_requeue_signal_is_held_too():
    events: list[object] = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: events.append(signum))
    trainer = _trainer()
    trainer.strategy.cluster_environment = SLURMEnvironment(requeue_signal=signal.SIGUSR2)
    with deferred_interrupts(trainer):
        os.kill(os.getpid(), signal.SIGUSR2)
        torch.zeros(10).sum()
        events.append("section done")
    assert events == ["section done", signal.SIGUSR2]


def test_requeue_signal_is_held_and_delivered_after_the_section():
    events: list[object] = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: events.append(("handler", signum)))
    trainer = _trainer()
    reduce = strategy_sum(trainer)
    with deferred_interrupts(trainer):
        os.kill(os.getpid(), signal.SIGUSR1)
        torch.zeros(10).sum()
        events.append("signalled")
        reduce(torch.zeros(2))  # does not stop the section
        events.append("section done")
    events.append("after")
    assert events == ["signalled", "section done", ("handler", signal.SIGUSR1), "after"]


def test_requeue_handler_runs_before_a_stop():
    # SLURM: SIGUSR1 (requeue) then SIGTERM (time limit) during one fit: the requeue
    # checkpoint is saved on every rank, then the run stops
    events: list[object] = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: events.append("requeue"))
    trainer = _trainer()
    with pytest.raises(SIGTERMException), deferred_interrupts(trainer):
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        torch.zeros(10).sum()
        events.append("signalled")
        try:
            strategy_sum(trainer)(torch.zeros(1))
        finally:
            events.append("stopped")
    assert events == ["signalled", "requeue", "stopped"]


def test_a_signal_after_the_last_sum_reaches_the_previous_handler():
    # a copy that arrives after the ranks' last sum (here: while the requeue handler runs)
    # is not lost: it reaches the previous handler once the section has given it back
    events: list[object] = []

    def handler(signum, frame):
        events.append("requeue")
        if len(events) == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # a second copy, during the first

    signal.signal(signal.SIGUSR1, handler)
    with deferred_interrupts(_trainer()):
        os.kill(os.getpid(), signal.SIGUSR1)
        torch.zeros(10).sum()
    torch.zeros(10).sum()
    assert events == ["requeue", "requeue"]
    assert signal.getsignal(signal.SIGUSR1) is handler


def test_an_error_in_the_section_drops_what_was_held():
    events: list[object] = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: events.append("requeue"))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ValueError, match="engine"), deferred_interrupts(_trainer()):
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        torch.zeros(10).sum()
        raise ValueError("engine failure")
    assert events == []  # no collective may run on one failing rank
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_failed_sum_gives_the_handlers_back():
    before = {s: signal.getsignal(s) for s in HELD}
    # two ranks claimed, no process group: the closing sum fails
    with (
        pytest.raises((RuntimeError, ValueError), match="process group"),
        deferred_interrupts(_trainer(world=2)),
    ):
        pass
    assert {s: signal.getsignal(s) for s in HELD} == before


def test_nested_sections_hold_in_the_outer_one():
    events: list[object] = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: events.append("requeue"))
    with deferred_interrupts(_trainer()):
        with deferred_interrupts(_trainer()):
            os.kill(os.getpid(), signal.SIGUSR1)
            torch.zeros(10).sum()
        events.append("inner done")
    assert events == ["inner done", "requeue"]


# -- two gloo processes ----------------------------------------------------------------------
def _signal_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world, port)

    def no_barrier(*args, **kwargs):
        raise AssertionError("strategy_sum must not add a barrier")

    dist.barrier = no_barrier
    try:
        torch.set_num_threads(1)
        trainer = _trainer(rank, world)
        reduce = strategy_sum(trainer)
        out: dict[str, object] = {}
        # sums of CPU tensors: float64, float32, int64, non-contiguous
        a = torch.arange(6, dtype=torch.float64).reshape(2, 3) * (rank + 1)
        out["sums"] = [
            reduce(a.clone()),
            reduce(a.float().t()),  # non-contiguous
            reduce(torch.tensor([rank + 1])),
        ]
        case = make_case("mlp")
        shard = case.x[:19] if rank == 0 else case.x[19:]  # uneven shards
        calls = 0

        def counting(t: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            return reduce(t)

        # SIGTERM on rank 0 only, in its second chunk of the first pass: both ranks stop
        # at the same reduce, before the fit ends
        chunks = 0

        def progress(n: int) -> None:
            nonlocal chunks
            chunks += 1
            if rank == 0 and chunks == 2:
                out["signalled after"] = calls
                os.kill(os.getpid(), signal.SIGTERM)

        loader = DataLoader(TensorDataset(shard), batch_size=4)
        try:
            with deferred_interrupts(trainer):
                LowRankNFK(case.energy, k=3, oversample=4, n_iter=4, reduce=counting).fit(
                    loader, progress=progress
                )
            out["stop"] = "no stop"
        except SIGTERMException as e:
            out["stop"] = (e.code, calls)
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)  # Lightning's teardown would do this

        # SIGUSR1 on rank 1 only, mid-fit: every rank's handler runs once, after the fit
        events: list[str] = []
        signal.signal(signal.SIGUSR1, lambda signum, frame: events.append("requeue"))
        chunks = 0

        def progress_usr1(n: int) -> None:
            nonlocal chunks
            chunks += 1
            if rank == 1 and chunks == 2:
                os.kill(os.getpid(), signal.SIGUSR1)

        calls = 0
        with deferred_interrupts(trainer):
            nfk = LowRankNFK(case.energy, k=3, oversample=4, n_iter=4, reduce=counting)
            nfk.fit(loader, progress=progress_usr1)
            events.append("fitted")
        out["events"], out["calls"] = events, calls
        out["sigma"] = nfk.singular_values
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("signals")
    run_two_gloo(_signal_worker, tmp, 120, "the 2-process signal run")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_sums_over_two_gloo_processes_without_barrier(two_ranks):
    a = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    for out in two_ranks:
        sums = out["sums"]
        torch.testing.assert_close(sums[0], 3 * a)  # exact: small integers
        torch.testing.assert_close(sums[1], 3 * a.float().t())
        assert sums[2].tolist() == [3]


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_reduce(two_ranks):
    stops = [out["stop"] for out in two_ranks]
    assert stops[0] != "no stop", "rank 0 received SIGTERM in its fit and did not stop"
    assert stops[0] == stops[1], "the ranks stopped at different reduces"
    code, calls = stops[0]
    assert code == 143
    # at the first reduce after the signal, long before the fit's last one
    assert calls == two_ranks[0]["signalled after"] + 1
    assert calls < two_ranks[0]["calls"]


def test_a_requeue_signal_on_one_rank_reaches_every_rank_after_the_section(two_ranks):
    for out in two_ranks:
        assert out["events"] == ["fitted", "requeue"]
    torch.testing.assert_close(two_ranks[0]["sigma"], two_ranks[1]["sigma"])


def test_seeded_shards_cover_the_selection_without_overlap():
    indices = seeded_subset(1000, 101, seed=3)
    assert torch.equal(indices, seeded_subset(1000, 101, seed=3))  # seeded
    assert len(indices.unique()) == 101 and torch.all(indices[1:] > indices[:-1])
    shards = [local_shard(_trainer(r, 3), indices) for r in range(3)]
    assert torch.equal(torch.cat([s for s, _ in shards]), indices)
    assert [lo for _, lo in shards] == [0, 33, 67]
    assert len(local_shard(_trainer(1, 2), indices[:1])[0]) == 1  # rank 0 gets none
    assert torch.equal(seeded_subset(5, 10, seed=0), torch.arange(5))


def test_numpy_integer_labels_are_accepted():
    dataset = [(torch.zeros(3), np.int64(2)), (torch.ones(3), np.int64(0))]
    check_items(dataset, labels=True, where="test dataset")
    x, y = stack_items(dataset, torch.tensor([1, 0]), labels=True)
    assert y.tolist() == [0, 2] and x.shape == (2, 3)
    x, y = stack_items(dataset, torch.tensor([], dtype=torch.long), labels=True)
    assert x.shape == (0, 3) and y.shape == (0,)
