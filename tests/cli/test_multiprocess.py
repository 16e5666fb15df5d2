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
    BOTH_LOGGERS,
    QUICKSTART,
    SMALL,
    Run,
    logged_metrics,
    run_cli,
)

# lr = 0: the weights stay as initialised whatever the number of processes (DDP averages
# gradients over a different global batch), so the NFK figures must agree.
FROZEN = ["--model.optimizer.init_args.lr=0", "--trainer.max_epochs=2"]
TWO = ["--trainer.accelerator=cpu", "--trainer.devices=2"]


def _fit(tmp: Path, *extra: str, timeout: float = 240) -> dict[str, float]:
    (tmp / "loggers.yaml").write_text(BOTH_LOGGERS)
    args = ["fit", "--config", str(QUICKSTART), "--config", "loggers.yaml", *SMALL, *extra]
    run_cli(args, tmp, timeout)
    version = tmp / "lightning_logs" / "quickstart" / "version_0"
    for epoch in (0, 1):  # the spectrum plots of every epoch, written by rank zero
        assert (version / "nfk_spectrum" / f"epoch={epoch:03d}.png").stat().st_size > 0
    events = list((tmp / "lightning_logs" / "quickstart_tb" / "version_0").glob("events.*"))
    assert events and events[0].stat().st_size > 0
    return logged_metrics(version)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, float]:
    return _fit(tmp_path_factory.mktemp("one"), *FROZEN)


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_two_processes_log_what_one_logs(one_process, tmp_path, strategy):
    two = _fit(tmp_path, *FROZEN, *TWO, f"--trainer.strategy={strategy}")
    assert set(two) == set(one_process)
    assert {"nfk/sigma_1@1", "nfk/subspace_drift@1", "probe/acc@1"} <= set(two)
    for key, value in one_process.items():
        if key.startswith("nfk/"):
            # float32 sums over the 1024 probe rows, grouped differently on 1 and 2 ranks
            # (and other kernel shapes per chunk): round-off below 1024 * eps32 = 1.2e-4 of
            # the value; the drift is ~0 (same weights both epochs), hence the absolute part.
            assert two[key] == pytest.approx(value, rel=1.2e-4, abs=1e-4), key
        elif not key.startswith("probe/l2"):
            # accuracies of a probe on features equal to round-off: at most 2 of the 500
            # validation images may sit on a decision boundary within round-off.
            assert two[key] == pytest.approx(value, abs=2 / 500 + 1e-9), key


# -- resume and interrupts (slow) ----------------------------------------------------------
TRAIN = ["--trainer.max_epochs=3"]  # the recipe's optimizer: real training


def _histories(checkpoint: Path) -> dict[str, list[dict]]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    out = {}
    for key, value in state["callbacks"].items():
        if key.startswith(("NFKSpectrumCallback", "LinearProbeCallback")):
            out[key.split("{")[0]] = value["history"]
    assert state["epoch"] == 2 and len(out) == 2
    return out


def _wait_for_epoch(ckpt_dir: Path, epoch: int, run: Run, timeout: float = 240) -> None:
    """Until last.ckpt holds the end of ``epoch`` (the run goes on into the next one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.proc.poll() is None, f"the run ended early:\n{run.output[-3000:]}"
        if list(ckpt_dir.glob(f"epoch={epoch}-*.ckpt")) and (ckpt_dir / "last.ckpt").exists():
            try:
                state = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
                if state["epoch"] == epoch:
                    return
            except Exception:  # being written
                pass
        time.sleep(0.05)
    run.kill_group()
    pytest.fail(f"watchdog: no checkpoint of epoch {epoch} in {timeout} s:\n{run.output[-3000:]}")


def _same_history(a: list[dict], b: list[dict]) -> None:
    assert [h["epoch"] for h in a] == [h["epoch"] for h in b] == [0, 1, 2]
    for ha, hb in zip(a, b):
        for key, value in ha.items():
            if key in ("nfk/seconds", "epoch"):
                continue
            # the same computation on the same machine and process count, resumed from the
            # checkpointed weights and optimizer state: equal to round-off at most
            assert hb[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (ha["epoch"], key)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2], ids=["one-process", "two-processes"])
def test_killed_run_resumes_with_the_same_history(tmp_path, devices):
    parallel = [*TWO, "--trainer.strategy=ddp"] if devices == 2 else []
    base = ["fit", "--config", str(QUICKSTART), *SMALL, *TRAIN, *parallel]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir(), broken.mkdir()
    run_cli(base, whole)
    ckpt = Path("lightning_logs/quickstart/checkpoints")

    run = Run(base, broken)
    _wait_for_epoch(broken / ckpt, 1, run)
    run.kill_group(signal.SIGKILL)  # mid-training: epoch 2 has started
    assert run.wait(60) == -signal.SIGKILL
    run_cli([*base, "--ckpt_path", "last"], broken)

    expected = _histories(whole / ckpt / "last.ckpt")
    resumed = _histories(broken / ckpt / "last.ckpt")
    for name, history in expected.items():
        _same_history(history, resumed[name])
    # the resumed run logged epoch 2 only, into a new version
    logged = logged_metrics(broken / "lightning_logs" / "quickstart" / "version_1")
    assert {key.split("@")[1] for key in logged} == {"2"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "target"),
    [(signal.SIGTERM, "launcher"), (signal.SIGINT, "group")],
    ids=["sigterm-to-launcher", "ctrl-c-to-group"],
)
def test_interrupt_during_nfk_fit_ends_cleanly(tmp_path, sig, target):
    args = ["fit", "--config", str(QUICKSTART), *SMALL, *TRAIN, *TWO, "--trainer.strategy=ddp"]
    run = Run(args, tmp_path)
    ckpt = tmp_path / "lightning_logs" / "quickstart" / "checkpoints"
    _wait_for_epoch(ckpt, 0, run)
    fits = run.output.count("NFK spectrum")
    deadline = time.monotonic() + 120
    while run.output.count("NFK spectrum") == fits and time.monotonic() < deadline:
        time.sleep(0.01)  # until the spectrum fit of epoch 1 reports progress
    assert run.output.count("NFK spectrum") > fits, run.output[-3000:]
    if target == "launcher":
        run.proc.send_signal(sig)  # `kill PID` of the command a user started
    else:
        run.kill_group(sig)  # Ctrl-C in a terminal reaches the whole foreground group
    rc = run.wait(90, "interrupted run")
    # every rank stops at the end of the fit: Lightning's graceful shutdown for Ctrl-C (1),
    # 128 + SIGTERM for SIGTERM
    assert rc == (143 if sig == signal.SIGTERM else 1), run.output[-3000:]
    assert run.wait_group_gone(30), "a rank outlived the interrupted run"
    state = torch.load(ckpt / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 0  # the last finished epoch, intact
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values())
