"""Tiny LightningModules for the callback tests."""

from __future__ import annotations

import functools

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_nfk.models import ClassifierModule


def tiny_classifier(seed: int = 0, batch_norm: bool = True, lr: float = 0.05) -> ClassifierModule:
    """Conv (+ BatchNorm) + MLP head on 1x28x28; ``lr=0`` and no BatchNorm keep the weights
    fixed, so that runs with different world sizes see the same model."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 5, stride=3),  # (B, 4, 8, 8)
        nn.BatchNorm2d(4) if batch_norm else nn.Identity(),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, 16),
        nn.Tanh(),
        nn.Linear(16, 10),
    )
    return ClassifierModule(net, optimizer=functools.partial(torch.optim.SGD, lr=lr, momentum=0.9))


class NoProtocol(pl.LightningModule):
    """A trainable module that does not implement ``nfk_energy``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def quick_trainer(tmp_path, callbacks=(), **overrides) -> pl.Trainer:
    """A small CPU trainer for tests: 1 epoch of 4 batches, 1 validation batch, quiet,
    no logger or checkpoints unless ``overrides`` say otherwise."""
    kwargs = {
        "default_root_dir": tmp_path,
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "limit_train_batches": 4,
        "limit_val_batches": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
        "callbacks": list(callbacks),
    }
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)
