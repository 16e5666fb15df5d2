"""LinearProbeCallback: how good a model's representation is, as a linear probe.

The paper's protocol (Zhang et al., ICLR 2022, Section 5): a linear classifier on frozen
features (NFK embeddings, a layer's activations, or any callable), also with few labels
(500/1000/2000/4000 in the semi-supervised tables).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
    check_int,
    check_scaling,
    gather_rows,
    kernel_mode,
    select_and_fit,
)
from lightning_nfk.models.protocol import nfk_energy_of
from lightning_nfk.trainer_utils import (
    check_items,
    check_strategy,
    deferred_interrupts,
    local_shard,
    reference_dataset,
    rng_devices,
    seeded_subset,
    stack_items,
    strategy_sum,
)

FeatureFn = Callable[[pl.LightningModule, Tensor], Tensor]


class LinearProbeCallback(Callback):
    """Every ``every_n_epochs`` epochs, fit a multinomial logistic regression on frozen
    features of labelled training examples and log its validation accuracy.

    Features (``features``):

    * ``"nfk"``: NFK embeddings :math:`e(x) = V_x P`; from the :class:`NFKSpectrumCallback`
      of the same trainer when it fitted this epoch, else from this callback's own
      :class:`LowRankNFK` fit on ``nfk_fit_size`` training examples;
    * the name of a submodule of the LightningModule (e.g. ``"net.classifier.4"``): its
      flattened output activations, in eval mode;
    * a callable ``f(pl_module, x) -> (B, d)`` features.

    The probe: centred features scaled as ``scaling`` says (standardised by default),
    full-batch L-BFGS in float64, L2 strength chosen from ``l2_grid`` on a seeded held-out
    20% of the labelled examples, then refitted on all of them. Training examples: up to ``max_train`` (seeded) from the data module's
    label budget (``num_labels``) when it has one, else from the training split;
    evaluation: the validation split (up to ``max_val``). Under DDP each rank extracts the
    features of its own shard; they are gathered, and every rank fits the same probe.

    Logs ``probe/acc`` (validation accuracy), ``probe/train_acc`` and ``probe/l2``.

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
    ) -> None:
        super().__init__()
        check_scaling(scaling)
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
        if features == "nfk" and self.config.columns > nfk_fit_size:
            raise ValueError(
                f"`k` + `oversample` ({k} + {oversample}) must not exceed `nfk_fit_size` "
                f"({nfk_fit_size}), the examples of this callback's own NFK fit."
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
        self.history: list[dict[str, float]] = []
        self._cache: dict[str, tuple[Tensor, Tensor, int, int]] = {}

    @property
    def state_key(self) -> str:
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
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.datamodule is None:  # loaders passed to fit() exist only now
            self._check_splits(trainer)

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
        n_fit = min(self.nfk_fit_size, self.max_train, len(reference_dataset(trainer, "labeled")))
        if self.features == "nfk" and self.config.columns > n_fit:
            raise ValueError(
                f"`k` + `oversample` ({self.config.k} + {self.config.oversample}) must not exceed "
                f"the examples of the probe's own NFK fit: min(`nfk_fit_size`, `max_train`, "
                f"labelled training examples) = {n_fit}."
            )

    def _split(self, trainer: pl.Trainer, which: str) -> tuple[Tensor, Tensor, int, int]:
        """This rank's shard (x, y) of the (seeded, capped) labelled-train or validation
        examples, the shard's first position in the whole selection, and its size."""
        if which not in self._cache:
            cap = self.max_train if which == "labeled" else self.max_val
            dataset = reference_dataset(trainer, which)
            indices = seeded_subset(len(dataset), cap, self.seed + (which == "val"))
            local, lo = local_shard(trainer, indices)
            x, y = stack_items(dataset, local, labels=True)
            assert y is not None
            self._cache[which] = (x, y, lo, len(indices))
        return self._cache[which]

    # -- features ------------------------------------------------------------------------------
    def _nfk(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, reduce: Reduce
    ) -> LowRankNFK:
        for cb in trainer.callbacks:
            if (
                isinstance(cb, NFKSpectrumCallback)
                and cb.nfk is not None
                and cb.history
                and cb.history[-1]["epoch"] == trainer.current_epoch
            ):
                return cb.nfk
        # nfk_fit_size seeded positions of the whole selection (the same set for any
        # number of processes); each rank fits those inside its shard
        x, _, lo, total = self._split(trainer, "labeled")
        pos = seeded_subset(total, self.nfk_fit_size, self.seed + 2)
        x_fit = x[pos[(pos >= lo) & (pos < lo + len(x))] - lo]
        nfk = LowRankNFK(nfk_energy_of(pl_module), self.config, reduce=reduce)
        return nfk.fit(x_fit.to(pl_module.device))

    def _extract(
        self, pl_module: pl.LightningModule, x: Tensor, fn: Callable[[Tensor], Tensor]
    ) -> Tensor:
        # Forward-only features (a layer, a callable) see inputs in the module's dtype
        # (bfloat16 under `bf16-true`); the NFK casts to its own float32/64 working dtype.
        dtype = None if self.features == "nfk" else _floating_dtype(pl_module)
        parts = [
            fn(_to(xb, pl_module.device, dtype)).detach().flatten(1).double()
            for xb in x.split(self.batch_size)
        ]
        if not parts:
            return torch.zeros(0, 0, dtype=torch.float64, device=pl_module.device)
        return torch.cat(parts)

    def _feature_fn(self, trainer, pl_module, reduce) -> Callable[[Tensor], Tensor]:
        if self.features == "nfk":
            nfk = self._nfk(trainer, pl_module, reduce)
            return nfk.transform
        if callable(self.features):
            fn = self.features

            def user_features(xb: Tensor) -> Tensor:
                with torch.no_grad():  # kernel_mode turns gradients on for the NFK only
                    return fn(pl_module, xb)

            return user_features
        layer = dict(pl_module.named_modules())[self.features]

        def activations(xb: Tensor) -> Tensor:
            out: list[Tensor] = []
            handle = layer.register_forward_hook(lambda m, i, o: out.append(o))
            try:
                with torch.no_grad():
                    pl_module(xb)
            finally:
                handle.remove()
            return out[0]

        return activations

    def _run_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reduce = strategy_sum(trainer)
        with torch.random.fork_rng(devices=rng_devices(pl_module)), torch.no_grad():
            x_tr, y_tr, _, _ = self._split(trainer, "labeled")
            x_va, y_va, _, _ = self._split(trainer, "val")
            fn = self._feature_fn(trainer, pl_module, reduce)
            with kernel_mode(pl_module):
                f_tr = self._extract(pl_module, x_tr, fn)
                f_va = self._extract(pl_module, x_va, fn)
            # every rank's rows, in selection order; labels travel as float64
            f_tr, f_va = (_gather_features(f.to(pl_module.device), reduce) for f in (f_tr, f_va))
            y_tr = gather_rows(y_tr.double().to(pl_module.device), reduce).long()
            y_va = gather_rows(y_va.double().to(pl_module.device), reduce).long()
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


def _floating_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating-point parameter (None without one)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def _to(x: Tensor, device: torch.device, dtype: torch.dtype | None) -> Tensor:
    """``x`` on ``device``; floating inputs cast to ``dtype`` when given."""
    if dtype is None or not x.is_floating_point():
        return x.to(device)
    return x.to(device=device, dtype=dtype)


def _gather_features(f: Tensor, reduce: Reduce) -> Tensor:
    """Every rank's feature rows; a rank with no rows (fewer rows than processes) learns the
    feature width from the others."""
    has_rows = float(f.shape[0] > 0)
    width = reduce(
        torch.tensor([f.shape[1] * has_rows, has_rows], dtype=torch.float64, device=f.device)
    )
    if not has_rows:
        f = f.new_zeros(0, round((width[0] / width[1]).item()))
    return gather_rows(f, reduce)
