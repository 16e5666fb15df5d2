"""Knowledge distillation from a frozen teacher: NFKD (the teacher's low-rank NFK
embeddings as targets), Hinton's KD, and the student alone, in one LightningModule.

The module keeps the student, the cross-entropy, the mix, accuracy and the optimiser;
each method is a term of the loss (:mod:`lightning_nfk.models.distillation_terms`), and
the teacher's weights are read by :mod:`lightning_nfk.models.teacher_checkpoint`.

Zhang et al., ICLR 2022, Sec. 4.2 and Appendix D.2 (Eq. 16):

.. math::

    L(x, y) = \\alpha\\,\\mathrm{CE}(f_s(x), y) + (1 - \\alpha)\\,L_t(h_s(x), Q_t(x)),

with :math:`Q_t(x)` the teacher's k-dimensional NFK embedding and :math:`h_s` a head on
the student's penultimate features. See docs/design.md, section 8.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor, nn
from typing_extensions import override

from lightning_nfk._io import describe_error
from lightning_nfk.kernel import ClassifierEnergy, Energy, kernel_mode
from lightning_nfk.kernel._data import first_tensor
from lightning_nfk.kernel.config import check_int
from lightning_nfk.models._metrics import Accuracy
from lightning_nfk.models.distillation_terms import (
    DistillationTerm,
    KDTerm,
    NFKDTerm,
    check_choice,
    is_number,
    teacher_logits,
)
from lightning_nfk.models.teacher_checkpoint import check_same_teacher, load_teacher_weights
from lightning_nfk.models.teacher_targets import TeacherTargets
from lightning_nfk.runs import resolve_checkpoint
from lightning_nfk.trainer_utils import check_strategy

Mode = Literal["nfkd", "kd", "none"]


# The label of an unlabelled training image (lightning_nfk.data.UNLABELED: the data modules'
# "semi" split; the models do not import the data room, a test checks the two agree).
UNLABELED = -1


class NFKDistillationModule(pl.LightningModule):
    """Train ``student`` on labels and a frozen ``teacher``'s knowledge.

    Modes (the three columns of the paper's Table 3 under one schedule):

    * ``"nfkd"``: :math:`\\alpha\\,\\mathrm{CE} + (1 - \\alpha)\\,L_t(h_s(x), Q_t(x))`,
      :math:`Q_t(x) = e(x) = V_x P` the teacher's rank-``k`` NFK embedding (classifier
      energy, centred and normalised on the un-augmented training split); ``L_t`` one minus
      the cosine similarity (``"cosine"``, the default) or the mean squared error
      (``"mse"``);
    * ``"kd"``: Hinton et al. (2015),
      :math:`\\alpha\\,\\mathrm{CE} + (1 - \\alpha)\\,T^2\\,\\mathrm{KL}(p_t^T \\| p_s^T)`;
    * ``"none"``: the student alone (cross-entropy).

    The teacher is frozen: its parameters do not require grad, are outside the optimizer,
    it stays in eval mode (``train()`` never switches it), and it keeps the dtype of its
    weights whatever the trainer's precision (``bf16-true`` converts the student, not the
    teacher: its weights stay bit-identical). Its NFK is fitted at the start of ``fit``
    (``on_fit_start``, before any training step), or read from ``nfk_cache``.

    Targets (``targets``):

    * ``"precomputed"``: the embeddings of the training split's clean images, taken from
      the fit's last pass and looked up by example index (the data module must return
      ``(x, y, index)``: ``with_index=True``). Under augmentation the target of an augmented
      image is its clean image's embedding. Costs nothing per step (the tables sit on the
      module's device and are indexed with the batch's index there: no host sync); memory
      N x k (the teacher's NFK components are dropped after the fit).
    * ``"online"``: :math:`e(x)` of each augmented batch, through the teacher's per-example
      gradients (one k-column product per batch; the components, |theta_t| x k, stay in
      memory on the teacher's device). Costs about one teacher backward per example per
      step, and no host sync: a non-finite target shows as a NaN loss, not an error.

    Unlabelled images: with a data module whose ``train_split="semi"`` (every training
    image; the labels outside ``num_labels`` hidden as ``UNLABELED``), the cross-entropy
    and the training accuracy count the labelled images only, while the distillation term
    (NFKD or KD) sees every image: the semi-supervised use of a teacher.

    Target scaling (``target_scaling``): ``"standardize"`` divides component i by its root
    mean square over the fitting set, :math:`\\sigma_i / \\sqrt{N}`, so that every
    component weighs the same in the loss; ``"raw"`` keeps :math:`e(x)`, whose first
    component dwarfs the k-th (the loss then mostly fits the top few).

    A checkpoint holds the student, the head, the (frozen) teacher and, in precomputed
    mode, the target tables (N x k and N_val x k floats); not the teacher's NFK
    components. Resuming a precomputed run reads the tables from the checkpoint (fitted
    again when the training split's examples or labels changed); an online run fits again
    (or reads ``nfk_cache``). Resuming with another teacher than the checkpoint's (other
    weights in ``teacher_checkpoint``) or other NFK settings is refused.

    The module implements the NFK protocol for the student (``nfk_energy``), so
    :class:`~lightning_nfk.callbacks.NFKSpectrumCallback` and
    :class:`~lightning_nfk.callbacks.LinearProbeCallback` observe the student.

    Args:
        student: a classifier with ``features(x) -> (B, d)`` (penultimate features) and a
            linear classifier ``fc`` with ``fc(features(x)) == student(x)``, as
            :class:`~lightning_nfk.models.WideResNet`.
        teacher: the teacher network (logits ``(B, num_classes)``).
        teacher_checkpoint: a file with the teacher's weights: a
            :class:`~lightning_nfk.models.ClassifierModule` checkpoint (``net.*`` keys), a
            Lightning checkpoint of any module whose keys end in the teacher's, or a plain
            ``state_dict``; or a recipe's log folder (``lightning_logs/<teacher recipe>``),
            meaning its newest run's ``last.ckpt``. Loaded (and checked: a corrupted file
            is refused) at construction.
        mode: ``"nfkd"``, ``"kd"`` or ``"none"`` (the short forms: the arguments below
            configure their terms), or a :class:`~lightning_nfk.models.DistillationTerm`
            (e.g. ``NFKDTerm(k=32)``, or a method of your own), whose own settings apply: the
            method-specific arguments here (``k``, ``temperature``, ...) must then stay
            unset. A term object is not saved in the hyperparameters: pass it again to
            ``load_from_checkpoint``.
        num_classes: number of classes.
        alpha: weight of the cross-entropy; default 0.5 for ``"nfkd"`` and 0.1 for
            ``"kd"`` (the KD repositories' 0.1 CE + 0.9 KD); 1 for ``"none"``.
        k: NFK components (the paper: 20).
        teacher_loss: ``"cosine"`` (the default) or ``"mse"``.
        target_scaling: ``"standardize"`` or ``"raw"``.
        head: the prediction head :math:`h_s` (d -> k); default ``nn.Linear(d, k)``.
        targets: ``"precomputed"`` or ``"online"``.
        temperature: the KD temperature T.
        n_iter: power iterations of the teacher's NFK fit (the paper: 10).
        oversample: extra columns of the randomized SVD.
        nfk_seed: seed of the randomized SVD.
        nfk_batch_size: examples per batch when reading the fitting data.
        chunk_size: examples per per-example-gradient block (default: from the memory
            budget); lower it to save memory on a large teacher.
        nfk_cache: a file keeping the teacher's fitted NFK and tables across runs (seeds,
            baselines): read when it matches the teacher's weights, the NFK settings and the
            fitting data (every example and label), else written after the fit. Only a
            cache is ever replaced: an existing file of another kind (the teacher's
            checkpoint, a state dict, ...) is refused at construction.
        optimizer: an optimizer factory, given the student's parameters and the term's
            (the NFKD head).
        scheduler: an optional scheduler factory (stepped every epoch).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        teacher_checkpoint: str | None = None,
        mode: Mode | DistillationTerm = "nfkd",
        num_classes: int = 10,
        alpha: float | None = None,
        k: int = 20,
        teacher_loss: Literal["mse", "cosine"] = "cosine",
        target_scaling: Literal["standardize", "raw"] = "standardize",
        head: nn.Module | None = None,
        targets: Literal["precomputed", "online"] = "precomputed",
        temperature: float = 4.0,
        n_iter: int = 10,
        oversample: int = 10,
        nfk_seed: int = 0,
        nfk_batch_size: int = 256,
        chunk_size: int | None = None,
        nfk_cache: str | None = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        options = {name: value for name, value in locals().items() if name in _TERM_OPTIONS}
        term = _make_term(mode, options)
        check_int("num_classes", num_classes, 2)
        alpha = _checked_alpha(alpha, term)
        _check_networks(student, teacher)
        teacher_file = None
        if teacher_checkpoint is not None:
            teacher_file = resolve_checkpoint(teacher_checkpoint, "`teacher_checkpoint`")
        if term is not None:
            term.attach(student, teacher, teacher_file)  # its cheap checks, before the load
        ignore = ["student", "teacher", "head", "optimizer", "scheduler"]
        self.save_hyperparameters(ignore=ignore + ([] if isinstance(mode, str) else ["mode"]))
        self.student, self.teacher = student, teacher
        # the file the teacher's weights came from (a folder resolved to its newest run's)
        self.teacher_file = None if teacher_file is None else str(teacher_file)
        if teacher_file is not None:
            load_teacher_weights(teacher, teacher_file)
        teacher.eval()
        teacher.requires_grad_(False)
        self.term, self.alpha, self.num_classes = term, float(alpha), num_classes
        self.mode = "none" if term is None else term.name
        for name, module in ({} if term is None else term.modules()).items():
            self.add_module(name, module)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_acc = Accuracy(num_classes, ignore_index=UNLABELED)
        self.val_acc = Accuracy(num_classes)
        self.test_acc = Accuracy(num_classes)

    @property
    def teacher_targets(self) -> TeacherTargets | None:
        """The NFKD term's teacher targets (its NFK, tables and scale); None in other modes."""
        return getattr(self.term, "teacher_targets", None)

    # -- the NFK protocol (the student's kernel) ------------------------------------------------
    def nfk_energy(self) -> Energy:
        return ClassifierEnergy(self.student)

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)

    @override
    def train(self, mode: bool = True) -> NFKDistillationModule:
        super().train(mode)
        self.teacher.eval()  # always: BatchNorm statistics and dropout of the teacher frozen
        return self

    @override
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> NFKDistillationModule:
        """Moves and conversions reach the teacher as moves only: the frozen teacher keeps
        its dtype (``precision="bf16-true"`` and ``.half()`` convert the student; a
        bfloat16 teacher would change the targets, up to 1.7% measured, and break the
        promise that its weights stay bit-identical)."""
        teacher = self._modules.get("teacher")
        if not recurse or teacher is None:
            return super()._apply(fn, recurse)
        self._modules["teacher"] = None  # skipped by nn.Module._apply; the key keeps its place
        try:
            super()._apply(fn, recurse)
        finally:
            self._modules["teacher"] = teacher

        def keep_dtype(t: Tensor) -> Tensor:
            target = fn(t.new_empty(0))  # where and as what fn would put t
            return fn(t) if target.dtype == t.dtype else t.to(device=target.device)

        teacher._apply(keep_dtype, recurse)
        return self

    # -- set-up: checks before anything expensive, then the term's own start -------------------
    @override
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(self.trainer, type(self).__name__)
        dm = self.trainer.datamodule
        dataset = getattr(dm, "dataset", None) if dm is not None else None
        train_set = dataset("train") if callable(dataset) else None
        if self.term is not None:
            self.term.setup(self, train_set)
        if train_set is not None:
            self._check_classes(train_set)

    def _check_classes(self, dataset: Any) -> None:
        item = dataset[0]
        x = first_tensor(item)[None].to(self.device)
        widths = {}
        # eval mode, the RNG and the train/eval flags restored: the check leaves no trace
        with kernel_mode(self.student, self.teacher), torch.no_grad():
            for who, net in (("student", self.student), ("teacher", self.teacher)):
                try:
                    widths[who] = teacher_logits(net, x).shape[-1]
                except Exception as e:  # a layer that cannot read these inputs
                    raise ValueError(
                        f"The {who} ({type(net).__name__}) cannot read the training data's "
                        f"inputs of shape {tuple(x.shape[1:])}: {describe_error(e)}. Build the "
                        f"{who} for this data (e.g. its input channels) or use a data module "
                        f"that matches it."
                    ) from e
        wrong = {who: w for who, w in widths.items() if w != self.num_classes}
        if wrong:
            raise ValueError(
                f"`num_classes` is {self.num_classes}, but the "
                + " and the ".join(f"{who} has {w} outputs" for who, w in wrong.items())
                + ": teacher and student must classify the same classes."
            )

    @override
    def on_fit_start(self) -> None:
        if self.term is not None:
            self.term.on_fit_start(self)

    @override
    def on_validation_start(self) -> None:
        if self.term is not None:
            self.term.on_validation_start(self)

    # -- steps -----------------------------------------------------------------------------------
    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.student.features(x)
        return features, self.student.fc(features)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        features, logits = self._forward(x)
        # the mean over the labelled examples (all of them but under train_split="semi");
        # a batch without labels contributes 0, not NaN; nothing is read on the host here
        labelled = (y != UNLABELED).sum().clamp_min(1)
        ce = F.cross_entropy(logits, y, ignore_index=UNLABELED, reduction="sum") / labelled
        self.log("train/ce", ce)
        loss = ce
        if self.term is not None:
            value, logs = self.term.loss(batch, features, logits)
            for name, logged in logs.items():
                self.log(f"train/{name}", logged)
            loss = self.alpha * ce + (1 - self.alpha) * value
        self.train_acc.update(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        features, logits = self._forward(x)
        self.val_acc.update(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)
        if self.term is not None:
            for name, metric in self.term.validation_metrics(batch, features, logits).items():
                self.log(name, metric)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self.student(x)
        self.test_acc.update(logits, y)
        self.log("test/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self):
        params = list(self.student.parameters())
        if self.term is not None:
            params += self.term.parameters()
        optimizer = self.optimizer(params)
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler(optimizer)}

    # -- checkpoints -----------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        key = None if self.term is None else self.term.checkpoint_key
        state = None if key is None else self.term.checkpoint_state()
        if state is not None:
            checkpoint[key] = state

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # resuming a fit only: `test`, `validate` and `load_from_checkpoint` evaluate the
        # student with the teacher it was trained against (the checkpoint's), even after the
        # teacher recipe was run again and `teacher_checkpoint` names a newer teacher
        fitting = self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING
        if fitting and self.teacher_file is not None:
            saved = checkpoint.get("state_dict", {})
            check_same_teacher(self.teacher, saved, "teacher.", self.teacher_file)
        key = None if self.term is None else self.term.checkpoint_key
        if key is not None:
            self.term.load_checkpoint_state(checkpoint.get(key))


def _checked_alpha(alpha: float | None, term: DistillationTerm | None) -> float:
    """``alpha``, or the term's default for None; in [0, 1], and 1 without a term."""
    if alpha is None:
        alpha = 1.0 if term is None else term.default_alpha
    if not (is_number(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"`alpha` must be a number in [0, 1], got {alpha!r}.")
    if term is None and alpha != 1.0:
        raise ValueError(f"`alpha` must be 1 (or None) for mode='none', got {alpha!r}.")
    return float(alpha)


def _check_networks(student: nn.Module, teacher: nn.Module) -> None:
    """Both networks are modules; the student has ``features`` and a linear ``fc``."""
    for name, net in (("student", student), ("teacher", teacher)):
        if not isinstance(net, nn.Module):
            raise TypeError(f"`{name}` must be an nn.Module, got {type(net).__name__}.")
    fc = getattr(student, "fc", None)
    if not (callable(getattr(student, "features", None)) and isinstance(fc, nn.Linear)):
        raise TypeError(
            f"`student` ({type(student).__name__}) must have a method `features(x) -> "
            "(B, d)` and a linear classifier `fc` applied to them, as WideResNet has."
        )


# The module's arguments that configure the short forms of the terms (mode="nfkd" | "kd").
_TERM_OPTIONS = {
    "k": ("nfkd", "k"),
    "teacher_loss": ("nfkd", "teacher_loss"),
    "target_scaling": ("nfkd", "target_scaling"),
    "head": ("nfkd", "head"),
    "targets": ("nfkd", "targets"),
    "n_iter": ("nfkd", "n_iter"),
    "oversample": ("nfkd", "oversample"),
    "nfk_seed": ("nfkd", "seed"),
    "nfk_batch_size": ("nfkd", "batch_size"),
    "chunk_size": ("nfkd", "chunk_size"),
    "nfk_cache": ("nfkd", "cache"),
    "temperature": ("kd", "temperature"),
}


def _make_term(mode: Mode | DistillationTerm, options: dict[str, Any]) -> DistillationTerm | None:
    """The term of ``mode``: a short form built from the module's arguments, or a term
    given as is (whose own arguments then apply: the short-form ones must stay unset)."""
    defaults = inspect.signature(NFKDistillationModule.__init__).parameters
    if isinstance(mode, DistillationTerm):
        given = [n for n, v in options.items() if v != defaults[n].default]
        if given:
            raise ValueError(
                f"`mode` is a {type(mode).__name__}: set {given} on the term itself (the "
                "module's arguments of the same names configure mode='nfkd' and 'kd' only)."
            )
        return mode
    check_choice("mode", mode, ("nfkd", "kd", "none"))
    if mode == "none":
        return None
    # every short form is built, so that a bad value is refused whichever mode is chosen
    terms = {
        name: cls(**{arg: options[n] for n, (m, arg) in _TERM_OPTIONS.items() if m == name})
        for name, cls in (("nfkd", NFKDTerm), ("kd", KDTerm))
    }
    return terms.get(mode)


__all__ = ["NFKDistillationModule", "load_teacher_weights"]
