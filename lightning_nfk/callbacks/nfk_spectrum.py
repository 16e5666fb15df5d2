"""NFKSpectrumCallback: how low-rank a model's Neural Fisher Kernel is, epoch by epoch.

Zhang et al., ICLR 2022, Section 4 and Fig. 2 (explained variance of the NFK against the
number of components), computed with :class:`lightning_nfk.kernel.LowRankNFK`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor

from lightning_nfk.kernel import (
    LowRankNFK,
    components_for,
    cumulative_explained_variance,
    effective_rank,
    stable_rank,
    subspace_drift,
)
from lightning_nfk.kernel.linalg import gather_rows
from lightning_nfk.kernel.low_rank_nfk import check_hyperparameters
from lightning_nfk.models.protocol import nfk_energy_of


def probe_dataset(trainer: pl.Trainer, split: str) -> Any:
    """The un-augmented dataset of ``split``: the data module's ``dataset(split)`` when it
    has one (lightning_nfk data modules), else the trainer's loader's dataset."""
    dm = trainer.datamodule
    if dm is not None and callable(getattr(dm, "dataset", None)):
        return dm.dataset(split)
    loader = trainer.train_dataloader if split == "train" else trainer.val_dataloaders
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        raise RuntimeError(
            f"Cannot find the {split!r} dataset: use a LightningDataModule with a `dataset(split)` "
            "method or a DataLoader over a map-style dataset."
        )
    return dataset


_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def check_strategy(trainer: pl.Trainer, who: str) -> None:
    """Refuse strategies that shard the parameters: the NFK needs every rank to hold theta."""
    name = type(trainer.strategy).__name__
    if name in _SHARDED_STRATEGIES:
        raise ValueError(
            f"{who} does not support {name}: it shards the parameters, and the NFK needs the full "
            "parameter vector on every rank. Use a data-parallel strategy (ddp, ddp_spawn) or "
            "one device."
        )


def strategy_sum(trainer: pl.Trainer) -> Callable[[Tensor], Tensor]:
    """The engine's ``reduce``: a sum over processes through the trainer's strategy."""
    strategy, world = trainer.strategy, trainer.world_size

    def reduce(t: Tensor) -> Tensor:
        return strategy.reduce(t, reduce_op="sum") if world > 1 else t

    return reduce


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, unpadded shard of ``n`` rows for ``rank`` (sizes differ by at most one)."""
    return rank * n // world_size, (rank + 1) * n // world_size


def rng_devices(module: torch.nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})


class NFKSpectrumCallback(Callback):
    """Fit a rank-``k`` NFK on a fixed probe set every ``every_n_epochs`` epochs and log its spectrum.

    The module must implement the NFK protocol (``nfk_energy()``, see
    :mod:`lightning_nfk.models.protocol`). The probe set is ``probe_size`` examples drawn
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
    * ``nfk/seconds``: wall time of the fit.

    A plot of :math:`c_j` against j (log axis), this epoch over the earlier ones as in the
    paper's Fig. 2, is written to ``<log_dir>/nfk_spectrum/epoch=NNN.png`` and sent to
    TensorBoard when that logger is used; on rank zero only.

    The callback never changes the training: the NFK runs in eval mode on a parameter
    snapshot, and the global RNG, the train/eval mode and the optimizer are untouched.

    Args:
        k: components (default 32: enough to see the decay of Fig. 2).
        oversample: extra sketch columns.
        n_iter: power iterations (default 3; ``n_iter + 2`` passes over the probe set in
            all, with the statistics pass). Enough for monitoring: the top
            eigenvalues converge first; raise it (and ``oversample``) for precise tails.
        probe_size: examples in the probe set (default 512). The defaults keep the fit
            under 10% of a Fashion-MNIST LeNet-5 epoch on 2 CPU cores (BENCHMARKS.md).
        probe_split: ``"train"`` or ``"val"``.
        every_n_epochs: fit after every n-th training epoch.
        damping, strategy, dtype, memory_budget: passed to :class:`LowRankNFK`.
        seed: seed of the probe draw and of the random sketch.
        plot: write the spectrum plots.

    Attributes:
        nfk: the last fitted :class:`LowRankNFK` (None before the first fit), for other
            callbacks such as :class:`LinearProbeCallback`.
        history: one dict per fit (epoch, metrics, cumulative explained variance).
    """

    def __init__(
        self,
        k: int = 32,
        oversample: int = 10,
        n_iter: int = 3,
        probe_size: int = 512,
        probe_split: Literal["train", "val"] = "train",
        every_n_epochs: int = 1,
        damping: float = 1e-8,
        strategy: str = "auto",
        dtype: torch.dtype | None = None,
        memory_budget: int = 2**30,
        seed: int = 0,
        plot: bool = True,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("k", k, 1),
            ("oversample", oversample, 0),
            ("n_iter", n_iter, 0),
            ("probe_size", probe_size, 1),
            ("every_n_epochs", every_n_epochs, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
        if k + oversample > probe_size:
            raise ValueError(
                f"`k` + `oversample` ({k} + {oversample}) must not exceed `probe_size` ({probe_size})."
            )
        if probe_split not in ("train", "val"):
            raise ValueError(f"`probe_split` must be 'train' or 'val', got {probe_split!r}.")
        check_hyperparameters(
            k=k,
            oversample=oversample,
            n_iter=n_iter,
            damping=damping,
            strategy=strategy,
            dtype=dtype,
            seed=seed,
            memory_budget=memory_budget,
        )
        self.k, self.oversample, self.n_iter = k, oversample, n_iter
        self.probe_size, self.probe_split = probe_size, probe_split
        self.every_n_epochs = every_n_epochs
        self.damping, self.strategy, self.dtype = damping, strategy, dtype
        self.memory_budget, self.seed, self.plot = memory_budget, seed, plot
        self.nfk: LowRankNFK | None = None
        self.history: list[dict[str, Any]] = []
        self.probe_indices: Tensor | None = None
        self._previous_phi: Tensor | None = None
        self._probe_x: Tensor | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            k=self.k, probe_size=self.probe_size, probe_split=self.probe_split
        )

    # -- Lightning hooks ------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        nfk_energy_of(pl_module)  # refuse a module without the protocol before training
        check_strategy(trainer, type(self).__name__)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._run_fit(trainer, pl_module)

    # -- work -----------------------------------------------------------------------------------
    def _local_probe(self, trainer: pl.Trainer, device: torch.device) -> Tensor:
        if self._probe_x is None:
            dataset = probe_dataset(trainer, self.probe_split)
            if self.probe_indices is None:
                n = len(dataset)
                if self.probe_size > n:
                    rank_zero_warn(
                        f"`probe_size` ({self.probe_size}) exceeds the {self.probe_split} set ({n}); using all."
                    )
                g = torch.Generator().manual_seed(self.seed)
                self.probe_indices = torch.randperm(n, generator=g)[: self.probe_size].sort().values
            lo, hi = shard_bounds(len(self.probe_indices), trainer.global_rank, trainer.world_size)
            items = [dataset[int(i)] for i in self.probe_indices[lo:hi]]
            self._probe_x = torch.stack(
                [it[0] if isinstance(it, (tuple, list)) else it for it in items]
            )
        return self._probe_x.to(device)

    def _run_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reduce = strategy_sum(trainer)
        with torch.random.fork_rng(devices=rng_devices(pl_module)):
            x = self._local_probe(trainer, pl_module.device)
            start = time.perf_counter()
            nfk = LowRankNFK(
                nfk_energy_of(pl_module),
                k=self.k,
                oversample=self.oversample,
                n_iter=self.n_iter,
                damping=self.damping,
                strategy=self.strategy,
                dtype=self.dtype,
                seed=self.seed,
                memory_budget=self.memory_budget,
                reduce=reduce,
            )
            with self._progress(trainer, x.shape[0]) as update:
                nfk.fit(x, progress=update)
                # e(X) = Phi diag(sigma) on the probe rows: free from the last pass
                emb = nfk.fit_embedding if nfk.fit_embedding is not None else nfk.transform(x)
            phi, _ = torch.linalg.qr(
                gather_rows(emb, reduce).double()
            )  # orthonormal basis of span(Phi)
            seconds = time.perf_counter() - start
        self.nfk = nfk
        metrics = {
            "nfk/sigma_1": float(nfk.singular_values[0]),
            "nfk/explained_variance": float(nfk.explained_variance_ratio.sum()),
            "nfk/effective_rank": effective_rank(nfk.singular_values),
            "nfk/stable_rank": stable_rank(nfk.singular_values, nfk.total_variance),
            "nfk/k90": float(components_for(nfk.singular_values, nfk.total_variance, 0.9)),
            "nfk/seconds": seconds,
        }
        if self._previous_phi is not None and self._previous_phi.shape == phi.shape:
            metrics["nfk/subspace_drift"] = subspace_drift(
                self._previous_phi, phi.to(self._previous_phi.device)
            )
        self._previous_phi = phi.cpu()
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False)
        self.history.append(
            {
                "epoch": trainer.current_epoch,
                "cumulative": cumulative_explained_variance(
                    nfk.singular_values, nfk.total_variance
                ).tolist(),
                **metrics,
            }
        )
        if self.plot:
            self._plot(trainer)

    @contextlib.contextmanager
    def _progress(self, trainer: pl.Trainer, n_local: int):
        if trainer.progress_bar_callback is None or trainer.global_rank != 0:
            yield lambda n: None
            return
        from tqdm.auto import tqdm

        total = n_local * (self.n_iter + 2)
        with tqdm(
            total=total, desc="NFK spectrum", unit="ex", leave=False, dynamic_ncols=True
        ) as bar:
            yield bar.update

    @rank_zero_only
    def _plot(self, trainer: pl.Trainer) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 4))
        cmap = plt.get_cmap("viridis")
        n = len(self.history)
        for i, h in enumerate(self.history):
            last = i == n - 1
            ax.plot(
                range(1, len(h["cumulative"]) + 1),
                h["cumulative"],
                color="crimson" if last else cmap(i / max(n - 1, 1)),
                lw=2 if last else 1,
                alpha=1 if last else 0.6,
                label=f"epoch {h['epoch']}" if last or i == 0 else None,
            )
        ax.set_xscale("log")
        ax.set_xlabel("number of components j")
        ax.set_ylabel("explained variance $c_j$")
        ax.set_ylim(0, 1)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right")
        ax.set_title("NFK spectrum on the probe set")
        fig.tight_layout()
        out = Path(trainer.log_dir or trainer.default_root_dir) / "nfk_spectrum"
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / f"epoch={trainer.current_epoch:03d}.png", dpi=100)
        for logger in trainer.loggers:
            if type(logger).__name__ == "TensorBoardLogger":
                logger.experiment.add_figure("nfk/spectrum", fig, global_step=trainer.global_step)
        plt.close(fig)

    # -- state ------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # The fitted LowRankNFK holds the trainer's collective and a parameter snapshot, and
        # the probe tensor is a cache: neither is pickled (state_dict holds what matters).
        state = self.__dict__.copy()
        state["nfk"], state["_probe_x"] = None, None
        return state

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "probe_indices": self.probe_indices,
            "previous_phi": self._previous_phi,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.probe_indices = state_dict.get("probe_indices")
        self._previous_phi = state_dict.get("previous_phi")
        self._probe_x = None
