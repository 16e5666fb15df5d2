"""lightning_nfk.trainer_utils: deferred interrupts, seeded shards, item checks."""

from __future__ import annotations

import os
import signal
import types

import numpy as np
import pytest
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lightning_nfk.trainer_utils import (
    check_items,
    deferred_interrupts,
    local_shard,
    seeded_subset,
    stack_items,
)


def _trainer(rank: int = 0, world: int = 1):
    strategy = types.SimpleNamespace(root_device=torch.device("cpu"))
    return types.SimpleNamespace(strategy=strategy, global_rank=rank, world_size=world)


@pytest.mark.parametrize(
    ("sig", "error", "code"),
    [(signal.SIGTERM, SIGTERMException, 143), (signal.SIGINT, KeyboardInterrupt, None)],
    ids=["sigterm", "sigint"],
)
def test_a_signal_is_held_until_the_section_ends(sig, error, code):
    before = signal.getsignal(sig)
    reached_end = False
    with pytest.raises(error) as info, deferred_interrupts(_trainer()):
        os.kill(os.getpid(), sig)
        torch.zeros(1000).sum()  # the handler runs here: it must only record
        reached_end = True
    assert reached_end
    if code is not None:
        assert info.value.code == code
    assert signal.getsignal(sig) is before  # the previous handler is back


def test_the_same_signal_twice_interrupts_at_once():
    reached = []
    with pytest.raises(KeyboardInterrupt), deferred_interrupts(_trainer()):
        os.kill(os.getpid(), signal.SIGINT)
        torch.zeros(10).sum()
        reached.append(1)
        os.kill(os.getpid(), signal.SIGINT)
        torch.zeros(10).sum()
        reached.append(2)
    assert reached == [1]


def test_no_signal_no_exception():
    with deferred_interrupts(_trainer()):
        pass


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
