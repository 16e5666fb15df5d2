"""What users run: the quickstart recipe through ``lightning-nfk fit``, on 1 and 2 CPU
processes (the ``ddp`` subprocess launcher and ``ddp_spawn``), with its defaults: plots,
progress bars, CSV and TensorBoard loggers, both callbacks, uneven shards. Every run is
under a watchdog (tests/helpers/processes.py): a hang kills the process group and fails.

Slow tests: a run killed with SIGKILL between epochs and resumed with ``--ckpt_path last``
logs what an uninterrupted run logs; SIGTERM and Ctrl-C during an NFK fit end the run
cleanly.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.processes import (
    FROZEN,
    QUICKSTART,
    SMALL,
    TIMINGS,
    TRAIN,
    TWO,
    Run,
    assert_same_figures,
    fit_quickstart,
    logged_metrics,
    run_cli,
    wait_for_epoch,
    wait_for_nfk_fit,
)

# one_process (tests/cli/conftest.py): the same run on one process, shared with
# test_launchers.py


# ddp_spawn with the slow tests (CI runs them): the default run keeps Lightning's launcher
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("ddp_spawn", marks=pytest.mark.slow)])
def test_two_processes_log_what_one_logs(one_process, tmp_path, strategy):
    two = fit_quickstart(tmp_path, *FROZEN, *TWO, f"--trainer.strategy={strategy}")
    assert_same_figures(one_process, two)


# -- resume and interrupts (slow) ----------------------------------------------------------


def _histories(checkpoint: Path) -> dict[str, list[dict]]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    out = {}
    for key, value in state["callbacks"].items():
        if key.startswith(("NFKSpectrumCallback", "LinearProbeCallback")):
            out[key.split("{")[0]] = value["history"]
    assert state["epoch"] == 2 and len(out) == 2
    return out


def _same_history(a: list[dict], b: list[dict]) -> None:
    assert [h["epoch"] for h in a] == [h["epoch"] for h in b] == [0, 1, 2]
    for ha, hb in zip(a, b):
        for key, value in ha.items():
            if key in (*TIMINGS, "epoch"):
                continue
            # the same computation on the same machine and process count, resumed from the
            # checkpointed weights and optimizer state: equal to round-off at most
            assert hb[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (ha["epoch"], key)


def _logged_so_far(version: Path) -> dict[str, float]:
    try:
        return logged_metrics(version)
    except (OSError, ValueError):  # not written yet, or a row being written
        return {}


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2], ids=["one-process", "two-processes"])
def test_killed_run_resumes_with_the_same_history(tmp_path, devices):
    parallel = [*TWO, "--trainer.strategy=ddp"] if devices == 2 else []
    base = ["fit", "--config", str(QUICKSTART), *SMALL, *TRAIN, *parallel]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir(), broken.mkdir()
    run_cli(base, whole)
    ckpt = Path("lightning_logs/quickstart/version_0/checkpoints")

    run = Run(base, broken)
    wait_for_epoch(broken / ckpt, 1, run)
    # the checkpoint of an epoch is saved before Lightning writes its epoch-end figures to
    # metrics.csv: wait for those too, so that the kill falls in epoch 2
    version = broken / "lightning_logs" / "quickstart" / "version_0"
    deadline = time.monotonic() + 120
    while not any(k.endswith("@1") for k in _logged_so_far(version)):
        assert time.monotonic() < deadline, "epoch 1's figures never reached metrics.csv"
        time.sleep(0.05)
    run.kill_group(signal.SIGKILL)  # mid-training: epoch 2 has started
    assert run.wait(60) == -signal.SIGKILL
    run_cli([*base, "--ckpt_path", "last"], broken)

    expected = _histories(whole / ckpt / "last.ckpt")
    resumed = _histories(broken / ckpt / "last.ckpt")
    for name, history in expected.items():
        _same_history(history, resumed[name])
    # the resumed run continued its own folder (no new version) and logged epoch 2 there
    runs = broken / "lightning_logs" / "quickstart"
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == ["version_0"]
    logged = logged_metrics(runs / "version_0")
    # the epochs logged before the kill are kept: the resumed run appends epoch 2
    assert {"0", "1", "2"} <= {key.split("@")[1] for key in logged}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "target"),
    [(signal.SIGTERM, "launcher"), (signal.SIGINT, "group")],
    ids=["sigterm-to-launcher", "ctrl-c-to-group"],
)
def test_interrupt_during_nfk_fit_ends_cleanly(tmp_path, sig, target):
    args = ["fit", "--config", str(QUICKSTART), *SMALL, *TRAIN, *TWO, "--trainer.strategy=ddp"]
    run = Run(args, tmp_path)
    ckpt = tmp_path / "lightning_logs" / "quickstart" / "version_0" / "checkpoints"
    wait_for_epoch(ckpt, 0, run)
    wait_for_nfk_fit(run)  # the spectrum fit of epoch 1 has started
    if target == "launcher":
        run.proc.send_signal(sig)  # `kill PID` of the command a user started
    else:
        run.kill_group(sig)  # Ctrl-C in a terminal reaches the whole foreground group
    rc = run.wait(90, "interrupted run")
    # every rank stops at the same pass boundary: Lightning's graceful shutdown for Ctrl-C (1),
    # 128 + SIGTERM for SIGTERM
    assert rc == (143 if sig == signal.SIGTERM else 1), run.output[-3000:]
    assert run.wait_group_gone(30), "a rank outlived the interrupted run"
    state = torch.load(ckpt / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 0  # the last finished epoch, intact
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values())
