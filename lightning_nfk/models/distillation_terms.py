"""Distillation methods as terms of the student's loss.

:class:`~lightning_nfk.models.NFKDistillationModule` trains the student on

.. math::

    L = \\alpha\\,\\mathrm{CE}(f_s(x), y) + (1 - \\alpha)\\,\\mathrm{term}(x),

and each method is one :class:`DistillationTerm`: :class:`NFKDTerm` (the teacher's
low-rank NFK embeddings as targets, Zhang et al., ICLR 2022, Appendix D.2) and
:class:`KDTerm` (Hinton et al., 2015). The student alone is no term. A term owns what its
method needs (targets, heads, metrics, checkpoint state, set-up checks); the module keeps
the student, the cross-entropy, the mix, accuracy and the optimiser. A new method is a new
term (mdistiller's shape: each distiller its own class with its extra parameters).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.regression import CosineSimilarity, R2Score

from lightning_nfk.kernel import NFKConfig
from lightning_nfk.kernel._data import parameter_dtype
from lightning_nfk.kernel.config import check_int
from lightning_nfk.models.teacher_targets import (
    TeacherTargets,
    check_cache_path,
    data_fingerprint,
    fit_or_load,
)

if TYPE_CHECKING:
    import pytorch_lightning as pl


class DistillationTerm(ABC):
    """One distillation method: the ``term`` of the loss, given the student's penultimate
    ``features`` and ``logits`` of a batch.

    The module calls :meth:`attach` once (at its construction), then the hooks below at the
    module's hooks of the same name. Class attributes: ``name`` (its loss is logged as
    ``train/<name>``), ``default_alpha`` (the weight of the cross-entropy when ``alpha`` is
    not given), ``checkpoint_key`` (where :meth:`checkpoint_state` is kept, None for no
    state).
    """

    name: ClassVar[str]
    default_alpha: ClassVar[float]
    checkpoint_key: ClassVar[str | None] = None

    def attach(self, student: nn.Module, teacher: nn.Module, teacher_file: Path | None) -> None:
        """Bind the term to the module's student and (frozen) teacher; ``teacher_file`` is
        the file the teacher's weights came from (None: the weights it was built with)."""
        self.student, self.teacher = student, teacher

    def modules(self) -> dict[str, nn.Module]:
        """Modules the LightningModule registers under these names (moved with it, saved in
        its checkpoints, metrics logged from it)."""
        return {}

    def parameters(self) -> list[nn.Parameter]:
        """Extra trainable parameters, optimised with the student's."""
        return []

    def setup(self, module: pl.LightningModule, train_set: Any | None) -> None:
        """Cheap checks before ``fit`` reads any data (``train_set``: the un-augmented
        training split, None when the data module has no ``dataset(split)``)."""
        return None  # optional hook

    def on_fit_start(self, module: pl.LightningModule) -> None:
        """Before the first training step (a teacher's expensive fit goes here)."""
        return None  # optional hook

    def on_validation_start(self, module: pl.LightningModule) -> None:
        """Before a validation loop."""
        return None  # optional hook

    @abstractmethod
    def loss(
        self, batch: Any, features: Tensor, logits: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The term of a training batch, and values to log (``train/<key>``)."""

    def validation_metrics(self, batch: Any, features: Tensor, logits: Tensor) -> dict[str, Metric]:
        """Metrics updated with a validation batch, to log under their keys."""
        return {}

    def checkpoint_state(self) -> Any | None:
        """What a checkpoint keeps under ``checkpoint_key`` (None: nothing)."""
        return None

    def load_checkpoint_state(self, state: Any) -> None:
        """Restore :meth:`checkpoint_state` (called when a checkpoint is loaded)."""
        return None  # optional hook


def teacher_logits(teacher: nn.Module, x: Tensor) -> Tensor:
    """The teacher's logits of ``x``, read in the teacher's dtype (a float32 teacher beside
    a ``bf16-true`` student)."""
    dtype = parameter_dtype(teacher)
    return teacher(x if dtype is None or not x.is_floating_point() else x.to(dtype))


class KDTerm(DistillationTerm):
    """Hinton et al. (2015): :math:`T^2\\,\\mathrm{KL}(p_t^T \\| p_s^T)`, the softened
    teacher's and student's class distributions at temperature ``T``.

    Args:
        temperature: T, a positive finite number.
    """

    name = "kd"
    default_alpha = 0.1  # the KD repositories' 0.1 CE + 0.9 KD

    def __init__(self, temperature: float = 4.0) -> None:
        if not (is_number(temperature) and 0 < temperature < math.inf):
            raise ValueError(
                f"`temperature` must be a positive finite number, got {temperature!r}."
            )
        self.temperature = float(temperature)

    def loss(
        self, batch: Any, features: Tensor, logits: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            target = teacher_logits(self.teacher, batch[0]).to(logits.dtype)
        t = self.temperature
        kd = F.kl_div(
            F.log_softmax(logits / t, dim=1),
            F.log_softmax(target / t, dim=1),
            log_target=True,
            reduction="batchmean",
        ) * (t * t)
        return kd, {"kd": kd}


class NFKDTerm(DistillationTerm):
    """NFKD: :math:`L_t(h_s(x), Q_t(x))`, a head :math:`h_s` on the student's penultimate
    features regressing the teacher's rank-``k`` NFK embedding
    :math:`Q_t(x) = e(x) = V_x P` (classifier energy, fitted on the un-augmented training
    split at the start of ``fit``, or read from ``cache``).

    Args:
        k: NFK components (the paper: 20).
        teacher_loss: :math:`L_t`: ``"cosine"`` (one minus the cosine similarity, the
            default) or ``"mse"`` (mean squared error); the paper allows either. Cosine
            distils better at CPU scale (three seeds each: 69.5% against 68.8%, level with
            KD; docs/design.md, section 8).
        target_scaling: ``"standardize"`` divides component i by its root mean square over
            the fitting set, :math:`\\sigma_i / \\sqrt{N}`, so that every component weighs
            the same; ``"raw"`` keeps :math:`e(x)`, whose first component dwarfs the k-th.
        head: the head :math:`h_s` (d -> k); default ``nn.Linear(d, k)`` seeded by ``seed``.
        targets: ``"precomputed"``: the clean training images' embeddings, looked up by
            example index (items ``(x, y, index)``); ``"online"``: :math:`e(x)` of each
            augmented batch, through the teacher's per-example gradients.
        n_iter, oversample, seed: the teacher's randomized SVD (the paper: 10 iterations).
        batch_size: examples per batch when reading the fitting data.
        chunk_size: examples per per-example-gradient block (default: from the memory
            budget).
        cache: a file keeping the fitted NFK and tables across runs (see
            :class:`~lightning_nfk.models.NFKDistillationModule`).
    """

    name = "nfkd"
    default_alpha = 0.5
    checkpoint_key = "nfk_distillation_targets"

    def __init__(
        self,
        k: int = 20,
        teacher_loss: Literal["mse", "cosine"] = "cosine",
        target_scaling: Literal["standardize", "raw"] = "standardize",
        head: nn.Module | None = None,
        targets: Literal["precomputed", "online"] = "precomputed",
        n_iter: int = 10,
        oversample: int = 10,
        seed: int = 0,
        batch_size: int = 256,
        chunk_size: int | None = None,
        cache: str | None = None,
    ) -> None:
        check_choice("teacher_loss", teacher_loss, ("mse", "cosine"))
        check_choice("target_scaling", target_scaling, ("standardize", "raw"))
        check_choice("targets", targets, ("precomputed", "online"))
        check_int("nfk_batch_size", batch_size, 1)
        if head is not None and not isinstance(head, nn.Module):
            raise TypeError(f"`head` must be an nn.Module or None, got {type(head).__name__}.")
        # validated here, before any data is read (k, n_iter, oversample, seed, chunk_size)
        self.config = NFKConfig(
            k=k, oversample=oversample, n_iter=n_iter, seed=seed, chunk_size=chunk_size
        )
        self.teacher_loss, self.target_scaling, self.targets = teacher_loss, target_scaling, targets
        self.batch_size, self.cache, self.head = batch_size, cache, head
        self._restored_tables: dict[str, Any] | None = None

    def attach(self, student: nn.Module, teacher: nn.Module, teacher_file: Path | None) -> None:
        super().attach(student, teacher, teacher_file)
        check_cache_path(self.cache, teacher_file)
        if self.head is None:  # seeded aside: the global RNG stream is the same in every mode
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed)
                self.head = nn.Linear(student.fc.in_features, self.config.k)
        self.teacher_targets = TeacherTargets(teacher, self.config)
        self.val_r2 = R2Score(multioutput="variance_weighted")
        self.val_cos = CosineSimilarity(reduction="mean")

    def modules(self) -> dict[str, nn.Module]:
        return {"head": self.head, "val_r2": self.val_r2, "val_cos": self.val_cos}

    def parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    # -- set-up and the teacher's fit --------------------------------------------------------
    def setup(self, module: pl.LightningModule, train_set: Any | None) -> None:
        if train_set is None:
            raise ValueError(
                "NFKDistillationModule(mode='nfkd') fits the teacher's NFK on the un-augmented "
                "training split: pass a data module with a `dataset(split)` method (the "
                "lightning_nfk.data modules have one) to `fit`, not bare loaders."
            )
        n = len(train_set)
        p = sum(q.numel() for q in self.teacher.parameters())
        self.config.check_columns(
            min(n, p),
            f"min(training examples, teacher parameters) = min({n}, {p})",
            "lower `k` or `oversample`, or train on more examples",
        )
        if self.targets == "precomputed":
            _check_index(train_set, "training")

    def on_fit_start(self, module: pl.LightningModule) -> None:
        self._fit_targets(module)
        # once: every step then indexes the tables with the batch's index where it is
        self.teacher_targets.to(module.device)

    def on_validation_start(self, module: pl.LightningModule) -> None:
        self.teacher_targets.to(module.device)  # `validate` after a restore: tables on the CPU

    def _fit_targets(self, module: pl.LightningModule) -> None:
        """Fit the teacher's NFK, or read it from ``cache``, unless the tables were restored
        from a checkpoint of the same training split."""
        dm = module.trainer.datamodule
        train_set = dm.dataset("train")
        fingerprint = data_fingerprint(train_set)  # once: every example and label
        if self._restored_tables is not None and self.targets == "precomputed":
            if self.teacher_targets.matches(fingerprint):
                return  # resumed: the tables came with the checkpoint, no refit
            rank_zero_warn(
                "The checkpoint's distillation targets were fitted on another training split "
                "(its examples, labels or normalisation differ, or the checkpoint is from an "
                "older version): fitting the teacher's NFK again."
            )
        try:
            val_set = dm.dataset("val")
        except ValueError:  # a data module without a validation split
            val_set = None
        tt = self.teacher_targets
        how = fit_or_load(
            tt, module.trainer, train_set, val_set, self.batch_size, self.cache, fingerprint
        )
        if how == "fit":
            module.print(f"Teacher NFK fitted in {tt.seconds:.1f} s.")
        if self.targets == "precomputed":
            tt.release_components()  # only the tables are needed

    # -- the term ------------------------------------------------------------------------------
    def batch_targets(self, batch: Any, split: Literal["train", "val"]) -> Tensor | None:
        """The batch's (scaled) targets, float32 on the batch's device, without a host sync.

        Looked up by index in the split's table when there is one and the batch carries
        the index (never for augmented training batches of ``targets="online"``); else
        computed from the images (``"online"``). None for a validation batch without
        either (no validation split at fit start, or no index).
        """
        x, tt = batch[0], self.teacher_targets
        table = tt.val if split == "val" else tt.train if self.targets == "precomputed" else None
        if table is not None and len(batch) > 2:
            q = table[batch[2]]
        elif self.targets == "online":
            q = tt.embed(x)
        elif split == "val":
            return None
        else:
            raise ValueError(
                "targets='precomputed' needs batches (x, y, index): set `with_index: true` "
                "on the data module."
            )
        q = q.to(x.device, torch.float32)
        return tt.standardized(q) if self.target_scaling == "standardize" else q

    def distance(self, h: Tensor, q: Tensor) -> Tensor:
        """:math:`L_t(h, q)`, averaged over the batch."""
        if self.teacher_loss == "mse":
            return F.mse_loss(h, q)
        return (1 - F.cosine_similarity(h, q, dim=1)).mean()

    def loss(
        self, batch: Any, features: Tensor, logits: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        q = self.batch_targets(batch, "train")
        assert q is not None
        value = self.distance(self.head(features), q)
        return value, {"nfkd": value}

    def validation_metrics(self, batch: Any, features: Tensor, logits: Tensor) -> dict[str, Metric]:
        if not self.teacher_targets.is_ready:
            return {}
        q = self.batch_targets(batch, "val")
        if q is None:
            return {}
        h = self.head(features)
        # `update`, not a call: a call also computes the batch's value, and R2Score's compute
        # reads its count on the host (a sync per step); the epoch's value is computed once,
        # when Lightning logs the metric at the epoch's end
        self.val_r2.update(h, q)
        self.val_cos.update(h, q)
        return {"nfkd/target_r2": self.val_r2, "nfkd/target_cos": self.val_cos}

    # -- checkpoints: the tables of precomputed targets ------------------------------------------
    def checkpoint_state(self) -> dict[str, Any] | None:
        if self.targets == "precomputed" and self.teacher_targets.is_ready:
            return self.teacher_targets.tables()
        return None

    def load_checkpoint_state(self, state: Any) -> None:
        self._restored_tables = state
        if state is not None:
            self.teacher_targets.load_tables(state)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming ``name`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


def is_number(value: object) -> bool:
    """A real number (int or float), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_index(dataset: Any, what: str) -> None:
    item = dataset[0]
    index = item[2] if isinstance(item, (tuple, list)) and len(item) > 2 else None
    ok = index is not None and (
        isinstance(index, int) or (isinstance(index, Tensor) and index.numel() == 1)
    )
    if not ok:
        raise ValueError(
            f"targets='precomputed' looks targets up by example index, but items of the {what} "
            "split are not (x, y, index): set `with_index: true` on the data module (or return "
            "the index as the third element), or use targets='online'."
        )


__all__ = ["DistillationTerm", "KDTerm", "NFKDTerm", "check_choice", "teacher_logits"]
