"""LinearProbeCallback: how good a model's representation is, as a linear probe.

The paper's protocol (Zhang et al., ICLR 2022, Section 5): a linear classifier on frozen
features (NFK embeddings, a layer's activations, or any callable), also with few labels
(500/1000/2000/4000 in the semi-supervised tables).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_nfk.callbacks.nfk_spectrum import NFKSpectrumCallback
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
from lightning_nfk.kernel._data import parameter_dtype
from lightning_nfk.kernel.config import check_int
from lightning_nfk.kernel.distributed import rank_and_world_size
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

FeatureFn = Callable[[pl.LightningModule, Tensor], Tensor]
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

    @property
    def state_key(self) -> str:
        name = (
            self.features
            if isinstance(self.features, str)
            else getattr(self.features, "__name__", "callable")
        )
        # every setting that makes two probes' histories differ: two probes in one trainer
        # keep their own states in a checkpoint
        return self._generate_state_key(
            features=name,
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
        name = (
            self.features
            if isinstance(self.features, str)
            else getattr(self.features, "__name__", "callable")
        )
        return self._generate_state_key(features=name, max_train=self.max_train)

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
        """``features`` as messages show it: ``'net.4'`` or ``callable f``."""
        if isinstance(self.features, str):
            return repr(self.features)
        return f"callable {getattr(self.features, '__name__', type(self.features).__name__)}"

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
        fn = self._feature_fn(pl_module)
        seen = f"{len(x)} validation examples before training"
        with kernel_mode(pl_module):
            try:
                raw = fn(_to(x, pl_module.device, parameter_dtype(pl_module)))
            except Exception as err:
                if hasattr(err, "add_note"):  # Python >= 3.11
                    err.add_note(
                        f"LinearProbeCallback: raised while running `features` ({self._name()}) "
                        f"on {seen}. Layer features run {_forward_name(pl_module)}(x) on data "
                        "examples; a module whose `forward` does not read them defines "
                        "`probe_forward(x)`."
                    )
                raise
        f, problem = self._checked(pl_module, raw, len(x), seen)
        if problem is not None:
            raise problem
        assert f is not None
        message = _non_finite({"": f.double()})
        if message:
            raise ValueError(
                f"`features` ({self._name()}) must give finite values; on {seen}: {message}. "
                f"Cure: {_FINITE_CURE}"
            )

    def _checked(
        self, pl_module: pl.LightningModule, raw: Any, rows: int, seen: str
    ) -> tuple[Tensor | None, TypeError | ValueError | None]:
        """The ``(rows, d)`` features of one batch's raw output (the hook's outputs for a
        layer), or what is wrong with it, as the error to raise (on every rank)."""
        name = self._name()
        layer = isinstance(self.features, str) and self.features != "nfk"
        if layer:
            fwd = _forward_name(pl_module)
            if len(raw) != 1:
                cure = (
                    f"pick a layer that {fwd} runs; if `forward` does not read data examples, "
                    f"define `probe_forward(x)` on {type(pl_module).__name__} to run the part "
                    "that does."
                    if not raw
                    else "pass a callable `features=f(pl_module, x) -> (B, d)` that returns the "
                    "activations you mean."
                )
                return None, ValueError(
                    f"`features` ({name}) must name a layer that {fwd} runs once; it ran "
                    f"{len(raw)} times on {seen}. Cure: {cure}"
                )
            raw = raw[0]
        if not isinstance(raw, Tensor):
            got = type(raw).__name__
            if isinstance(raw, (tuple, list, dict)):
                got += f" of {len(raw)} items"
            cure = (
                "pass a callable `features=f(pl_module, x) -> (B, d)` that picks the tensor."
                if layer
                else "return a Tensor (B, d) (e.g. `torch.stack` or `torch.cat` the parts)."
            )
            return None, TypeError(
                f"`features` ({name}) must output a Tensor, got {got}. Cure: {cure}"
            )
        if not raw.is_floating_point():
            return None, TypeError(
                f"`features` ({name}) must give floating-point values, got {raw.dtype} (shape "
                f"{tuple(raw.shape)}). Cure: "
                + (
                    "pick a layer with floating-point output, or pass a callable."
                    if layer
                    else "return floating-point features (e.g. `.float()`)."
                )
            )
        if raw.ndim < 2 or raw.shape[0] != rows or raw[0].numel() == 0:
            if raw.ndim < 2:
                cure = "keep a feature dimension (one feature per example: `f[:, None]`)."
            elif raw.shape[0] != rows:
                cure = "keep the batch dimension: do not reduce, index or reshape across examples."
            else:
                cure = "give at least one feature per example."
            return None, ValueError(
                f"`features` ({name}) must give (B, d) or (B, ...) features, one row per "
                f"example; got shape {tuple(raw.shape)} for {rows} examples. Cure: {cure}"
            )
        return raw.detach().flatten(1), None

    def _extract(
        self, pl_module: pl.LightningModule, x: Tensor, fn: Callable[[Tensor], Any], epoch: int
    ) -> tuple[Tensor, Exception | None]:
        """This rank's float64 features of ``x``, or what is wrong with them (an error that
        :func:`_gather_features` raises on every rank)."""
        # Forward-only features (a layer, a callable) see inputs in the module's dtype
        # (bfloat16 under `bf16-true`); the NFK casts to its own float32/64 working dtype.
        dtype = None if self.features == "nfk" else parameter_dtype(pl_module)
        empty = torch.zeros(0, 0, dtype=torch.float64, device=pl_module.device)
        parts: list[Tensor] = []
        for xb in x.split(self.batch_size):
            seen = f"a batch of {len(xb)} examples at epoch {epoch}"
            try:  # an error of this rank's shard: raised on every rank (_gather_features)
                raw = fn(_to(xb, pl_module.device, dtype))
            except Exception as err:
                return empty, err
            f, problem = self._checked(pl_module, raw, len(xb), seen)
            if problem is None and parts and f.shape[1] != parts[0].shape[1]:
                problem = ValueError(
                    f"`features` ({self._name()}) must give the same number of features for "
                    f"every example; got {parts[0].shape[1]} and then {f.shape[1]} at epoch "
                    f"{epoch}. Cure: make the feature width independent of the batch."
                )
            if problem is not None:
                return empty, problem
            parts.append(f.double())
        return (torch.cat(parts) if parts else empty), None

    def _feature_fn(self, pl_module: pl.LightningModule) -> Callable[[Tensor], Any]:
        """The raw features of a batch for layer or callable ``features``: the callable's
        output, or the list of the layer's outputs during one forward (checked by
        :meth:`_checked`)."""
        if callable(self.features):
            fn = self.features

            def user_features(xb: Tensor) -> Any:
                with torch.no_grad():  # kernel_mode turns gradients on for the NFK only
                    return fn(pl_module, xb)

            return user_features
        layer = dict(pl_module.named_modules())[self.features]
        forward = _probe_forward(pl_module)

        def activations(xb: Tensor) -> list[Any]:
            with torch.no_grad():
                return layer_outputs(layer, lambda: forward(xb))

        return activations

    def _run_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reduce = strategy_sum(trainer)
        device = pl_module.device
        with torch.random.fork_rng(devices=rng_devices(pl_module)), torch.no_grad():
            x_tr, y_tr, _, _ = self._split(trainer, "labeled")
            x_va, y_va, _, _ = self._split(trainer, "val")
            nfk = self._nfk(trainer, pl_module, reduce) if self.features == "nfk" else None
            fn = nfk.transform if nfk is not None else self._feature_fn(pl_module)
            with kernel_mode(pl_module):
                f_tr, problem_tr = self._extract(pl_module, x_tr, fn, trainer.current_epoch)
                f_va, problem_va = self._extract(pl_module, x_va, fn, trainer.current_epoch)
            # every rank's rows, in selection order (every rank raises together if any
            # rank's features failed their checks); labels travel as float64
            f_tr = _gather_features(self._name(), f_tr.to(device), problem_tr, reduce, device)
            f_va = _gather_features(self._name(), f_va.to(device), problem_va, reduce, device)
            y_tr = gather_rows(y_tr.double().to(device), reduce).long()
            y_va = gather_rows(y_va.double().to(device), reduce).long()
            _check_gathered(
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


def _to(x: Tensor, device: torch.device, dtype: torch.dtype | None) -> Tensor:
    """``x`` on ``device``; floating inputs cast to ``dtype`` when given."""
    if dtype is None or not x.is_floating_point():
        return x.to(device)
    return x.to(device=device, dtype=dtype)


_FINITE_CURE = (
    "pick a layer or callable whose output is finite on these examples, and check the model: "
    "NaN or inf weights or activations mean the training has diverged (lower the learning "
    "rate; check the loss and the input normalisation)."
)


def layer_outputs(layer: torch.nn.Module, run: Callable[[], Any]) -> list[Any]:
    """Every output of ``layer`` while ``run()`` executes, in call order (a forward hook,
    removed afterwards); one item per call of the layer."""
    out: list[Any] = []
    handle = layer.register_forward_hook(lambda m, i, o: out.append(o))
    try:
        run()
    finally:
        handle.remove()
    return out


def _probe_forward(pl_module: pl.LightningModule) -> Callable[[Tensor], Any]:
    """What layer features run on data examples: ``pl_module.probe_forward`` when the module
    defines it (its ``forward`` does not read data examples, e.g. a GAN's generator), else
    the module itself."""
    probe_forward = getattr(pl_module, "probe_forward", None)
    return probe_forward if callable(probe_forward) else pl_module


def _forward_name(pl_module: pl.LightningModule) -> str:
    method = "probe_forward" if callable(getattr(pl_module, "probe_forward", None)) else "forward"
    return f"{type(pl_module).__name__}.{method}"


def _non_finite(splits: dict[str, Tensor]) -> str:
    """What is non-finite in each (rows, d) split, as ``"<split> split: r of R rows and c of
    C columns (n NaN, m inf)"`` joined by ``"; "``; empty when all is finite."""
    parts = []
    for split, f in splits.items():
        bad = ~torch.isfinite(f)
        if not bool(bad.any()):
            continue
        nan = int(torch.isnan(f).sum())
        seen = (
            f"{int(bad.any(1).sum())} of {f.shape[0]} rows and {int(bad.any(0).sum())} of "
            f"{f.shape[1]} columns ({nan} NaN, {int(bad.sum()) - nan} inf)"
        )
        parts.append(f"{split} split: {seen}" if split else seen)
    return "; ".join(parts)


def _check_gathered(name: str, epoch: int, splits: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Refuse gathered features (``features`` shown as ``name``) the probe cannot fit: not
    (rows, d), not one row per label, different widths in the splits, non-finite values.
    Every rank holds the same gathered features, so every rank raises the same error."""
    for split, (f, y) in splits.items():
        if f.ndim != 2:
            raise ValueError(
                f"`features` ({name}) must give (B, d) features; the gathered {split} features "
                f"at epoch {epoch} have shape {tuple(f.shape)}. Cure: return one row of "
                "features per example."
            )
        if f.shape[0] != y.shape[0]:
            raise ValueError(
                f"`features` ({name}) must give one row per example; the gathered {split} "
                f"features at epoch {epoch} have {f.shape[0]} rows for {y.shape[0]} examples. "
                "Cure: return one row of features per example."
            )
    widths = {split: f.shape[1] for split, (f, _) in splits.items()}
    if len(set(widths.values())) > 1:
        raise ValueError(
            f"`features` ({name}) must give the same width in both splits; got "
            f"{' and '.join(str(w) for w in widths.values())} features per example "
            f"({', '.join(widths)}) at epoch {epoch}. Cure: make the feature width "
            "independent of the input (e.g. inputs of one size)."
        )
    message = _non_finite({split: f for split, (f, _) in splits.items()})
    if message:
        raise ValueError(
            f"`features` ({name}) must give finite values; at epoch {epoch}: {message}. "
            f"Cure: {_FINITE_CURE}"
        )


def _gather_features(
    name: str,
    f: Tensor,
    problem: Exception | None,
    reduce: Reduce,
    device: torch.device | str,
) -> Tensor:
    """Every rank's feature rows, after one sum over the ranks of a table of each rank's
    (rows?, width, problem): a rank with no rows (fewer rows than processes) learns the
    feature width from the others; if any rank's features failed their checks, or the
    ranks' widths differ, every rank raises (no rank is left waiting in the gather)."""
    rank, world = rank_and_world_size()
    has_rows = problem is None and f.shape[0] > 0
    kinds = (TypeError, ValueError, Exception)  # what another rank raises, by code 1, 2, 3
    code = (
        0.0
        if problem is None
        else 1.0 + next(i for i, k in enumerate(kinds) if isinstance(problem, k))
    )
    table = torch.zeros(world, 3, dtype=torch.float64, device=device)
    table[rank] = torch.tensor(
        [float(has_rows), f.shape[1] if has_rows else 0.0, code], dtype=torch.float64, device=device
    )
    rows = reduce(table).tolist()
    if problem is not None:
        raise problem
    failed = next(((r, c) for r, (_, _, c) in enumerate(rows) if c), None)
    if failed is not None:  # another rank's check failed: that rank raised its own error
        if failed[1] == 3.0:  # the features raised on that rank's shard
            raise RuntimeError(
                f"`features` ({name}) raised an error on process {failed[0]}'s examples: see "
                "that process's error."
            )
        error = TypeError if failed[1] == 1.0 else ValueError
        raise error(
            f"`features` ({name}) failed its output check on process {failed[0]} "
            f"({error.__name__}): see that process's error for the value seen and the cure."
        )
    widths = [round(w) for held, w, _ in rows if held]
    if len(set(widths)) > 1:
        raise ValueError(
            f"`features` ({name}) must give the same number of features per example on every "
            f"process; the processes' widths differ: {widths}. Cure: make the feature width "
            "independent of the batch."
        )
    if not has_rows:
        f = f.new_zeros(0, widths[0])
    return gather_rows(f, reduce)
