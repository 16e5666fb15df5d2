"""When a monitoring callback runs, on the training's own clock, and what a run costs in
units of a training step."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from lightning_nfk.kernel.config import check_int

Spacing = Literal["linear", "log"]


@dataclass(frozen=True)
class FitSchedule:
    """Points on a counter (completed epochs, or ``trainer.global_step``) at which to run.

    ``spacing="linear"``: every, 2 every, 3 every, ...; ``"log"``: every, 2 every, 4 every,
    8 every, ... (dense early, where the spectrum moves fastest, sparse late: about
    log2(steps) runs in all).
    """

    unit: Literal["epoch", "step"]
    every: int
    spacing: Spacing = "linear"

    @classmethod
    def from_arguments(
        cls, every_n_epochs: int | None, every_n_train_steps: int | None, schedule: object
    ) -> FitSchedule:
        """The schedule a callback's arguments name; errors name the argument."""
        check_int("every_n_epochs", every_n_epochs, 1, optional=True)
        check_int("every_n_train_steps", every_n_train_steps, 1, optional=True)
        if schedule not in ("linear", "log"):
            raise ValueError(f"`schedule` must be 'linear' or 'log', got {schedule!r}.")
        if every_n_epochs is not None and every_n_train_steps is not None:
            raise ValueError(
                "`every_n_epochs` and `every_n_train_steps` are exclusive, got "
                f"{every_n_epochs} and {every_n_train_steps}. Cure: set one (neither: every "
                "epoch)."
            )
        if every_n_train_steps is not None:
            return cls("step", every_n_train_steps, schedule)  # type: ignore[arg-type]
        return cls("epoch", 1 if every_n_epochs is None else every_n_epochs, schedule)  # type: ignore[arg-type]

    def next_after(self, count: int) -> int:
        """The schedule's first point above ``count``."""
        if self.spacing == "linear":
            return self.every * (count // self.every + 1)
        point = self.every
        while point <= count:
            point *= 2
        return point

    def due(self, before: int, now: int) -> bool:
        """Whether a point lies in ``(before, now]``: a counter that jumps (a GAN's two
        optimizer steps per batch) still meets every point once."""
        return self.next_after(before) <= now

    def describe(self) -> str:
        unit = f"{self.unit}s"
        if self.spacing == "linear":
            return f"every {self.every} {unit}" if self.every > 1 else f"every {self.unit}"
        scale = f"{self.every} x " if self.every > 1 else ""
        return f"at {scale}1, 2, 4, 8, ... {unit}"


class StepClock:
    """Mean wall time of a training step, as ``trainer.global_step`` counts them (an
    optimizer step: with gradient accumulation several batches, for a GAN's two
    optimizers half a batch), data loading included, without a host sync.

    It sums, over consecutive batch starts within a stretch of training, the time between
    them and the steps taken; a stretch ends at anything that is not training (an epoch
    end, validation, this callback's fit), so that time is not counted. Other callbacks'
    per-batch work (e.g. a checkpoint every n steps) is. On an accelerator the batch
    starts follow the device once its queue is full, so the mean is the device's pace.
    """

    def __init__(self) -> None:
        self.seconds, self.steps = 0.0, 0
        self._last: tuple[float, int] | None = None

    def batch_start(self, global_step: int) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.seconds += now - self._last[0]
            self.steps += global_step - self._last[1]
        self._last = (now, global_step)

    def pause(self) -> None:
        """The stretch ends: the time until the next batch start is not training."""
        self._last = None

    def in_steps(self, seconds: float) -> float | None:
        """``seconds`` in units of the mean training step (None before a step is timed)."""
        return seconds * self.steps / self.seconds if self.steps > 0 and self.seconds > 0 else None
