"""The modules' accuracy metric: the same figures as torchmetrics' ``MulticlassAccuracy``
(which it replaces because that one reads values on the host at every update), over
several updates, with and without an ignored label, and summed over processes."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy

from lightning_nfk.models._metrics import Accuracy

UNLABELED = -1


@pytest.mark.parametrize("ignore_index", [None, UNLABELED])
def test_accuracy_matches_torchmetrics(ignore_index):
    g = torch.Generator().manual_seed(0)
    ours = Accuracy(7, ignore_index=ignore_index)
    ref = MulticlassAccuracy(7, average="micro", ignore_index=ignore_index)
    for batch in (1, 16, 33):
        logits = torch.randn(batch, 7, generator=g)
        target = torch.randint(0, 7, (batch,), generator=g)
        # a third of the labels right, so the figure is not near 1/7 by chance alone
        target[: batch // 3] = logits[: batch // 3].argmax(-1)
        if ignore_index is not None:
            target[torch.rand(batch, generator=g) < 0.4] = ignore_index
        ours.update(logits, target)
        ref.update(logits, target)
    assert ours.compute().item() == pytest.approx(ref.compute().item(), abs=1e-6)
    assert 0.2 < ours.compute().item() < 0.9
    ours.reset()
    ours.update(torch.randn(2, 7), torch.full((2,), UNLABELED))
    if ignore_index is not None:
        assert ours.compute().item() == 0.0  # nothing counted: 0, as torchmetrics


def test_accuracy_counts_only_labelled_images():
    acc = Accuracy(3, ignore_index=UNLABELED)
    logits = torch.eye(3)[[0, 1, 2, 0]]  # predicts 0, 1, 2, 0
    acc.update(logits, torch.tensor([0, 2, UNLABELED, UNLABELED]))
    assert acc.correct.item() == 1 and acc.total.item() == 2
    assert acc.compute().item() == pytest.approx(0.5)


def test_accuracy_states_sum_over_processes():
    # what the ddp reduction does with each process's states: sums them
    a, b = Accuracy(2), Accuracy(2)
    a.update(torch.tensor([[1.0, 0.0]] * 3), torch.tensor([0, 0, 1]))
    b.update(torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
    a.merge_state(b)
    assert (a.correct.item(), a.total.item()) == (3, 4)
    assert a.compute().item() == pytest.approx(3 / 4)


def test_accuracy_rejects_logits_of_another_width():
    with pytest.raises(ValueError, match=r"shape \(4, 7\) \(`num_classes` is 10\)"):
        Accuracy(10).update(torch.randn(4, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes"):
        Accuracy(10).update(torch.randn(4, 10), torch.zeros(5, dtype=torch.long))
