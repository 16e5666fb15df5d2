"""Top-1 accuracy that never reads a value on the host while it counts.

torchmetrics' ``MulticlassAccuracy`` synchronises the host with the device on every
update: its argument check counts ``torch.unique(target)``, its counts go through
``torch.bincount`` (whose CUDA kernel reads the input's maximum), and ``ignore_index``
selects with a boolean mask. Called in every training step, that is one stall of the
device per step. Here the counts are two integer tensors on the module's device, added to
with element-wise comparisons and sums only; the value is read once, when it is logged
at the epoch's end, and the states are summed over processes as any torchmetrics state.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class Accuracy(Metric):
    """The fraction of examples whose largest logit is the label's.

    ``ignore_index``: a label value that is not counted (the unlabelled images of a
    ``train_split="semi"`` batch). With nothing counted the accuracy is 0, as
    torchmetrics' is. ``num_classes``: the logits' width, checked at every update (a shape,
    read without a sync); the labels' range is not (that would read them).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    total: Tensor

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        # created on the CPU like every torchmetrics state; the module's `.to` moves them
        for name in ("correct", "total"):
            self.add_state(
                name, default=torch.zeros((), dtype=torch.long, device="cpu"), dist_reduce_fx="sum"
            )

    def update(self, logits: Tensor, target: Tensor) -> None:
        if logits.shape[-1:] != (self.num_classes,) or logits.shape[:-1] != target.shape:
            raise ValueError(
                f"Accuracy needs logits of shape (*target.shape, num_classes) = "
                f"{(*target.shape, self.num_classes)}; got logits of shape "
                f"{tuple(logits.shape)} (`num_classes` is {self.num_classes}). Build the "
                f"network with `num_classes` outputs."
            )
        hit = logits.argmax(-1) == target
        if self.ignore_index is None:
            self.total += target.numel()
        else:
            counted = target != self.ignore_index
            hit = hit & counted
            self.total += counted.sum()
        self.correct += hit.sum()

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp_min(1).float()  # float32: MPS has no float64
