"""NFKSpectrumCallback: how low-rank a model's Neural Fisher Kernel is, over training.

Zhang et al., ICLR 2022, Section 4 and Fig. 2 (explained variance of the NFK against the
number of components), computed with :class:`lightning_nfk.kernel.LowRankNFK`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_nfk._io import atomic_write
from lightning_nfk.callbacks.schedule import FitSchedule, Spacing, StepClock
from lightning_nfk.kernel import (
    LowRankNFK,
    NFKConfig,
    Strategy,
    components_for,
    cumulative_explained_variance,
    effective_rank,
    gather_rows,
    stable_rank,
    subspace_drift,
)
from lightning_nfk.kernel.blocks import check_blocks, resolve_blocks
from lightning_nfk.kernel.config import check_int, check_tol
from lightning_nfk.protocol import nfk_energy_of
from lightning_nfk.trainer_utils import (
    check_items,
    check_strategy,
    deferred_interrupts,
    local_shard,
    migrate_state_key,
    progress_bar,
    reference_dataset,
    resolved_log_dir,
    rng_devices,
    seeded_subset,
    stack_items,
    strategy_sum,
)

ROUND_OFF_RESIDUAL = 64
"""Warm fits' tolerance floor, in units of the working dtype's eps (float32: 7.6e-6)."""


class NFKSpectrumCallback(Callback):
    """Fit a rank-``k`` NFK on a fixed probe set on a schedule of epochs or training steps,
    and log its spectrum.

    The module must implement the NFK protocol (``nfk_energy()``, see
    :mod:`lightning_nfk.protocol`). The probe set is ``probe_size`` examples drawn
    once (seeded) from the ``probe_split`` data, without augmentation; under DDP each rank
    takes a contiguous unpadded shard and every sum is reduced through the trainer's
    strategy, so the figures equal those of one process.

    Logged (with :math:`\\sigma_i` the top-k singular values of V on the probe set,
    :math:`T = \\|V\\|_F^2` and :math:`c_j = \\sum_{i \\le j} \\sigma_i^2 / T`):

    * ``nfk/sigma_1``: :math:`\\sigma_1`;
    * ``nfk/explained_variance``: :math:`c_k`, the share of the kernel's trace in the top k;
    * ``nfk/effective_rank``: :math:`\\exp(-\\sum_{i \\le k} p_i \\log p_i)`,
      :math:`p_i = \\sigma_i^2 / \\sum_{j \\le k} \\sigma_j^2` (Roy and Vetterli 2007);
    * ``nfk/stable_rank``: :math:`T / \\sigma_1^2`;
    * ``nfk/k90``: the least j with :math:`c_j \\ge 0.9`, or **-1** when the top k do not
      reach 90%;
    * ``nfk/subspace_drift``: :math:`1 - \\|\\Phi_{prev}^\\top \\Phi\\|_F^2 / k`, the mean
      squared sine of the principal angles between this and the previous fit's top-k left
      singular subspace on the probe set (0: unchanged, 1: orthogonal; not logged at the
      first fit). The probe-set embeddings come free with the last pass;
    * ``nfk/products``: passes over the probe set the subspace iteration took (besides
      the statistics pass; ``n_iter + 1`` unless ``tol`` or a warm start stopped it early;
      0 for the ``dense`` strategy, which forms V in one pass instead);
    * ``nfk/residual``: the largest relative residual of the top k Ritz pairs, a bound on
      the eigenvalues' relative error (0 for ``dense``; not logged for a cold
      ``n_iter = 0`` fit, which has none);
    * ``nfk/seconds``: wall time of the fit;
    * with ``blocks``, for each parameter block ``<name>``: ``nfk/block/<name>/sigma_1``
      (its top singular value: :math:`\\sigma_1^2` is the top eigenvalue of its Gram
      matrix :math:`V_b V_b^\\top`), ``.../explained_variance`` (its top k's share of its
      own trace), ``.../effective_rank``, ``.../residual`` (its largest relative
      residual: with ``warm_start`` the blocks get the passes of a fit that may stop
      early) and ``.../trace_share``
      (:math:`\\|V_b\\|_F^2 / T`: how much of the kernel the block carries; with the
      diagonal Fisher taken over the probe set itself, as for classifiers and language
      models, every parameter with a non-zero gradient contributes N to the trace, so
      this is then the block's share of the active parameters);
    * ``nfk/cost_in_steps``: the fit's wall time in units of a training step of the same
      run, a step as ``trainer.global_step`` counts them (measured between batch starts
      within stretches of training: validation, epoch ends and this callback's fits
      excluded; without a host sync). Choose a schedule by its price: fitting every n
      steps adds about ``cost_in_steps / n`` to the training time, plus the plots when
      ``plot`` (outside the fit's time). Not logged before a step has been timed.

    Schedules, as Lightning's ``ModelCheckpoint``: ``every_n_epochs`` (at epoch ends; the
    default, every epoch) or ``every_n_train_steps`` (after the optimizer step of the
    batch at which ``trainer.global_step`` reaches the point, logged per step), and
    ``schedule="log"`` for points at n, 2n, 4n, 8n, ... (dense early, when the spectrum
    moves fastest; about log2 of the training length fits in all) instead of n, 2n, 3n.
    Every scalar is in ``trainer.callback_metrics`` when the fit's hook ends, so
    ``ModelCheckpoint(monitor="nfk/effective_rank")`` and ``EarlyStopping`` can use them:
    Lightning runs both after the other callbacks, whatever the order listed. (An
    ``EarlyStopping`` that checks at validation end, ``check_on_train_epoch_end=False``,
    runs before the epoch-end fit and sees the previous fit's values; so does a
    ``ModelCheckpoint`` that saves at validation end or every n steps off the fit's
    schedule.)

    Plots (rank zero only; also sent to TensorBoard when that logger is used), in
    ``<log_dir>/nfk_spectrum/``: :math:`c_j` against j (log axis), this fit over the
    earlier ones as in the paper's Fig. 2 (``epoch=NNN.png`` or ``step=NNNNNNN.png``), and
    ``heatmap.png``: each component's share :math:`\\sigma_j^2 / T` (log colour) against
    j and the fit's epoch or step, redrawn at each fit; with ``blocks``, ``blocks.png``:
    every block's explained variance against j at this fit beside its effective rank over
    the fits.

    The callback never changes the training: the NFK runs in eval mode on a parameter
    snapshot, and the global RNG, the train/eval mode and the optimizer are untouched.

    Args:
        k: components (default 32: enough to see the decay of Fig. 2).
        oversample: extra sketch columns.
        n_iter: power iterations (default 3; ``n_iter + 2`` passes over the probe set in
            all with the statistics pass, 2 when ``auto`` picks ``dense`` for a small probe
            set). Enough for monitoring: the top
            eigenvalues converge first; raise it (and ``oversample``) for precise tails.
        probe_size: examples in the probe set (default 512). The fit's cost grows with
            ``probe_size`` and ``n_iter``; BENCHMARKS.md ("NFKSpectrumCallback overhead")
            has it measured against a training epoch.
        probe_split: ``"train"`` or ``"val"``.
        every_n_epochs: fit at epoch ends, every n-th (default when neither this nor
            ``every_n_train_steps`` is set: 1).
        every_n_train_steps: fit after training steps (``trainer.global_step``), every
            n-th; exclusive with ``every_n_epochs``.
        schedule: ``"linear"`` (n, 2n, 3n, ...) or ``"log"`` (n, 2n, 4n, 8n, ...).
        warm_start: start each fit's subspace iteration from the previous fit's components
            (same parameters), the rest of the sketch Gaussian, and stop it once each
            top-k residual is at most ``tol`` (default: that component's residual in the
            run's first, cold fit: equal accuracy component by component), ``n_iter``
            iterations at most: the sketch continues rather than restarts, and a model
            that moved little costs a pass or two. Needs a randomized strategy
            (``"blocked"``, ``"matrix_free"``, or ``"auto"`` when it picks one: a warning
            says when it picked ``"dense"``, exact and without iterations) and an exact
            trace (the previous fit's ``total_variance_is_exact``); else the fit is cold.
            A cold residual below 64 eps of the working dtype (round-off, which no fit
            can be asked to reach again) counts as 64 eps.
        tol: stop every fit's subspace iteration once all top-k relative residuals are at
            most ``tol`` (``n_iter`` stays the cap); None: ``n_iter`` iterations (cold) or
            the cold fit's residuals (warm).
        blocks: also each parameter block's spectrum, from the same passes (the
            per-example gradients are computed once; only the products are per block):
            ``"auto"`` (the kernel module's top-level children) or a list of
            prefixes of the kernel module's parameter names (e.g. ``["blocks.0",
            "blocks.11"]`` for a :class:`~lightning_nfk.models.GPT`),
            checked against the module at ``setup``. Costs about one more sketch's
            products and memory per fit (``matrix_free``: one per block); BENCHMARKS.md
            ("Per-block spectra") has it measured. Blocks start cold at every fit and
            take as many passes as the whole kernel: with ``warm_start`` that may be one
            or two, and ``nfk/block/<name>/residual`` says how accurate they are.
        damping, strategy, dtype, memory_budget, chunk_size: the :class:`NFKConfig` of the
            fit, with ``k``, ``oversample``, ``n_iter`` and ``seed``.
        seed: seed of the probe draw and of the random sketch.
        plot: write the spectrum plots.

    Raises:
        TypeError, ValueError: invalid arguments (at construction), or a probe set smaller
            than ``k + oversample`` or unreadable dataset items (at ``setup``).

    Attributes:
        config: the :class:`NFKConfig` of every fit.
        nfk: the last fitted :class:`LowRankNFK` (None before the first fit), for other
            callbacks such as :class:`LinearProbeCallback`.
        schedule: the :class:`~lightning_nfk.callbacks.schedule.FitSchedule` of the fits.
        history: one dict per fit (epoch, step, metrics, cumulative explained variance).
    """

    def __init__(
        self,
        k: int = 32,
        oversample: int = 10,
        n_iter: int = 3,
        probe_size: int = 512,
        probe_split: Literal["train", "val"] = "train",
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        schedule: Spacing = "linear",
        warm_start: bool = False,
        tol: float | None = None,
        blocks: str | list[str] | None = None,
        damping: float = 1e-8,
        strategy: Strategy = "auto",
        dtype: torch.dtype | None = None,
        memory_budget: int | None = None,
        chunk_size: int | None = None,
        seed: int = 0,
        plot: bool = True,
    ) -> None:
        super().__init__()
        self.config = NFKConfig(
            k=k,
            oversample=oversample,
            n_iter=n_iter,
            damping=damping,
            strategy=strategy,
            dtype=dtype,
            seed=seed,
            memory_budget=memory_budget,
            chunk_size=chunk_size,
        )
        check_int("probe_size", probe_size, 1)
        self.schedule = FitSchedule.from_arguments(every_n_epochs, every_n_train_steps, schedule)
        self.config.check_columns(probe_size, f"`probe_size` ({probe_size})", "raise `probe_size`")
        if probe_split not in ("train", "val"):
            raise ValueError(f"`probe_split` must be 'train' or 'val', got {probe_split!r}.")
        self.probe_size, self.probe_split = probe_size, probe_split
        if not isinstance(warm_start, bool):
            raise TypeError(f"`warm_start` must be a bool, got {warm_start!r}.")
        check_tol("tol", tol)
        if strategy == "dense" and (warm_start or tol is not None):
            raise ValueError(
                f"`warm_start` ({warm_start}) and `tol` ({tol}) steer the subspace iteration, "
                "which `strategy`='dense' does not run (it is exact). Cure: drop them, or "
                "use `strategy`='blocked'."
            )
        if blocks is not None:
            check_blocks(blocks)
            blocks = blocks if isinstance(blocks, str) else list(blocks)
        self.plot, self.warm_start, self.tol, self.blocks = plot, warm_start, tol, blocks
        # the first cold fit's (k,) residuals: the warm fits' tolerance
        self._cold_residuals: Tensor | None = None
        self._warned = False
        self._nfk_layout: list = []  # the kernel_layout() of `nfk`'s components
        self.nfk: LowRankNFK | None = None
        self.history: list[dict[str, Any]] = []
        self.probe_indices: Tensor | None = None
        self._previous_phi: Tensor | None = None
        self._probe_x: Tensor | None = None
        self._clock = StepClock()
        self._last_step = 0  # trainer.global_step at the last batch end seen

    @property
    def every_n_epochs(self) -> int | None:
        """The epoch interval of a linear epoch schedule, else None."""
        s = self.schedule
        return s.every if s.unit == "epoch" and s.spacing == "linear" else None

    @property
    def state_key(self) -> str:
        # every setting that makes two instances' histories differ (strategy, memory budget
        # and chunk size change the round-off only)
        c, s = self.config, self.schedule
        # the schedule's newer settings enter the key only when set, so that checkpoints
        # written before they existed keep their key
        newer = {"unit": s.unit} if s.unit == "step" else {}
        newer |= {"schedule": s.spacing} if s.spacing == "log" else {}
        newer |= {"warm_start": True} if self.warm_start else {}
        newer |= {"tol": self.tol} if self.tol is not None else {}
        newer |= {"blocks": self.blocks} if self.blocks is not None else {}
        return self._generate_state_key(
            k=c.k,
            oversample=c.oversample,
            n_iter=c.n_iter,
            damping=c.damping,
            dtype=str(c.dtype),
            seed=c.seed,
            probe_size=self.probe_size,
            probe_split=self.probe_split,
            every_n_epochs=s.every,
            **newer,
        )

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # the state key before the settings were added to it (checkpoints of 0.1.0.dev0
        # written before this change)
        legacy = self._generate_state_key(
            k=self.config.k, probe_size=self.probe_size, probe_split=self.probe_split
        )
        migrate_state_key(checkpoint, self.state_key, legacy)

    # -- Lightning hooks ------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        energy = nfk_energy_of(pl_module)  # refuse a module without the protocol early
        if self.blocks is not None:  # prefixes that name no parameter: before training
            resolve_blocks(self.blocks, energy.kernel_layout())
        check_strategy(trainer, type(self).__name__)
        if stage == "fit" and trainer.datamodule is not None:
            self._check_probe_set(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.datamodule is None:  # loaders passed to fit() exist only now
            self._check_probe_set(trainer)
        self._clock, self._last_step = StepClock(), trainer.global_step

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._clock.batch_start(trainer.global_step)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        before, self._last_step = self._last_step, trainer.global_step
        if self.schedule.unit == "step" and self.schedule.due(before, trainer.global_step):
            self._fit_now(trainer, pl_module, per_step=True)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._clock.pause()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._clock.pause()
        epochs = trainer.current_epoch + 1
        if self.schedule.unit == "epoch" and self.schedule.due(epochs - 1, epochs):
            self._fit_now(trainer, pl_module, per_step=False)

    def _fit_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule, per_step: bool) -> None:
        with deferred_interrupts(trainer):  # Ctrl-C / SIGTERM: every rank stops together
            self._run_fit(trainer, pl_module, per_step)
        self._clock.pause()

    # -- work -----------------------------------------------------------------------------------
    def _check_probe_set(self, trainer: pl.Trainer) -> None:
        dataset = reference_dataset(trainer, self.probe_split)
        where = f"{self.probe_split} dataset (NFKSpectrumCallback's probe set)"
        check_items(dataset, labels=False, where=where)
        size = min(self.probe_size, len(dataset))
        self.config.check_columns(
            size, f"the probe set: min(`probe_size`, len({self.probe_split} dataset)) = {size}"
        )

    def _local_probe(self, trainer: pl.Trainer, device: torch.device) -> Tensor:
        if self._probe_x is None:
            dataset = reference_dataset(trainer, self.probe_split)
            if self.probe_indices is None:
                if self.probe_size > len(dataset):
                    rank_zero_warn(
                        f"`probe_size` ({self.probe_size}) exceeds the {self.probe_split} set "
                        f"({len(dataset)}); using all."
                    )
                self.probe_indices = seeded_subset(len(dataset), self.probe_size, self.config.seed)
            self._probe_x, _ = stack_items(dataset, local_shard(trainer, self.probe_indices)[0])
        return self._probe_x.to(device)

    def _run_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, per_step: bool) -> None:
        reduce = strategy_sum(trainer)
        with torch.random.fork_rng(devices=rng_devices(pl_module)):
            x = self._local_probe(trainer, pl_module.device)
            start = time.perf_counter()
            energy = nfk_energy_of(pl_module)
            warm, tol, layout = self._warm_start(energy)
            nfk = LowRankNFK(energy, self.config, reduce=reduce)
            with progress_bar(trainer, "NFK spectrum") as update:
                # e(X) = Phi diag(sigma) on the probe rows: free from the last pass
                emb = nfk.fit_transform(x, progress=update, start=warm, tol=tol, blocks=self.blocks)
            phi, _ = torch.linalg.qr(
                gather_rows(emb, reduce).double()
            )  # orthonormal basis of span(Phi)
            seconds = time.perf_counter() - start
        self.nfk, self._nfk_layout = nfk, layout
        metrics = {
            "nfk/sigma_1": float(nfk.singular_values[0]),
            "nfk/explained_variance": float(nfk.explained_variance_ratio.sum()),
            "nfk/effective_rank": effective_rank(nfk.singular_values),
            "nfk/stable_rank": stable_rank(nfk.singular_values, nfk.total_variance),
            "nfk/k90": float(components_for(nfk.singular_values, nfk.total_variance, 0.9)),
            "nfk/products": float(nfk.products),
            "nfk/seconds": seconds,
        }
        for name, block in nfk.block_spectra.items():
            metrics |= {
                f"nfk/block/{name}/sigma_1": float(block.singular_values[0]),
                f"nfk/block/{name}/explained_variance": block.explained_variance,
                f"nfk/block/{name}/effective_rank": block.effective_rank,
                f"nfk/block/{name}/trace_share": block.trace_share,
            }
            residual = float(block.residuals.max())
            if math.isfinite(residual):
                metrics[f"nfk/block/{name}/residual"] = residual
        residual = float(nfk.residuals.max())
        if math.isfinite(residual):
            metrics["nfk/residual"] = residual
            if warm is None and self._cold_residuals is None:
                self._cold_residuals = nfk.residuals.cpu()
        if nfk.strategy_used == "dense" and (self.warm_start or self.tol):
            self._warn_once(
                "`strategy`='auto' chose 'dense' (exact, no iteration) for this probe set, so "
                "`warm_start` and `tol` have no effect. Set `strategy`='blocked' to use them."
            )
        elif self.warm_start and not nfk.total_variance_is_exact:
            self._warn_once(
                "the kernel's trace is estimated from the sketch's Gaussian columns here (no "
                "statistics cover the probe set), which a warm start would thin out: the "
                "fits stay cold. Use `strategy`='blocked' for an exact trace."
            )
        cost = self._clock.in_steps(seconds)
        if cost is not None:
            metrics["nfk/cost_in_steps"] = cost
        if self._previous_phi is not None and self._previous_phi.shape == phi.shape:
            metrics["nfk/subspace_drift"] = subspace_drift(
                self._previous_phi, phi.to(self._previous_phi.device)
            )
        self._previous_phi = phi.cpu()
        for name, value in metrics.items():
            # per epoch: Lightning asks for sync_dist under DDP (a mean of equals, except the
            # ranks' own clocks); per step: into callback_metrics only (for ModelCheckpoint
            # and EarlyStopping), the loggers get them below
            sync = not per_step and trainer.world_size > 1
            pl_module.log(
                name,
                value,
                on_step=per_step,
                on_epoch=not per_step,
                sync_dist=sync,
                logger=not per_step,
            )
        if per_step:
            # Lightning sends step values to the loggers every `log_every_n_steps` steps only:
            # a fit is rare and costly, so its figures go out at once, at the x position
            # Lightning gives this batch's own step values
            step = _logger_step(trainer)
            for logger in trainer.loggers:
                logger.log_metrics({**metrics, "epoch": trainer.current_epoch}, step)
                logger.save()
        self.history.append(
            {
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
                "cumulative": cumulative_explained_variance(
                    nfk.singular_values, nfk.total_variance
                ).tolist(),
                **metrics,
                **self._block_history(nfk),
            }
        )
        if self.plot:
            # log_dir broadcasts under DDP: resolved on every rank, used on rank zero only
            self._plot(trainer, resolved_log_dir(trainer) / "nfk_spectrum")

    @staticmethod
    def _block_history(nfk: LowRankNFK) -> dict[str, Any]:
        """Each block's cumulative explained variance (of its own trace), for the plots."""
        if not nfk.block_spectra:
            return {}
        return {
            "block_cumulative": {
                name: cumulative_explained_variance(b.singular_values, b.total_variance).tolist()
                for name, b in nfk.block_spectra.items()
            }
        }

    def _warm_start(self, energy: Any) -> tuple[Tensor | None, Any, list]:
        """The start and tolerance of this fit, and the kernel's parameter layout (the
        components' rows). The start is the previous fit's components when ``warm_start``,
        the layout is unchanged and the previous fit's trace was exact (a warm sketch has
        fewer Gaussian columns for an estimate), else None."""
        layout = energy.kernel_layout()
        prev = self.nfk
        if (
            not self.warm_start
            or prev is None
            or prev.strategy_used == "dense"
            or not prev.total_variance_is_exact
            or layout != self._nfk_layout
        ):
            return None, self.tol, layout
        tol = self.tol if self.tol is not None else self._cold_residuals
        if isinstance(tol, Tensor):
            if not bool(tol.isfinite().all()):
                tol = None  # a cold fit without residuals (NaN: n_iter = 0)
            else:
                # residuals below this are the working dtype's round-off, not convergence:
                # a cold fit that reached them would make every warm fit run to the cap
                tol = tol.clamp_min(ROUND_OFF_RESIDUAL * torch.finfo(prev.operator.dtype).eps)
        return prev.components, tol, layout

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            rank_zero_warn(f"NFKSpectrumCallback: {message}")

    def _label(self, h: dict[str, Any]) -> str:
        return f"step {h['step']}" if self.schedule.unit == "step" else f"epoch {h['epoch']}"

    @rank_zero_only
    def _plot(self, trainer: pl.Trainer, out: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 4))
        cmap = plt.get_cmap("viridis")
        n = len(self.history)
        # the first fit and the last 19: a drawing whose cost does not grow with the run
        # (the heatmap keeps them all)
        for i in sorted({0, *range(max(n - 19, 0), n)}):
            h = self.history[i]
            last = i == n - 1
            ax.plot(
                range(1, len(h["cumulative"]) + 1),
                h["cumulative"],
                color="crimson" if last else cmap(i / max(n - 1, 1)),
                lw=2 if last else 1,
                alpha=1 if last else 0.6,
                label=self._label(h) if last or i == 0 else None,
            )
        ax.set_xscale("log")
        ax.set_xlabel("number of components j")
        ax.set_ylabel("explained variance $c_j$")
        ax.set_ylim(0, 1)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right")
        ax.set_title("NFK spectrum on the probe set")
        name = (
            f"step={trainer.global_step:07d}"
            if self.schedule.unit == "step"
            else f"epoch={trainer.current_epoch:03d}"
        )
        self._save(trainer, fig, out / f"{name}.png", "nfk/spectrum")
        self._save(trainer, self._heatmap(plt), out / "heatmap.png", "nfk/spectrum_heatmap")
        if "block_cumulative" in self.history[-1]:
            self._save(trainer, self._blocks(plt), out / "blocks.png", "nfk/blocks")

    def _blocks(self, plt: Any) -> Any:
        """Every block's explained variance against j at the last fit, and its effective
        rank over the fits."""
        last = self.history[-1]
        names = list(last["block_cumulative"])
        fits = [h for h in self.history if "block_cumulative" in h]
        at = [h["step"] if self.schedule.unit == "step" else h["epoch"] for h in fits]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        cmap = plt.get_cmap("tab10" if len(names) <= 10 else "viridis")
        for i, name in enumerate(names):
            color = cmap(i if len(names) <= 10 else i / (len(names) - 1))
            c = last["block_cumulative"][name]
            share = last[f"nfk/block/{name}/trace_share"]
            left.plot(range(1, len(c) + 1), c, color=color, label=f"{name} ({share:.0%} of tr K)")
            key = f"nfk/block/{name}/effective_rank"
            seen = [(x, h[key]) for x, h in zip(at, fits) if key in h]
            right.plot(*zip(*seen), color=color, marker="o", ms=3)
        left.set_xscale("log")
        left.set_xlabel("number of components j")
        left.set_ylabel("explained variance of the block's own trace")
        left.set_ylim(0, 1)
        left.grid(True, which="both", alpha=0.3)
        left.legend(fontsize=7, loc="lower right")
        left.set_title(f"Per-block NFK spectra, {self._label(last)}")
        right.set_xlabel("training step" if self.schedule.unit == "step" else "epoch")
        right.set_ylabel("effective rank of the top k")
        right.xaxis.get_major_locator().set_params(integer=True)
        right.grid(True, alpha=0.3)
        right.set_title("Per-block effective rank over training")
        return fig

    def _heatmap(self, plt: Any) -> Any:
        """Each component's share of the trace, sigma_j^2 / T (log colour), against j and
        the fits so far (one row per fit, in order)."""
        import numpy as np
        from matplotlib.colors import LogNorm

        width = max(len(h["cumulative"]) for h in self.history)
        shares = np.full((len(self.history), width), np.nan)
        for i, h in enumerate(self.history):
            c = np.asarray(h["cumulative"], dtype=np.float64)
            shares[i, : len(c)] = np.diff(c, prepend=0.0)
        shares[~(shares > 0)] = np.nan  # log colour: a zero share is left blank
        fig, ax = plt.subplots(figsize=(6, 1.6 + 0.18 * min(len(self.history), 40)))
        finite = shares[np.isfinite(shares)]
        norm = LogNorm(finite.min(), finite.max()) if finite.size else None
        im = ax.imshow(
            shares,
            aspect="auto",
            interpolation="nearest",
            cmap="magma",
            norm=norm,
            extent=(0.5, width + 0.5, len(self.history) - 0.5, -0.5),
        )
        ticks = np.unique(np.linspace(0, len(self.history) - 1, min(len(self.history), 8)).round())
        ax.set_yticks(ticks)
        ax.set_yticklabels([self._label(self.history[int(t)]) for t in ticks])
        ax.set_xlabel("component j")
        ax.set_title("NFK spectrum over training: $\\sigma_j^2 / \\mathrm{tr}$")
        fig.colorbar(im, ax=ax, label="share of the trace")
        return fig

    @staticmethod
    def _save(trainer: pl.Trainer, fig: Any, path: Path, tag: str) -> None:
        import matplotlib.pyplot as plt

        fig.tight_layout()
        atomic_write(  # whole or absent: a viewer never shows half a PNG
            path, lambda tmp: fig.savefig(tmp, dpi=100, format="png")
        )
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(tag, fig, global_step=trainer.global_step)
        plt.close(fig)

    # -- state ------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # The fitted LowRankNFK holds the trainer's collective and a parameter snapshot, and
        # the probe tensor is a cache: neither is pickled (state_dict holds what matters).
        state = self.__dict__.copy()
        state["nfk"], state["_probe_x"] = None, None
        return state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "probe_indices": self.probe_indices,
            "previous_phi": self._previous_phi,
            "cold_residuals": self._cold_residuals,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.probe_indices = state_dict.get("probe_indices")
        self._previous_phi = state_dict.get("previous_phi")
        self._cold_residuals = state_dict.get("cold_residuals")
        self._probe_x = None


def _logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning logs this batch's values at: the count of batches that stepped
    before it (Lightning's ``_batches_that_stepped``, a private counter; the global step
    minus one where it is absent)."""
    loop = getattr(trainer.fit_loop, "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", max(trainer.global_step - 1, 0)))
