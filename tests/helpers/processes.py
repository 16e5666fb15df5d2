"""Running the ``lightning-nfk`` command under a watchdog: a hang becomes a red test.

Every run starts in its own session (process group), so the watchdog can kill the launcher
and every rank it started, and tell whether any process outlived the run.
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
# The quickstart recipe as it is (its callbacks, plots, progress bars, CSV logger), on a
# small slice of Fashion-MNIST so that a run takes seconds: 2 training batches an epoch,
# 2000 training images (the spectrum's 1024-image probe set and the probe's training
# rows come from them) and 500 validation images.
SMALL = [
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--data.train_subset=2000",
    "--data.val_size=500",
]
BOTH_LOGGERS = """\
trainer:
  logger:
    - class_path: pytorch_lightning.loggers.CSVLogger
      init_args: {save_dir: lightning_logs, name: quickstart}
    - class_path: pytorch_lightning.loggers.TensorBoardLogger
      init_args: {save_dir: lightning_logs, name: quickstart_tb}
"""


def command() -> list[str]:
    """The console script users run (``python -m lightning_nfk`` where it is not installed)."""
    script = Path(sys.executable).with_name("lightning-nfk")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lightning_nfk"]


def environment() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo")
    env.pop("MASTER_PORT", None)  # each run picks a free port
    return env


class Run:
    """A ``lightning-nfk`` process in its own session; its output is collected in a thread."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [*command(), *args],
            cwd=cwd,
            env=environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pgid = self.proc.pid
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for chunk in iter(lambda: self.proc.stdout.read1(4096), b""):  # type: ignore[union-attr]
            self._chunks.append(chunk)

    @property
    def output(self) -> str:
        return b"".join(self._chunks).decode(errors="replace")

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, sig)

    def wait(self, timeout: float, what: str = "run") -> int:
        """The exit status; on a hang, kill the whole group and fail with the output's tail."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            self.proc.wait()
            self._reader.join(5)
            pytest.fail(
                f"watchdog: the {what} `lightning-nfk {' '.join(self.args)}` did not finish in "
                f"{timeout:.0f} s (a hang, e.g. a collective one rank never reached); its process "
                f"group was killed. Last output:\n{self.output[-4000:]}"
            )
        self._reader.join(5)
        return rc

    def wait_group_gone(self, timeout: float) -> bool:
        """Whether every process of the run's group ended within ``timeout`` (the rest are killed)."""
        deadline = time.monotonic() + timeout
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = self.group_alive()
        self.kill_group()
        return not alive


def _descendants(pid: int) -> list[int]:
    """Every descendant process of ``pid`` (Linux /proc)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                out += [int(child), *_descendants(int(child))]
    return out


@contextlib.contextmanager
def child_watchdog(seconds: float, what: str):
    """For multi-process tests that spawn from the test process (``mp.spawn``,
    ``ddp_spawn``): after ``seconds``, kill every descendant process; the waiting parent
    then gets an error, which becomes a failure naming the hang."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        for pid in _descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    message = f"watchdog: {what} did not finish in {seconds:.0f} s (a hang, e.g. a collective one rank never reached); its processes were killed."
    try:
        yield
    except BaseException:
        if fired.is_set():
            pytest.fail(message)
        raise
    finally:
        timer.cancel()
    if fired.is_set():
        pytest.fail(message)


def run_cli(args: list[str], cwd: Path, timeout: float = 240) -> Run:
    """Run ``lightning-nfk ARGS`` to completion under the watchdog; fail on a non-zero status
    or on processes left behind."""
    run = Run(args, cwd)
    rc = run.wait(timeout)
    assert rc == 0, f"`lightning-nfk {' '.join(args)}` exited with {rc}:\n{run.output[-4000:]}"
    assert run.wait_group_gone(30), "processes of the run outlived it"
    return run


def logged_metrics(version_dir: Path) -> dict[str, float]:
    """``name@epoch`` -> value of every nfk/ and probe/ scalar in a CSVLogger's metrics.csv
    (``nfk/seconds`` left out: a wall time)."""
    with open(version_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for row in rows:
        for key, value in row.items():
            if value and key.startswith(("nfk/", "probe/")) and key != "nfk/seconds":
                out[f"{key}@{row['epoch']}"] = float(value)
    return out
