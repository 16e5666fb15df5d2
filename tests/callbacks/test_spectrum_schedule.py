"""NFKSpectrumCallback on the training's clock: step and log-spaced schedules, the cost of
a fit in training steps, warm starts, the spectrum heatmap, and nfk/* and probe/* scalars
monitored by ModelCheckpoint and EarlyStopping through the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.loggers import CSVLogger

from lightning_nfk.callbacks import LinearProbeCallback, NFKSpectrumCallback
from lightning_nfk.callbacks.schedule import FitSchedule, StepClock
from lightning_nfk.cli import build_cli, recipe_path
from tests.cli.test_recipes import _small
from tests.helpers.data import RandomImageDataModule
from tests.helpers.lightning import quick_trainer, tiny_classifier

CB = {"k": 4, "oversample": 6, "n_iter": 2, "probe_size": 96}


def _fit(tmp_path, cb, max_epochs=2, **kw) -> pl.Trainer:
    pl.seed_everything(0)
    logger = CSVLogger(tmp_path, name="logs")
    trainer = quick_trainer(tmp_path, [cb], max_epochs=max_epochs, logger=logger, **kw)
    trainer.fit(tiny_classifier(), RandomImageDataModule(batch_size=32))
    return trainer


# -- the schedule -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spacing", "every", "points"),
    [
        ("linear", 1, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
        ("linear", 3, [3, 6, 9]),
        ("log", 1, [1, 2, 4, 8]),
        ("log", 3, [3, 6]),
    ],
)
def test_schedule_points(spacing, every, points):
    s = FitSchedule("step", every, spacing)
    assert [c for c in range(1, 11) if s.due(c - 1, c)] == points
    # a counter that jumps by two (a GAN's two optimizer steps per batch) meets each point
    # in the stretch that holds it, once
    jumps = [c for c in range(2, 11, 2) if s.due(c - 2, c)]
    assert jumps == sorted({2 * ((p + 1) // 2) for p in points})


def test_schedule_arguments():
    assert FitSchedule.from_arguments(None, None, "linear") == FitSchedule("epoch", 1)
    assert FitSchedule.from_arguments(None, 50, "log") == FitSchedule("step", 50, "log")
    assert FitSchedule("step", 50, "log").describe() == "at 50 x 1, 2, 4, 8, ... steps"
    assert FitSchedule("epoch", 1).describe() == "every epoch"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"every_n_epochs": 2, "every_n_train_steps": 10},
            ValueError,
            r"`every_n_epochs` and `every_n_train_steps` are exclusive, got 2 and 10",
        ),
        ({"every_n_train_steps": 0}, ValueError, r"`every_n_train_steps` must be >= 1, got 0"),
        ({"every_n_train_steps": 2.5}, TypeError, r"`every_n_train_steps` must be an int"),
        ({"schedule": "cosine"}, ValueError, r"`schedule` must be 'linear' or 'log', got 'cosine'"),
        ({"warm_start": 1}, TypeError, r"`warm_start` must be a bool, got 1"),
        ({"tol": -1e-3}, ValueError, r"`tol` must be a finite number > 0 or None, got -0.001"),
    ],
    ids=["both", "zero", "float", "spacing", "warm", "tol"],
)
def test_invalid_schedules(kwargs, error, match):
    with pytest.raises(error, match=match):
        NFKSpectrumCallback(**kwargs)


def test_step_clock_counts_optimizer_steps_and_leaves_out_what_is_not_training():
    clock = StepClock()
    assert clock.in_steps(1.0) is None  # no step timed yet
    for step in (0, 2, 4):  # a GAN: two optimizer steps per batch
        clock.batch_start(step)
    clock.pause()  # e.g. a fit: the time until the next batch is not training
    for step in (6, 6, 7):  # gradient accumulation: a batch without a step, then one
        clock.batch_start(step)
    assert clock.steps == 2 + 2 + 0 + 1
    # two stretches: the clock's seconds are the time inside them only
    assert clock.in_steps(2.0) == pytest.approx(2.0 * 5 / clock.seconds)


# -- in a trainer -----------------------------------------------------------------------------
def test_every_n_train_steps_logs_per_step(tmp_path):
    cb = NFKSpectrumCallback(**CB, every_n_train_steps=3)
    trainer = _fit(tmp_path, cb)  # 2 epochs of 4 batches: steps 1..8
    assert [h["step"] for h in cb.history] == [3, 6]
    assert [h["epoch"] for h in cb.history] == [0, 1]
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("nfk/sigma_1")]
    # written at once, whatever `log_every_n_steps` (50), at the x position Lightning gives
    # the same batch's own values (its steps before it: 2 and 5)
    assert [int(r["step"]) for r in rows] == [2, 5]
    out = Path(trainer.logger.log_dir) / "nfk_spectrum"
    assert sorted(p.name for p in out.glob("*.png")) == [
        "heatmap.png",
        "step=0000003.png",
        "step=0000006.png",
    ]
    assert (out / "heatmap.png").stat().st_size > 5000


def test_log_schedules(tmp_path):
    steps = NFKSpectrumCallback(**CB, every_n_train_steps=1, schedule="log", plot=False)
    _fit(tmp_path / "steps", steps)
    assert [h["step"] for h in steps.history] == [1, 2, 4, 8]
    epochs = NFKSpectrumCallback(**CB, schedule="log", plot=False)
    _fit(tmp_path / "epochs", epochs, max_epochs=5)
    assert [h["epoch"] for h in epochs.history] == [0, 1, 3]


def test_cost_in_steps_counts_training_steps_only(tmp_path):
    cb = NFKSpectrumCallback(**CB, plot=False)
    trainer = _fit(tmp_path, cb)
    # each epoch's 4 batch starts time 3 steps: the epoch end, validation and the fit are
    # left out
    assert cb._clock.steps == 2 * 3
    m = trainer.callback_metrics
    cost = m["nfk/seconds"].item() * cb._clock.steps / cb._clock.seconds
    assert m["nfk/cost_in_steps"].item() == pytest.approx(cost, rel=1e-5)
    assert [("nfk/cost_in_steps" in h) for h in cb.history] == [True, True]


def test_warm_starts_take_fewer_passes_for_the_same_spectrum(tmp_path):
    # the training is the same with either callback (tested bit for bit elsewhere): the
    # two runs fit the same weights at the same steps
    options = {**CB, "n_iter": 6, "every_n_train_steps": 1, "plot": False, "strategy": "blocked"}
    cold, warm = NFKSpectrumCallback(**options), NFKSpectrumCallback(**options, warm_start=True)
    _fit(tmp_path / "cold", cold, max_epochs=1)
    _fit(tmp_path / "warm", warm, max_epochs=1)
    assert [h["step"] for h in warm.history] == [1, 2, 3, 4]
    assert [h["nfk/products"] for h in cold.history] == [7.0] * 4
    assert warm.history[0]["nfk/products"] == 7.0  # the first fit is cold
    assert sum(h["nfk/products"] for h in warm.history) < sum(
        h["nfk/products"] for h in cold.history
    )
    n, eps32 = CB["probe_size"], torch.finfo(torch.float32).eps
    for hc, hw in zip(cold.history[1:], warm.history[1:]):
        # the top eigenvalue of both fits is within its residual of the truth; float32
        # round-off of the sums over n probe rows on top
        s_c, s_w = hc["nfk/sigma_1"] ** 2, hw["nfk/sigma_1"] ** 2
        bound = hc["nfk/residual"] + hw["nfk/residual"] + n * eps32
        assert abs(s_w - s_c) / s_c <= bound, (hc["step"], s_w, s_c, bound)


def test_warm_start_needs_a_randomized_strategy(tmp_path):
    with pytest.raises(ValueError, match=r"`strategy`='dense' does not run \(it is exact\)"):
        NFKSpectrumCallback(warm_start=True, strategy="dense")
    # `auto` picks dense for this small probe set: said once, and the fits stay exact
    cb = NFKSpectrumCallback(**CB, warm_start=True, plot=False)
    with pytest.warns(UserWarning, match=r"`strategy`='auto' chose 'dense'"):
        _fit(tmp_path, cb)
    assert [h["nfk/products"] for h in cb.history] == [0.0, 0.0]


def test_probe_refuses_to_share_a_step_scheduled_fit(tmp_path):
    spectrum = NFKSpectrumCallback(**CB, every_n_train_steps=2, plot=False)
    probe = LinearProbeCallback(nfk_source="spectrum", k=4, max_train=64, max_val=32)
    trainer = quick_trainer(tmp_path, [spectrum, probe])
    with pytest.raises(ValueError, match=r"fits every 2 steps\. Cure: give it `every_n_epochs`"):
        trainer.fit(tiny_classifier(), RandomImageDataModule(batch_size=32))


# -- monitored through the CLI ----------------------------------------------------------------
def test_checkpoint_and_early_stopping_monitor_nfk_and_probe_scalars(tmp_path):
    config = _small(yaml.safe_load(recipe_path("quickstart").read_text()), tmp_path)
    config["trainer"].update(max_epochs=4, limit_train_batches=2)
    config["trainer"]["callbacks"] += [
        {
            "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
            "init_args": {
                "monitor": "nfk/effective_rank",  # a label-free choice of checkpoint
                "mode": "max",
                "filename": "rank-{epoch}",
            },
        },
        {
            "class_path": "pytorch_lightning.callbacks.EarlyStopping",
            # no gain of a whole point is possible: stops at the second probe
            "init_args": {"monitor": "probe/acc", "mode": "max", "patience": 0, "min_delta": 1.0},
        },
    ]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["fit", "--config", str(path)])
    (spectrum,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, NFKSpectrumCallback)]
    assert [h["epoch"] for h in spectrum.history] == [0, 1]  # stopped early, after epoch 1
    (best,) = [cb for cb in cli.trainer.checkpoint_callbacks if cb.monitor == "nfk/effective_rank"]
    ranks = [h["nfk/effective_rank"] for h in spectrum.history]
    assert best.best_model_score.item() == pytest.approx(max(ranks), rel=1e-6)
    assert Path(best.best_model_path).name == f"rank-epoch={ranks.index(max(ranks))}.ckpt"
