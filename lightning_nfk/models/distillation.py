"""Knowledge distillation from a frozen teacher: NFKD (the teacher's low-rank NFK
embeddings as targets), Hinton's KD, and the student alone, in one LightningModule.

Zhang et al., ICLR 2022, Sec. 4.2 and Appendix D.2 (Eq. 16):

.. math::

    L(x, y) = \\alpha\\,\\mathrm{CE}(f_s(x), y) + (1 - \\alpha)\\,L_t(h_s(x), Q_t(x)),

with :math:`Q_t(x)` the teacher's k-dimensional NFK embedding and :math:`h_s` a head on
the student's penultimate features. See docs/design.md, section 8.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.regression import CosineSimilarity, R2Score
from typing_extensions import override

from lightning_nfk._io import check_torch_file, describe_error
from lightning_nfk.kernel import ClassifierEnergy, Energy, NFKConfig, check_int, kernel_mode
from lightning_nfk.kernel._data import first_tensor
from lightning_nfk.models.teacher_targets import (
    TeacherTargets,
    check_cache_path,
    data_fingerprint,
    fit_or_load,
)
from lightning_nfk.runs import resolve_checkpoint
from lightning_nfk.trainer_utils import check_strategy

Mode = Literal["nfkd", "kd", "none"]
_CHECKPOINT_KEY = "nfk_distillation_targets"


class NFKDistillationModule(pl.LightningModule):
    """Train ``student`` on labels and a frozen ``teacher``'s knowledge.

    Modes (the three columns of the paper's Table 3 under one schedule):

    * ``"nfkd"``: :math:`\\alpha\\,\\mathrm{CE} + (1 - \\alpha)\\,L_t(h_s(x), Q_t(x))`,
      :math:`Q_t(x) = e(x) = V_x P` the teacher's rank-``k`` NFK embedding (classifier
      energy, centred and normalised on the un-augmented training split); ``L_t`` the mean
      squared error (``"mse"``) or one minus the cosine similarity (``"cosine"``);
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
        mode: ``"nfkd"``, ``"kd"`` or ``"none"``.
        num_classes: number of classes.
        alpha: weight of the cross-entropy; default 0.5 for ``"nfkd"`` and 0.1 for
            ``"kd"`` (the KD repositories' 0.1 CE + 0.9 KD); 1 for ``"none"``.
        k: NFK components (the paper: 20).
        teacher_loss: ``"mse"`` or ``"cosine"``.
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
        optimizer: an optimizer factory, given the student's and the head's parameters.
        scheduler: an optional scheduler factory (stepped every epoch).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        teacher_checkpoint: str | None = None,
        mode: Mode = "nfkd",
        num_classes: int = 10,
        alpha: float | None = None,
        k: int = 20,
        teacher_loss: Literal["mse", "cosine"] = "mse",
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
        _check_choice("mode", mode, ("nfkd", "kd", "none"))
        _check_choice("teacher_loss", teacher_loss, ("mse", "cosine"))
        _check_choice("target_scaling", target_scaling, ("standardize", "raw"))
        _check_choice("targets", targets, ("precomputed", "online"))
        check_int("num_classes", num_classes, 2)
        check_int("nfk_batch_size", nfk_batch_size, 1)
        if alpha is None:
            alpha = {"nfkd": 0.5, "kd": 0.1, "none": 1.0}[mode]
        if not (_is_number(alpha) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"`alpha` must be a number in [0, 1], got {alpha!r}.")
        if mode == "none" and alpha != 1.0:
            raise ValueError(f"`alpha` must be 1 (or None) for mode='none', got {alpha!r}.")
        if not (_is_number(temperature) and 0 < temperature < math.inf):
            raise ValueError(
                f"`temperature` must be a positive finite number, got {temperature!r}."
            )
        for name, net in (("student", student), ("teacher", teacher)):
            if not isinstance(net, nn.Module):
                raise TypeError(f"`{name}` must be an nn.Module, got {type(net).__name__}.")
        fc = getattr(student, "fc", None)
        if not (callable(getattr(student, "features", None)) and isinstance(fc, nn.Linear)):
            raise TypeError(
                f"`student` ({type(student).__name__}) must have a method `features(x) -> "
                "(B, d)` and a linear classifier `fc` applied to them, as WideResNet has."
            )
        # validated here, before any data is read (k, n_iter, oversample, seed, chunk_size)
        self.nfk_config = NFKConfig(
            k=k, oversample=oversample, n_iter=n_iter, seed=nfk_seed, chunk_size=chunk_size
        )
        teacher_file = None
        if teacher_checkpoint is not None:
            teacher_file = resolve_checkpoint(teacher_checkpoint, "`teacher_checkpoint`")
        check_cache_path(nfk_cache, teacher_file)
        self.save_hyperparameters(ignore=["student", "teacher", "head", "optimizer", "scheduler"])
        self.student, self.teacher = student, teacher
        # the file the teacher's weights came from (a folder resolved to its newest run's)
        self.teacher_file = None if teacher_file is None else str(teacher_file)
        if teacher_file is not None:
            load_teacher_weights(teacher, teacher_file)
        teacher.eval()
        teacher.requires_grad_(False)
        self.mode, self.alpha, self.temperature = mode, float(alpha), float(temperature)
        self.teacher_loss, self.target_scaling, self.targets = teacher_loss, target_scaling, targets
        self.nfk_batch_size, self.nfk_cache = nfk_batch_size, nfk_cache
        self.num_classes = num_classes
        self.head = None
        if mode == "nfkd":
            if head is None:  # seeded aside: the global RNG stream is the same in every mode
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(nfk_seed)
                    head = nn.Linear(fc.in_features, k)
            self.head = head
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        if mode == "nfkd":
            self.val_r2 = R2Score(multioutput="variance_weighted")
            self.val_cos = CosineSimilarity(reduction="mean")
        self.teacher_targets = TeacherTargets(teacher, self.nfk_config)
        self._restored_tables: dict[str, Any] | None = None

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

    def _teacher_logits(self, x: Tensor) -> Tensor:
        """The teacher's logits of ``x`` (read in the teacher's dtype)."""
        return self.teacher(x.to(_floating_dtype(self.teacher, x.dtype)))

    # -- set-up: checks before anything expensive, then the teacher's NFK ----------------------
    @override
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(self.trainer, type(self).__name__)
        dm = self.trainer.datamodule
        dataset = getattr(dm, "dataset", None) if dm is not None else None
        if self.mode == "nfkd" and not callable(dataset):
            raise ValueError(
                "NFKDistillationModule(mode='nfkd') fits the teacher's NFK on the un-augmented "
                "training split: pass a data module with a `dataset(split)` method (the "
                "lightning_nfk.data modules have one) to `fit`, not bare loaders."
            )
        if callable(dataset):
            train_set = dataset("train")
            self._check_classes(train_set)
            if self.mode == "nfkd":
                self._check_fitting_set(train_set)
                if self.targets == "precomputed":
                    _check_index(train_set, "training")

    def _check_classes(self, dataset: Any) -> None:
        item = dataset[0]
        x = first_tensor(item)[None].to(self.device)
        widths = {}
        # eval mode, the RNG and the train/eval flags restored: the check leaves no trace
        with kernel_mode(self.student, self.teacher), torch.no_grad():
            for who, net in (("student", self.student), ("teacher", self.teacher)):
                try:
                    widths[who] = net(x.to(_floating_dtype(net, x.dtype))).shape[-1]
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

    def _check_fitting_set(self, dataset: Any) -> None:
        n = len(dataset)
        p = sum(q.numel() for q in self.teacher.parameters())
        self.nfk_config.check_columns(
            min(n, p),
            f"min(training examples, teacher parameters) = min({n}, {p})",
            "lower `k` or `oversample`, or train on more examples",
        )

    @override
    def on_fit_start(self) -> None:
        if self.mode != "nfkd":
            return
        self._fit_targets()
        # once: every step then indexes the tables with the batch's index where it is
        self.teacher_targets.to(self.device)

    @override
    def on_validation_start(self) -> None:
        if self.mode == "nfkd":  # `validate` after a restore: tables read onto the CPU
            self.teacher_targets.to(self.device)

    def _fit_targets(self) -> None:
        """Fit the teacher's NFK, or read it from ``nfk_cache``, unless the tables were
        restored from a checkpoint of the same training split."""
        dm = self.trainer.datamodule
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
        how = fit_or_load(
            self.teacher_targets,
            self.trainer,
            train_set,
            val_set,
            self.nfk_batch_size,
            self.nfk_cache,
            fingerprint,
        )
        if how == "fit":
            self.print(f"Teacher NFK fitted in {self.teacher_targets.seconds:.1f} s.")
        if self.targets == "precomputed":
            self.teacher_targets.release_components()  # only the tables are needed

    # -- steps -----------------------------------------------------------------------------------
    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.student.features(x)
        return features, self.student.fc(features)

    def _scaled_targets(self, batch: Any, table: Tensor | None) -> Tensor:
        """The batch's targets: looked up in ``table`` by index, or (``table`` None)
        computed from the batch's images. On the batch's device, without a host sync:
        the table and the scale are there already (``on_fit_start``)."""
        x = batch[0]
        tt = self.teacher_targets
        if table is None:
            q = tt.embed(x)
        elif len(batch) > 2:
            q = table[batch[2]]
        else:
            raise ValueError(
                "targets='precomputed' needs batches (x, y, index): set `with_index: true` "
                "on the data module."
            )
        q = q.to(x.device, torch.float32)
        if self.target_scaling == "standardize":
            assert tt.rms is not None
            q = q / tt.rms.clamp_min(torch.finfo(q.dtype).tiny)
        return q

    def _teacher_term(self, h: Tensor, q: Tensor) -> Tensor:
        if self.teacher_loss == "mse":
            return F.mse_loss(h, q)
        return (1 - F.cosine_similarity(h, q, dim=1)).mean()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        features, logits = self._forward(x)
        ce = F.cross_entropy(logits, y)
        self.log("train/ce", ce)
        loss = ce
        if self.mode == "kd":
            with torch.no_grad():
                teacher_logits = self._teacher_logits(x).to(logits.dtype)
            t = self.temperature
            kd = F.kl_div(
                F.log_softmax(logits / t, dim=1),
                F.log_softmax(teacher_logits / t, dim=1),
                log_target=True,
                reduction="batchmean",
            ) * (t * t)
            self.log("train/kd", kd)
            loss = self.alpha * ce + (1 - self.alpha) * kd
        elif self.mode == "nfkd":
            table = self.teacher_targets.train if self.targets == "precomputed" else None
            assert self.head is not None
            q = self._scaled_targets(batch, table)
            nfkd = self._teacher_term(self.head(features), q)
            self.log("train/nfkd", nfkd)
            loss = self.alpha * ce + (1 - self.alpha) * nfkd
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        features, logits = self._forward(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)
        if self.mode == "nfkd" and self.teacher_targets.is_ready:
            assert self.head is not None
            table = self.teacher_targets.val
            if self.targets == "precomputed" and (table is None or len(batch) < 3):
                return  # no validation targets (no val split at fit start, or no index)
            q = self._scaled_targets(batch, table if len(batch) > 2 else None)
            h = self.head(features)
            self.val_r2(h, q)
            self.val_cos(h, q)
            self.log("nfkd/target_r2", self.val_r2)
            self.log("nfkd/target_cos", self.val_cos)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self.student(x)
        self.test_acc(logits, y)
        self.log("test/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self):
        params = list(self.student.parameters())
        if self.head is not None:
            params += list(self.head.parameters())
        optimizer = self.optimizer(params)
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler(optimizer)}

    # -- checkpoints -----------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.mode == "nfkd" and self.targets == "precomputed" and self.teacher_targets.is_ready:
            checkpoint[_CHECKPOINT_KEY] = self.teacher_targets.tables()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # resuming a fit only: `test`, `validate` and `load_from_checkpoint` evaluate the
        # student with the teacher it was trained against (the checkpoint's), even after the
        # teacher recipe was run again and `teacher_checkpoint` names a newer teacher
        fitting = self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING
        if fitting and self.teacher_file is not None:
            self._check_same_teacher(checkpoint.get("state_dict", {}))
        self._restored_tables = checkpoint.get(_CHECKPOINT_KEY)
        if self._restored_tables is not None:
            self.teacher_targets.load_tables(self._restored_tables)

    def _check_same_teacher(self, state: dict[str, Tensor]) -> None:
        """Refuse a checkpoint whose teacher differs from the one ``teacher_checkpoint``
        loaded: the checkpoint's weights would silently replace it, and the student was
        trained against the other teacher."""
        differ = [
            name
            for name, t in self.teacher.state_dict().items()
            if f"teacher.{name}" in state
            and not (
                state[f"teacher.{name}"].shape == t.shape
                and torch.equal(state[f"teacher.{name}"].to(t.device, t.dtype), t)
            )
        ]
        if differ:
            raise ValueError(
                f"The checkpoint was trained with another teacher than `teacher_checkpoint` "
                f"({self.teacher_file!r}): {len(differ)} of its tensors differ (e.g. "
                f"{differ[0]!r}). Resume with the teacher_checkpoint of the run that wrote it, "
                "or start a new run (without --ckpt_path) to distil from this teacher."
            )


def _is_number(value: object) -> bool:
    """A real number (int or float), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _floating_dtype(net: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype of ``net``'s first floating-point parameter (``default`` without one)."""
    return next((p.dtype for p in net.parameters() if p.is_floating_point()), default)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


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


def load_teacher_weights(teacher: nn.Module, path: str | Path) -> None:
    """Load ``path`` into ``teacher``: a Lightning checkpoint (its ``state_dict``) whose keys
    are the teacher's under a prefix (``net.`` for ClassifierModule), or a plain state dict.

    Raises:
        FileNotFoundError: no such file.
        ValueError: keys that do not match the teacher, or other shapes (e.g. another
            number of classes), naming them.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"`teacher_checkpoint` {str(path)!r} does not exist.")
    check_torch_file(path, "`teacher_checkpoint`")  # empty, or records failing their CRC
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or pickled objects beyond weights
        raise ValueError(
            f"`teacher_checkpoint` {str(path)!r} cannot be read as a torch checkpoint "
            f"({describe_error(e)})."
        ) from e
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"`teacher_checkpoint` {str(path)!r} holds no state dict.")
    wanted = teacher.state_dict()
    prefixes = sorted(
        {key[: len(key) - len(w)] for key in state for w in wanted if key.endswith(w)}
    )
    exact = []
    for prefix in [""] + [p for p in prefixes if p]:
        candidate = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if set(candidate) == set(wanted):
            exact.append((prefix, candidate))
    if len(exact) > 1:
        raise ValueError(
            f"`teacher_checkpoint` {str(path)!r} holds several networks with the teacher's "
            f"keys (prefixes {[p for p, _ in exact]}); save the teacher alone (its "
            "`state_dict()`) and pass that file."
        )
    if not exact:
        raise ValueError(
            f"`teacher_checkpoint` {str(path)!r} does not hold the teacher's weights: none of "
            f"its key prefixes {prefixes or ['']} gives exactly the keys of "
            f"{type(teacher).__name__} (e.g. {next(iter(wanted))!r})."
        )
    candidate = exact[0][1]
    shapes = [
        f"{k}: {tuple(v.shape)} in the file, {tuple(wanted[k].shape)} in the teacher"
        for k, v in candidate.items()
        if v.shape != wanted[k].shape
    ]
    if shapes:
        raise ValueError(
            f"`teacher_checkpoint` {str(path)!r} does not fit the teacher (another number of "
            f"classes or another architecture?): {'; '.join(shapes[:3])}."
        )
    bad = [k for k, v in candidate.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise ValueError(
            f"`teacher_checkpoint` {str(path)!r} holds non-finite values in {len(bad)} "
            f"tensors (e.g. {bad[0]!r}): a diverged teacher cannot give targets."
        )
    teacher.load_state_dict(candidate)
