"""NFK distillation on CUDA, both target sources: the teacher's targets equal a CPU fit of
the same teacher, and a training step after warm-up (targets, head, losses, backward,
optimizer step) makes no host sync.

Tiny WRNs on 8x8 synthetic images, as in tests/models/test_distillation.py. Tolerance of
the targets: n_iter = 2 leaves the Ritz vectors sensitive to round-off (that file's
``1e4 eps`` of the largest embedding, for the same fit chunked otherwise); another device
is another order of the same float32 sums.
"""

from __future__ import annotations

import copy
import functools

import pytest
import pytorch_lightning as pl
import torch

from lightning_nfk.kernel import ClassifierEnergy, LowRankNFK
from lightning_nfk.models import NFKDistillationModule, WideResNet
from lightning_nfk.models.teacher_targets import trainable
from lightning_nfk.trainer_utils import stack_items
from tests.cuda.gpu import no_host_sync
from tests.helpers.data import RandomImageDataModule

pytestmark = pytest.mark.cuda

EPS32 = torch.finfo(torch.float32).eps
WARM_UP = 2  # training batches before the guard: allocations, cuDNN set-up, optimizer state
BATCHES = 4


class NoHostSync(pl.Callback):
    """Raise on any synchronizing CUDA call from the start of each training batch after the
    warm-up (the batch already on the device) to its end: the step, backward and optimizer
    step; Lightning's data fetching and logging between batches are outside."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.guarded = device, 0
        self._guard = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx >= WARM_UP:
            self._guard = no_host_sync(self.device)
            self._guard.__enter__()
            self.guarded += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._release()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._release()

    def _release(self) -> None:
        if self._guard is not None:
            self._guard.__exit__(None, None, None)
            self._guard = None


def _module(targets: str) -> NFKDistillationModule:
    torch.manual_seed(0)
    return NFKDistillationModule(
        WideResNet(10, 1, in_channels=1),
        WideResNet(10, 2, in_channels=1),
        mode="nfkd",
        targets=targets,
        k=4,
        oversample=4,
        n_iter=2,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    )


def _data() -> RandomImageDataModule:
    return RandomImageDataModule(
        shape=(1, 8, 8),
        num_train=160,
        num_test=64,
        val_size=32,
        batch_size=32,
        with_index=True,
        augment=True,
    )


def _aligned(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` with each column's sign chosen to match ``b`` (components are defined up to sign)."""
    return a * torch.sign((a * b).sum(dim=0, keepdim=True))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e4 * EPS32 * float(b.abs().max()))


@pytest.mark.parametrize("targets", ["precomputed", "online"])
def test_distillation_on_the_device(targets, device):
    m, dm = _module(targets), _data()
    student_before = [p.detach().clone() for p in m.student.parameters()]
    guard = NoHostSync(device)
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        max_epochs=1,
        limit_train_batches=BATCHES,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[guard],
    )
    trainer.fit(m, dm)
    assert guard.guarded == BATCHES - WARM_UP
    assert trainer.train_dataloader.pin_memory == (device.type == "cuda")
    metrics = trainer.logged_metrics
    assert all(torch.isfinite(metrics[k]) for k in ("train/loss", "train/nfkd", "train/ce"))
    assert "nfkd/target_r2" in metrics
    assert any(not torch.equal(a, b.cpu()) for a, b in zip(student_before, m.student.parameters()))

    # the targets against a CPU fit of the same (frozen) teacher on the same clean images
    tt = m.teacher_targets
    teacher = copy.deepcopy(m.teacher).cpu()
    train = dm.dataset("train")
    x, _ = stack_items(train, torch.arange(len(train)))
    with trainable(teacher):
        reference = LowRankNFK(ClassifierEnergy(teacher), m.term.config).fit(x)
        want = reference.transform(x)
    torch.testing.assert_close(
        tt.rms.cpu(),
        (reference.singular_values.double() / len(x) ** 0.5).float(),
        rtol=1e-4,
        atol=0,
    )
    # precomputed: the table; online: the images' own embeddings, computed on the device
    got = tt.train if targets == "precomputed" else tt.embed(x.to(m.device))
    got = got.cpu()
    _close(_aligned(got, want), want)
