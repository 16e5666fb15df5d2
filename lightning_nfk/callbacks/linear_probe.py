"""LinearProbeCallback: how good a model's representation is, as a linear probe.

The paper's protocol (Zhang et al., ICLR 2022, Section 5): a linear classifier on frozen
features (NFK embeddings, a layer's activations, or any callable), also with few labels
(500/1000/2000/4000 in the semi-supervised tables).
"""

from __future__ import annotations

from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_nfk.callbacks.nfk_spectrum import NFKSpectrumCallback
from lightning_nfk.callbacks.probe_features import (
    FeatureFn,
    check_features_before_training,
    check_gathered,
    extract_features,
    feature_fn,
    features_name,
    gather_features,
)
from lightning_nfk.kernel import (
    DEFAULT_L2_GRID,
    LowRankNFK,
    NFKConfig,
    Reduce,
    Scaling,
    check_scaling,
    gather_rows,
    kernel_mode,
    select_and_fit,
)
from lightning_nfk.kernel.config import check_int
from lightning_nfk.protocol import nfk_energy_of
from lightning_nfk.trainer_utils import (
    check_items,
    check_strategy,
    deferred_interrupts,
    local_shard,
    migrate_state_key,
    reference_dataset,
    rng_devices,
    seeded_subset,
    stack_items,
    strategy_sum,
)

# Above 400 lines for a reason: the class docstring, the user's reference for the features,
# checks and logged figures, is about 65 of them.

NFKSource = Literal["own", "spectrum"]


class LinearProbeCallback(Callback):
    """Every ``every_n_epochs`` epochs, fit a multinomial logistic regression on frozen
    features of labelled training examples and log its validation accuracy.

    Features (``features``):

    * ``"nfk"``: NFK embeddings :math:`e(x) = V_x P`, from this callback's own
      :class:`LowRankNFK` fit (``k``, ``oversample``, ``n_iter``, ``seed``) on
      ``nfk_fit_size`` labelled training examples (``nfk_source="own"``, the default), or,
      with ``nfk_source="spectrum"``, from the fit the trainer's
      :class:`NFKSpectrumCallback` made at the same epoch end (its settings and probe set;
      the probe's own NFK settings are then unused). Sharing saves a fit per probe; it is
      checked at ``setup``: exactly one spectrum callback, listed before this one, fitting
      at every epoch this callback probes. ``probe/nfk_k`` and ``probe/shared_fit`` log
      which fit was used;
    * the name of a submodule of the LightningModule (e.g. ``"net.classifier.4"``): its
      flattened output activations, in eval mode, read with a forward hook while the
      module runs ``pl_module.probe_forward(x)`` when it defines that method, else
      ``pl_module(x)``. A module whose ``forward`` does not read data examples defines
      ``probe_forward`` (:class:`~lightning_nfk.models.GANModule`: ``forward`` maps
      latents to images, ``probe_forward`` runs the discriminator). The layer must run
      exactly once per forward and output a tensor; for a layer that runs several times
      or outputs a tuple, pass a callable;
    * a callable ``f(pl_module, x) -> (B, d)`` (or ``(B, ...)``, flattened) floating-point
      features, run without gradients in eval mode.

    Layer and callable features see inputs in the module's dtype (bfloat16 under
    ``precision="bf16-true"``) and on its device.

    Checks, before any training step where the input allows: the labelled training and the
    validation selections must each hold at least two classes (at ``setup``, or at train
    start for loaders passed to ``fit``); layer and callable features are run once on two
    validation examples (at fit start, or at train start for loaders passed to ``fit``; in
    eval mode, without gradients, the RNG and train/eval flags restored) and must give a
    floating-point tensor with one row per example and finite values. At every probe the
    gathered features are checked again (finite, one row per example, the same width in
    both splits): every rank holds the same gathered features and raises the same error.

    The probe: centred features scaled as ``scaling`` says (standardised by default),
    full-batch L-BFGS in float64, L2 strength chosen from ``l2_grid`` on a seeded held-out
    20% of the labelled examples, then refitted on all of them. Training examples: up to ``max_train`` (seeded) from the data module's
    label budget (``num_labels``) when it has one, else from the training split;
    evaluation: the validation split (up to ``max_val``). Under DDP each rank extracts the
    features of its own shard; they are gathered, and every rank fits the same probe.

    Logs ``probe/acc`` (validation accuracy), ``probe/train_acc`` and ``probe/l2``; with
    ``features="nfk"`` also ``probe/nfk_k`` (components) and ``probe/shared_fit`` (1 when
    the spectrum callback's fit was used).

    The callback never changes the training it observes: its forwards run in eval mode
    without gradients, and the global RNG (CPU and the module's CUDA devices), the
    train/eval flags and the optimizer are left as they were.

    Args:
        features: ``"nfk"``, a submodule name or a callable (see above).
        every_n_epochs: run after every n-th training epoch.
        max_train, max_val: caps on the examples used.
        l2_grid: candidate L2 strengths.
        k, oversample, n_iter, nfk_fit_size: this callback's own NFK fit when needed.
        batch_size: feature extraction batch size.
        seed: seed of the subsets and of the hold-out split.
        scaling: how features are scaled before the probe: ``"standardize"`` (each to unit
            variance, the usual protocol) or ``"global"`` (one scale for all, keeping NFK
            components weighted by their singular values); see
            :mod:`lightning_nfk.kernel.linear_probe`.
        nfk_source: ``"own"`` (this callback's fit) or ``"spectrum"`` (the
            :class:`NFKSpectrumCallback`'s fit of the same epoch); ``features="nfk"`` only.
    """

    def __init__(
        self,
        features: str | FeatureFn = "nfk",
        every_n_epochs: int = 1,
        max_train: int = 10000,
        max_val: int = 10000,
        l2_grid: tuple[float, ...] = DEFAULT_L2_GRID,
        k: int = 32,
        oversample: int = 10,
        n_iter: int = 4,
        nfk_fit_size: int = 1024,
        batch_size: int = 256,
        seed: int = 0,
        scaling: Scaling = "standardize",
        nfk_source: NFKSource = "own",
    ) -> None:
        super().__init__()
        check_scaling(scaling)
        if nfk_source not in ("own", "spectrum"):
            raise ValueError(f"`nfk_source` must be 'own' or 'spectrum', got {nfk_source!r}.")
        if nfk_source == "spectrum" and features != "nfk":
            raise ValueError(
                f"`nfk_source`='spectrum' shares an NFK fit: it needs `features`='nfk', got "
                f"{features!r}. Cure: drop `nfk_source` or set `features`='nfk'."
            )
        if not (callable(features) or isinstance(features, str)):
            raise TypeError(
                f"`features` must be 'nfk', a submodule name or a callable, got {type(features).__name__}."
            )
        for name, value in (
            ("every_n_epochs", every_n_epochs),
            ("max_train", max_train),
            ("max_val", max_val),
            ("nfk_fit_size", nfk_fit_size),
            ("batch_size", batch_size),
        ):
            check_int(name, value, 1)
        self.config = NFKConfig(k=k, oversample=oversample, n_iter=n_iter, seed=seed)
        if features == "nfk" and nfk_source == "own":
            self.config.check_columns(
                nfk_fit_size,
                f"`nfk_fit_size` ({nfk_fit_size}), the examples of this callback's own NFK fit",
                "raise `nfk_fit_size`, or lower `k` or `oversample`",
            )
        if not l2_grid or any(not (v >= 0) for v in l2_grid):
            raise ValueError(
                f"`l2_grid` must be a non-empty sequence of numbers >= 0, got {l2_grid!r}."
            )
        self.features = features
        self.every_n_epochs = every_n_epochs
        self.max_train, self.max_val = max_train, max_val
        self.l2_grid = tuple(float(v) for v in l2_grid)
        self.nfk_fit_size = nfk_fit_size
        self.batch_size = batch_size
        self.seed = seed
        self.scaling = scaling
        self.nfk_source = nfk_source
        self._spectrum: NFKSpectrumCallback | None = None  # the shared fit's owner
        self.history: list[dict[str, float]] = []
        self._cache: dict[str, tuple[Tensor, Tensor, int, int]] = {}

    def _key_features(self) -> str:
        if isinstance(self.features, str):
            return self.features
        return getattr(self.features, "__name__", "callable")

    @property
    def state_key(self) -> str:
        # every setting that makes two probes' histories differ: two probes in one trainer
        # keep their own states in a checkpoint
        return self._generate_state_key(
            features=self._key_features(),
            every_n_epochs=self.every_n_epochs,
            max_train=self.max_train,
            max_val=self.max_val,
            k=self.config.k,
            oversample=self.config.oversample,
            n_iter=self.config.n_iter,
            nfk_fit_size=self.nfk_fit_size,
            seed=self.seed,
            scaling=self.scaling,
            nfk_source=self.nfk_source,
        )

    def _legacy_key(self) -> str:
        """The state key before the settings were added to it (checkpoints of 0.1.0.dev0
        written before this change), read by :meth:`on_load_checkpoint`."""
        return self._generate_state_key(features=self._key_features(), max_train=self.max_train)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.features == "nfk":
            nfk_energy_of(pl_module)
            check_strategy(trainer, type(self).__name__)
            if self.nfk_source == "spectrum":
                self._spectrum = self._shared_spectrum(trainer)
        elif isinstance(self.features, str):
            names = dict(pl_module.named_modules())
            if self.features not in names:
                some = [n for n in names if n][:12]
                raise ValueError(
                    f"`features` ({self.features!r}) is neither 'nfk' nor a submodule of "
                    f"{type(pl_module).__name__}; submodules include {some}."
                )
        if stage == "fit" and trainer.datamodule is not None:
            self._check_splits(trainer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the strategy's setup (the module on its device and in its precision, e.g.
        # bfloat16 under `bf16-true`), before the sanity check and any training step
        if trainer.datamodule is not None:
            self._check_features(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.datamodule is None:  # loaders passed to fit() exist only now
            self._check_splits(trainer)
            self._check_features(trainer, pl_module)

    def _shared_spectrum(self, trainer: pl.Trainer) -> NFKSpectrumCallback:
        """The one spectrum callback whose fits this probe shares, after checking that it
        fits at every epoch end this probe runs, before this probe."""
        found = [
            (i, cb) for i, cb in enumerate(trainer.callbacks) if isinstance(cb, NFKSpectrumCallback)
        ]
        if len(found) != 1:
            raise ValueError(
                f"`nfk_source`='spectrum' needs exactly one NFKSpectrumCallback in the "
                f"trainer's callbacks, found {len(found)}. Cure: add one (or keep one), or use "
                "`nfk_source`='own'."
            )
        (at, spectrum), mine = found[0], trainer.callbacks.index(self)
        if at > mine:
            raise ValueError(
                "`nfk_source`='spectrum' reads the fit NFKSpectrumCallback makes at the same "
                "epoch end, so it must run first: it is listed after LinearProbeCallback "
                f"(positions {at} and {mine}). Cure: list NFKSpectrumCallback first."
            )
        if spectrum.every_n_epochs is None:
            raise ValueError(
                "`nfk_source`='spectrum' needs NFKSpectrumCallback to fit at epoch ends on a "
                f"linear schedule; it fits {spectrum.schedule.describe()}. Cure: give it "
                "`every_n_epochs` (and `schedule`='linear'), or use `nfk_source`='own'."
            )
        if self.every_n_epochs % spectrum.every_n_epochs:
            raise ValueError(
                f"`nfk_source`='spectrum': LinearProbeCallback `every_n_epochs` "
                f"({self.every_n_epochs}) must be a multiple of NFKSpectrumCallback's "
                f"({spectrum.every_n_epochs}), so that every probe has that epoch's fit. "
                "Cure: align the two, or use `nfk_source`='own'."
            )
        return spectrum

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        migrate_state_key(checkpoint, self.state_key, self._legacy_key())

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        with deferred_interrupts(trainer):  # Ctrl-C / SIGTERM: every rank stops together
            self._run_probe(trainer, pl_module)

    # -- data -----------------------------------------------------------------------------------
    def _check_splits(self, trainer: pl.Trainer) -> None:
        for split, name in (("labeled", "labelled training"), ("val", "validation")):
            check_items(reference_dataset(trainer, split), labels=True, where=f"{name} dataset")
        for split, name in (("labeled", "labelled training"), ("val", "validation")):
            self._check_classes(reference_dataset(trainer, split), split, name)
        n_fit = min(self.nfk_fit_size, self.max_train, len(reference_dataset(trainer, "labeled")))
        if self.features == "nfk" and self.nfk_source == "own":
            self.config.check_columns(
                n_fit,
                "the examples of the probe's own NFK fit: min(`nfk_fit_size`, `max_train`, "
                f"labelled training examples) = {n_fit}",
            )

    def _selection(self, dataset: Any, which: str) -> Tensor:
        """The seeded, capped indices of the labelled-train or validation examples used."""
        cap = self.max_train if which == "labeled" else self.max_val
        return seeded_subset(len(dataset), cap, self.seed + (which == "val"))

    def _check_classes(self, dataset: Any, which: str, name: str) -> None:
        """At least two classes in the selection: one class gives an accuracy of 1.0 that
        says nothing. Each rank reads the labels itself (no collective), in a fixed shuffled
        order (datasets sorted by class, such as image folders, meet a second class early)
        up to the second class it meets."""
        indices = self._selection(dataset, which)
        cpu = torch.Generator(device="cpu").manual_seed(0)
        order = torch.randperm(len(indices), generator=cpu, device="cpu")
        first = None
        for i in indices[order].tolist():
            label = int(dataset[i][1])
            if first is None:
                first = label
            elif label != first:
                return
        cap = "max_train" if which == "labeled" else "max_val"
        budget = " (with a label budget, `num_labels` >= 2)" if which == "labeled" else ""
        raise ValueError(
            f"The linear probe needs at least two classes in both splits: the {name} "
            f"selection ({len(indices)} examples, `{cap}`={getattr(self, cap)}) holds only "
            f"class {first}. Cure: give the probe labelled {name} data with two classes or "
            f"more{budget}, or raise `{cap}` if the selection is too small to hold them."
        )

    def _split(self, trainer: pl.Trainer, which: str) -> tuple[Tensor, Tensor, int, int]:
        """This rank's shard (x, y) of the (seeded, capped) labelled-train or validation
        examples, the shard's first position in the whole selection, and its size."""
        if which not in self._cache:
            dataset = reference_dataset(trainer, which)
            indices = self._selection(dataset, which)
            local, lo = local_shard(trainer, indices)
            x, y = stack_items(dataset, local, labels=True)
            assert y is not None
            self._cache[which] = (x, y, lo, len(indices))
        return self._cache[which]

    # -- features ------------------------------------------------------------------------------
    def _name(self) -> str:
        return features_name(self.features)

    def _nfk(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, reduce: Reduce
    ) -> LowRankNFK:
        if self.nfk_source == "spectrum":
            spectrum = self._spectrum
            assert spectrum is not None  # set at setup
            if spectrum.nfk is None or not spectrum.history:
                raise RuntimeError("NFKSpectrumCallback made no fit this epoch (see setup).")
            if spectrum.history[-1]["epoch"] != trainer.current_epoch:
                raise RuntimeError(
                    f"NFKSpectrumCallback's last fit is of epoch {spectrum.history[-1]['epoch']}, "
                    f"not {trainer.current_epoch} (see setup)."
                )
            return spectrum.nfk
        # nfk_fit_size seeded positions of the whole selection (the same set for any
        # number of processes); each rank fits those inside its shard
        x, _, lo, total = self._split(trainer, "labeled")
        pos = seeded_subset(total, self.nfk_fit_size, self.seed + 2)
        x_fit = x[pos[(pos >= lo) & (pos < lo + len(x))] - lo]
        nfk = LowRankNFK(nfk_energy_of(pl_module), self.config, reduce=reduce)
        return nfk.fit(x_fit.to(pl_module.device))

    def _check_features(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run a layer's or a callable's features once on the first two examples of the
        validation selection and refuse what the probe could not use, before training.

        Every rank runs the same examples through the same module (no collective), so every
        rank decides the same. Eval mode, no gradients; the RNG streams and the train/eval
        flags are restored (:func:`kernel_mode`), so the training is the same without it.
        """
        if self.features == "nfk":  # the NFK's embeddings need a fit: checked when gathered
            return
        dataset = reference_dataset(trainer, "val")
        x, _ = stack_items(dataset, self._selection(dataset, "val")[:2])
        check_features_before_training(self.features, pl_module, x)

    def _run_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reduce = strategy_sum(trainer)
        device = pl_module.device
        with torch.random.fork_rng(devices=rng_devices(pl_module)), torch.no_grad():
            x_tr, y_tr, _, _ = self._split(trainer, "labeled")
            x_va, y_va, _, _ = self._split(trainer, "val")
            nfk = self._nfk(trainer, pl_module, reduce) if self.features == "nfk" else None
            fn = nfk.transform if nfk is not None else feature_fn(self.features, pl_module)
            args = (self.features, pl_module, fn, trainer.current_epoch, self.batch_size)
            with kernel_mode(pl_module):
                f_tr, problem_tr = extract_features(*args, x_tr)
                f_va, problem_va = extract_features(*args, x_va)
            # every rank's rows, in selection order (every rank raises together if any
            # rank's features failed their checks); labels travel as float64
            f_tr = gather_features(self._name(), f_tr.to(device), problem_tr, reduce, device)
            f_va = gather_features(self._name(), f_va.to(device), problem_va, reduce, device)
            y_tr = gather_rows(y_tr.double().to(device), reduce).long()
            y_va = gather_rows(y_va.double().to(device), reduce).long()
            check_gathered(
                self._name(),
                trainer.current_epoch,
                {"labelled training": (f_tr, y_tr), "validation": (f_va, y_va)},
            )
            num_classes = int(max(y_tr.max(), y_va.max()).item()) + 1
            probe = select_and_fit(
                f_tr.cpu(),
                y_tr.cpu(),
                num_classes,
                self.l2_grid,
                seed=self.seed,
                scaling=self.scaling,
            )
        metrics = {
            "probe/acc": probe.accuracy(f_va.cpu(), y_va.cpu()),
            "probe/train_acc": probe.accuracy(f_tr.cpu(), y_tr.cpu()),
            "probe/l2": probe.l2,
        }
        if nfk is not None:  # which fit the embeddings came from
            metrics["probe/nfk_k"] = float(nfk.config.k)
            metrics["probe/shared_fit"] = float(self.nfk_source == "spectrum")
        for name, value in metrics.items():
            pl_module.log(
                name, value, on_step=False, on_epoch=True, sync_dist=trainer.world_size > 1
            )
        self.history.append({"epoch": trainer.current_epoch, **metrics})

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = {}  # extracted examples: a cache, rebuilt on demand
        return state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
