"""A causal language model LightningModule whose NFK is its sequence log-likelihood."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_nfk.kernel import Energy, SequenceEnergy
from lightning_nfk.kernel._data import first_tensor, unpack_tokens
from lightning_nfk.kernel.energies.sequence import additive_mask, positions


class CausalLMModule(pl.LightningModule):
    """Next-token training of a causal LM; ``nfk_energy`` is :class:`SequenceEnergy`
    (the log-likelihood of each sequence under its attention mask).

    The loss is the mean negative log-likelihood of the tokens the energy scores: real
    tokens with a real predecessor (padding and each sequence's first token excluded).

    Args:
        model: a causal LM, e.g. :class:`~lightning_nfk.models.GPT` or a Hugging Face
            ``*ForCausalLM`` built from a config: ``model(input_ids, attention_mask=...,
            position_ids=...)`` returns logits ``(B, T, V)`` or an object with ``.logits``.
        optimizer: an optimizer factory (LightningCLI ``OptimizerCallable``).
        scheduler: an optional scheduler factory (stepped every epoch).

    Batches: dicts ``{"input_ids", "attention_mask"}`` (e.g. of
    :class:`~lightning_nfk.data.TextDataModule`), packed ``(B, 2, T)`` tensors, or token
    ids ``(B, T)``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler

    def nfk_energy(self) -> Energy:
        return SequenceEnergy(self.model)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, T, V)`` of token inputs (ids, or packed ids over mask)."""
        ids, mask = unpack_tokens(x)
        dtype = next(self.model.parameters()).dtype
        out = self.model(
            ids, attention_mask=additive_mask(mask, dtype), position_ids=positions(mask)
        )
        return getattr(out, "logits", out)

    def _loss(self, batch: Mapping[str, Tensor] | Tensor) -> Tensor:
        x = first_tensor(batch)
        ids, mask = unpack_tokens(x)
        logits = self(x)[:, :-1]
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view_as(ids[:, 1:])
        scored = (mask[:, 1:] * mask[:, :-1]).to(nll.dtype)
        # no host sync: clamp the count instead of testing it
        return (nll * scored).sum() / scored.sum().clamp_min(1.0)

    def training_step(self, batch: Mapping[str, Tensor] | Tensor, batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Mapping[str, Tensor] | Tensor, batch_idx: int) -> None:
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        # bits per token: the byte-level models' usual figure
        self.log("val/bits_per_token", loss / math.log(2.0), sync_dist=True)

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameters())
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler(optimizer)}
