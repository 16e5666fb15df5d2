"""Launchers other than Lightning's own: ``torchrun`` and SLURM (emulated on this machine),
with the quickstart recipe through ``lightning-nfk fit`` on 2 CPU processes (gloo).

* ``torchrun --nproc_per_node=2`` logs what one process logs.
* Slow: SIGINT and SIGTERM during an NFK fit, delivered as torchrun and SLURM deliver them,
  end the run cleanly within the agent's grace period, ``last.ckpt`` intact. torchrun's
  elastic agent starts each worker in a session of its own and forwards the signals it gets
  (Ctrl-C in a terminal reaches the agent alone); SLURM signals every process of the job
  step, so each worker gets the signal twice: directly, then from the agent (and when only
  some processes get it directly, the ranks get different numbers of copies).
* Slow: SLURM's requeue signal (SIGUSR1) during an NFK fit, with Lightning's SLURM
  environment emulated (two tasks started by hand with a task's variables, a fake
  ``scontrol``): held, then honoured on both ranks when the fit ends (Lightning saves its
  ``hpc_ckpt`` and requeues the job); the run goes on to its end.

torchrun's workers are not in the watchdog's process group: every descendant of the test
is recorded while a run lives, and the test fails (after killing them) if any outlive it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers.processes import (
    FROZEN,
    QUICKSTART,
    SMALL,
    TRAIN,
    TWO,
    Run,
    _descendants,
    assert_same_figures,
    fit_quickstart,
    free_port,
    wait_for_epoch,
    wait_for_nfk_fit,
)

# `--standalone`: a rendezvous on a free local port; `--no-python`: the console script
TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node=2",
    "--no-python",
]
AGENT_GRACE = 30  # s: torchrun's default shutdown_timeout, after which it sends SIGKILL


def _cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return None


@contextlib.contextmanager
def _no_leftovers() -> Iterator[None]:
    """Record every descendant of this test while the block runs; afterwards, kill those
    still alive and fail if there were any (torchrun's workers live in sessions of their
    own, out of reach of the watchdog that kills the agent's group)."""
    seen: dict[int, str] = {}
    done = threading.Event()
    # this test process's own helpers from earlier tests (multiprocessing's resource
    # tracker) are not the run's
    earlier = set(_descendants(os.getpid()))

    def watch() -> None:
        while not done.is_set():
            for pid in set(_descendants(os.getpid())) - earlier:
                cmd = _cmdline(pid)
                if cmd is not None:
                    seen.setdefault(pid, cmd)
            done.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        deadline = time.monotonic() + AGENT_GRACE
        alive = dict(seen)
        while alive and time.monotonic() < deadline:
            alive = {pid: cmd for pid, cmd in alive.items() if _cmdline(pid) == cmd}
            time.sleep(0.2)
        done.set()
        watcher.join(5)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if alive and not failed:
            pytest.fail(f"processes outlived the run: {sorted(alive.values())}")


def _workers(agent: int) -> list[int]:
    """The direct children of torchrun's agent: one worker per rank."""
    children: list[int] = []
    for task in Path(f"/proc/{agent}/task").glob("*"):
        with contextlib.suppress(OSError):
            children += [int(c) for c in (task / "children").read_text().split()]
    return children


def _wait_until_every_rank_fits(run: Run, timeout: float = 120) -> None:
    """After ``wait_for_nfk_fit``: until rank zero's bar counts examples, so that every rank
    has passed the fit's first sum and is inside the section (a signal that reaches a rank
    before its section meets Lightning's own handlers, as anywhere else in training)."""
    start = run.output.rfind("NFK spectrum")
    deadline = time.monotonic() + timeout
    progress = re.compile(r"NFK spectrum: [1-9]")
    while not progress.search(run.output, start) and time.monotonic() < deadline:
        assert run.proc.poll() is None, f"the run ended early:\n{run.output[-3000:]}"
        time.sleep(0.01)
    assert progress.search(run.output, start), run.output[-3000:]


def test_torchrun_logs_what_one_process_logs(one_process, tmp_path):
    with _no_leftovers():
        two = fit_quickstart(tmp_path, *FROZEN, *TWO, launcher=TORCHRUN)
    assert_same_figures(one_process, two)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "target"),
    [
        (signal.SIGINT, "agent"),
        (signal.SIGTERM, "agent"),
        (signal.SIGINT, "every-process"),
        (signal.SIGTERM, "every-process"),
        (signal.SIGTERM, "one-worker"),
    ],
    ids=[
        "ctrl-c-to-agent",
        "sigterm-to-agent",
        "sigint-to-every-process",
        "sigterm-to-every-process",
        "sigterm-twice-on-one-worker",
    ],
)
def test_torchrun_interrupt_during_nfk_fit_ends_cleanly(tmp_path, sig, target):
    args = ["fit", "--config", str(QUICKSTART), *SMALL, *TRAIN, *TWO]
    ckpt = tmp_path / "lightning_logs" / "quickstart" / "version_0" / "checkpoints"
    with _no_leftovers():
        run = Run(args, tmp_path, launcher=TORCHRUN)
        wait_for_epoch(ckpt, 0, run)
        wait_for_nfk_fit(run)  # the spectrum fit of epoch 1 has started
        _wait_until_every_rank_fits(run)
        workers = _workers(run.proc.pid)
        assert len(workers) == 2, workers
        if target != "agent":
            # SLURM (scancel, the time limit) signals every process; or one rank gets it
            # twice and the other once
            for pid in workers if target == "every-process" else workers[-1:]:
                os.kill(pid, sig)
            # two copies close together reach a Python handler once: let the first be
            # handled before the agent forwards the second
            time.sleep(0.5)
        run.proc.send_signal(sig)  # the agent, which forwards it to the workers
        run.wait(AGENT_GRACE + 60, "interrupted torchrun run")
        assert run.wait_group_gone(30), "a process of the agent's group outlived the run"
    # the workers stopped together at a pass boundary and ended by themselves: the agent
    # did not have to SIGKILL a rank left waiting in a collective (it would say so)
    assert "Sending process" in run.output  # the agent's forwarding, logged
    assert "forcefully exiting" not in run.output, run.output[-3000:]
    # and no rank died of an error (torchrun prefixes a worker's traceback with [rankN]:),
    # as one does when its peer raises in the middle of a collective
    assert re.search(r"\[rank\d+\]:", run.output) is None, run.output[-3000:]
    if sig == signal.SIGINT:
        assert "Detected KeyboardInterrupt, attempting graceful shutdown" in run.output
    state = torch.load(ckpt / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 0  # the last finished epoch, intact
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values())


def _slurm_task(rank: int, port: int, bin_dir: Path) -> dict[str, str]:
    """The variables ``srun --ntasks-per-node=2`` gives task ``rank`` of job 4242 (what
    Lightning's SLURMEnvironment reads), and a PATH where ``scontrol`` is the fake."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "nfk-test",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }


@pytest.mark.slow
def test_slurm_requeue_signal_during_nfk_fit_is_honoured_after_it(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    args = ["fit", "--config", str(QUICKSTART), *SMALL, *TRAIN, *TWO]
    ckpt = tmp_path / "lightning_logs" / "quickstart" / "version_0" / "checkpoints"
    port = free_port()
    runs = [Run(args, tmp_path, env=_slurm_task(rank, port, bin_dir)) for rank in range(2)]
    try:
        wait_for_epoch(ckpt, 0, runs[0])
        wait_for_nfk_fit(runs[0])  # the spectrum fit of epoch 1 has started
        _wait_until_every_rank_fits(runs[0])
        for run in runs:  # SLURM's `--signal=USR1@...`: every task of the step
            run.proc.send_signal(signal.SIGUSR1)
        codes = [run.wait(240, f"SLURM task {rank}") for rank, run in enumerate(runs)]
        assert all(run.wait_group_gone(30) for run in runs), "a task outlived the run"
    finally:
        for run in runs:
            run.kill_group()
    output = runs[0].output
    assert codes == [0, 0], output[-3000:]  # the requeue signal does not stop the run
    assert "Handling auto-requeue signal" in output
    # rank zero requeued the job once
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 4242"]
    # Lightning's handler saved its checkpoint on both ranks together once the spectrum
    # fit of epoch 1 had ended (held: a handler run mid-fit would save history [0], or
    # leave one rank's collectives unmatched)
    hpc = torch.load(tmp_path / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert hpc["epoch"] == 1
    spectrum = next(v for k, v in hpc["callbacks"].items() if k.startswith("NFKSpectrum"))
    assert [h["epoch"] for h in spectrum["history"]] == [0, 1]
    assert all(torch.isfinite(t).all() for t in hpc["state_dict"].values())
    last = torch.load(ckpt / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2  # and the run went on to its end
