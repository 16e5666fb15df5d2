"""Both callbacks under Lightning's DDP (2 CPU processes, gloo, in-process ``ddp_spawn``)
log what one process logs, with uneven shards, the probe's own NFK fit (epoch 0) and the
spectrum callback's (epoch 1), and uneven validation shards (``max_val`` = 3). A rank
without rows (fewer rows than processes; the probe refuses fewer than two classes, so it
takes three processes) is tested on the gather itself in tests/callbacks/test_probe_inputs.py.
The command-line runs users make are in tests/cli/test_multiprocess.py."""

from __future__ import annotations

import csv

import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger

from lightning_nfk.callbacks import LinearProbeCallback, NFKSpectrumCallback
from tests.helpers.data import RandomImageDataModule
from tests.helpers.lightning import tiny_classifier
from tests.helpers.processes import TIMINGS, child_watchdog


def _fit_frozen(tmp_path, devices: int, callbacks: list) -> None:
    """Two epochs of two batches on ``devices`` CPU processes (``ddp_spawn``), CSV logs in
    ``tmp_path/logs``. lr = 0 and no BatchNorm: the weights are the same whatever the
    world size."""
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        limit_train_batches=2,
        limit_val_batches=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=CSVLogger(tmp_path, name="logs"),
        callbacks=callbacks,
    )
    with child_watchdog(240, f"the {devices}-process ddp_spawn run"):
        trainer.fit(tiny_classifier(batch_norm=False, lr=0.0), RandomImageDataModule(batch_size=16))


def _run(tmp_path, devices: int) -> dict[str, float]:
    pl.seed_everything(0)
    callbacks = [
        # odd: uneven shards; every 2nd epoch: at epoch 0 the probe makes its own NFK fit
        NFKSpectrumCallback(k=4, oversample=6, n_iter=3, probe_size=101, every_n_epochs=2),
        # max_val = 3: validation shards of 2 and 1 rows
        LinearProbeCallback(max_train=203, max_val=3, k=4, oversample=6, n_iter=3, nfk_fit_size=64),
    ]
    _fit_frozen(tmp_path, devices, callbacks)
    with open(f"{tmp_path}/logs/version_0/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for row in rows:
        for key, value in row.items():
            if value and key.startswith(("nfk/", "probe/")) and key not in TIMINGS:
                out[f"{key}@{row['epoch']}"] = float(value)
    return out


@pytest.fixture(scope="module")
def single_and_ddp(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback only: no interface guessing in the sandbox
        return _run(tmp_path_factory.mktemp("one"), 1), _run(tmp_path_factory.mktemp("two"), 2)


def test_ddp_figures_equal_single_process(single_and_ddp):
    one, two = single_and_ddp
    assert set(one) == set(two)
    assert {"nfk/sigma_1@1", "probe/acc@0", "probe/acc@1", "probe/l2@1"} <= set(one)
    for key, value in one.items():
        # float32 sums over 101 probe rows split 50/51: round-off well below 101 * eps32;
        # the drift is ~0 (lr = 0: the same weights at both epochs), hence the absolute part
        assert two[key] == pytest.approx(value, rel=2e-5, abs=1e-5), key


def _step_run(tmp_path, devices: int) -> dict[int, dict[str, float]]:
    """step -> the nfk/ scalars of a warm-started, log-scheduled step monitor (CSV rows)."""
    pl.seed_everything(0)
    cb = NFKSpectrumCallback(
        k=4,
        oversample=6,
        n_iter=4,
        probe_size=101,
        strategy="blocked",
        every_n_train_steps=1,
        schedule="log",  # steps 1, 2, 4
        warm_start=True,
        blocks="auto",  # per-block sketches: their products reduced across ranks too
        plot=False,
    )
    _fit_frozen(tmp_path, devices, [cb])
    with open(f"{tmp_path}/logs/version_0/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("nfk/sigma_1")]
    return {
        int(r["step"]): {k: float(v) for k, v in r.items() if k.startswith("nfk/") and v}
        for r in rows
    }


def test_step_schedule_and_warm_starts_under_ddp(tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GLOO_SOCKET_IFNAME", "lo")
        one, two = _step_run(tmp_path / "one", 1), _step_run(tmp_path / "two", 2)
    # fits after global steps 1, 2, 4: rows at Lightning's x position of those batches
    assert sorted(one) == sorted(two) == [0, 1, 3]
    for step in (1, 3):  # lr = 0: the same operator, so the warm start is the answer
        assert one[step]["nfk/products"] <= 2 and two[step]["nfk/products"] <= 2
    for step, figures in one.items():
        # each fit within its residual of the truth; float32 sums over 101 rows on top
        bound = figures["nfk/residual"] + two[step]["nfk/residual"] + 1e-4
        for key in ("nfk/sigma_1", "nfk/explained_variance", "nfk/effective_rank"):
            assert two[step][key] == pytest.approx(figures[key], rel=bound), (step, key)
        # the blocks' cold sketches are the same draws on one and two processes: their
        # figures differ by the float32 order of the sums only
        blocks = [k for k in figures if k.startswith("nfk/block/")]
        # conv, linear, linear (no BatchNorm), 4 figures each (and a residual where the
        # blocks got more than one pass: a warm fit that stopped at once gives them one)
        assert {k.split("/")[2] for k in blocks} == {"0", "4", "6"}
        assert len([k for k in blocks if not k.endswith("/residual")]) == 3 * 4
        # (a residual is a difference of nearly equal numbers: compared for its size only)
        for key in [k for k in blocks if not k.endswith("/residual")]:
            assert two[step][key] == pytest.approx(figures[key], rel=1e-4), (step, key)
