"""Every rank's module state at the end of training, for multi-process CLI runs.

A run adds the callback with ``--trainer.callbacks+=tests.helpers.rank_state.RankStateDump``
(the repository on ``PYTHONPATH``); the test then compares the files with
:func:`assert_ranks_agree`: DDP keeps the ranks' modules equal only if every gradient was
all-reduced and every buffer synchronised.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch

CALLBACK = "--trainer.callbacks+=tests.helpers.rank_state.RankStateDump"


class RankStateDump(pl.Callback):
    """Saves this rank's ``state_dict()`` (parameters and buffers) to ``dirpath/rank{r}.pt``
    at the end of training, and to ``dirpath/rank{r}_start.pt`` at its start (to tell that
    training moved the weights); no collective, so a rank never waits for another here.

    Args:
        dirpath: the folder of the files (the run's working directory by default).
    """

    def __init__(self, dirpath: str = ".") -> None:
        self.dirpath = Path(dirpath)

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, suffix: str) -> None:
        state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        torch.save(state, self.dirpath / f"rank{trainer.global_rank}{suffix}.pt")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, "_start")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, "")


def assert_ranks_agree(dirpath: Path, world_size: int) -> dict[str, torch.Tensor]:
    """Every rank's module state equals rank zero's; returns rank zero's.

    The ranks apply the same optimizer to the same all-reduced gradients, so they agree to
    round-off: float32 tolerances (an unsynchronised gradient moves a parameter by about the
    learning rate, orders of magnitude more).
    """
    states = [
        torch.load(dirpath / f"rank{r}.pt", map_location="cpu", weights_only=True)
        for r in range(world_size)
    ]
    for r, state in enumerate(states[1:], start=1):
        assert state.keys() == states[0].keys()
        for key, value in states[0].items():
            torch.testing.assert_close(
                state[key],
                value,
                rtol=1e-6,
                atol=1e-7,
                msg=lambda m, k=key, r=r: f"rank {r}, {k}: {m}",
            )
    return states[0]
