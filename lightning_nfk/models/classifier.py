"""A classifier LightningModule whose NFK is the free energy of its logits."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_nfk.kernel import ClassifierEnergy, Energy
from lightning_nfk.models._metrics import Accuracy


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training of ``net``; ``nfk_energy`` is :class:`ClassifierEnergy`.

    Args:
        net: maps images to logits ``(B, num_classes)``.
        num_classes: number of classes.
        optimizer: an optimizer factory (LightningCLI ``OptimizerCallable``).
        scheduler: an optional scheduler factory (stepped every epoch).
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 10,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_acc = Accuracy(num_classes)
        self.val_acc = Accuracy(num_classes)
        self.test_acc = Accuracy(num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def nfk_energy(self) -> Energy:
        return ClassifierEnergy(self.net)

    def setup(self, stage: str) -> None:
        split = getattr(self.trainer.datamodule, "train_split", None)
        if stage == "fit" and split == "semi":
            raise ValueError(
                "ClassifierModule trains on labels only: the data module's `train_split` is "
                "'semi' (unlabelled images marked -1). Cure: `train_split='labeled'` for the "
                "label budget alone, or NFKDistillationModule to use the unlabelled images."
            )

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]  # (x, y) or (x, y, index)
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc.update(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        x, y = batch[0], batch[1]  # (x, y) or (x, y, index)
        logits = self.net(x)
        self.val_acc.update(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        x, y = batch[0], batch[1]  # (x, y) or (x, y, index)
        logits = self.net(x)
        self.test_acc.update(logits, y)
        self.log("test/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameters())
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler(optimizer)}
