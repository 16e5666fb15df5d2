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
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch

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
# lr = 0: the weights stay as initialised whatever the number of processes (DDP averages
# gradients over a different global batch), so the NFK figures must agree.
FROZEN = ["--model.optimizer.init_args.lr=0", "--trainer.max_epochs=2"]
TWO = ["--trainer.accelerator=cpu", "--trainer.devices=2"]
TRAIN = ["--trainer.max_epochs=3"]  # the recipe's optimizer: real training


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

    def __init__(
        self,
        args: list[str],
        cwd: Path,
        *,
        launcher: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``launcher``: what goes before the command (``torchrun ... --no-python``);
        ``env``: variables added to the environment (a SLURM task's)."""
        self.args = args
        self.proc = subprocess.Popen(
            [*launcher, *command(), *args],
            cwd=cwd,
            env={**environment(), **(env or {})},
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


def run_cli(args: list[str], cwd: Path, timeout: float = 240, launcher: Sequence[str] = ()) -> Run:
    """Run ``lightning-nfk ARGS`` (after ``launcher``) to completion under the watchdog; fail
    on a non-zero status or on processes left behind."""
    run = Run(args, cwd, launcher=launcher)
    rc = run.wait(timeout)
    assert rc == 0, f"`lightning-nfk {' '.join(args)}` exited with {rc}:\n{run.output[-4000:]}"
    assert run.wait_group_gone(30), "processes of the run outlived it"
    return run


def wait_for_epoch(ckpt_dir: Path, epoch: int, run: Run, timeout: float = 240) -> None:
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


def wait_for_nfk_fit(run: Run, timeout: float = 120) -> None:
    """Until the spectrum callback's next fit reports progress (after ``wait_for_epoch``:
    the fit of the following epoch has started)."""
    fits = run.output.count("NFK spectrum")
    deadline = time.monotonic() + timeout
    while run.output.count("NFK spectrum") == fits and time.monotonic() < deadline:
        time.sleep(0.01)
    if run.output.count("NFK spectrum") == fits:
        run.kill_group()
        pytest.fail(f"watchdog: no NFK fit started in {timeout} s:\n{run.output[-3000:]}")


# wall times: they differ between any two runs
TIMINGS = ("nfk/seconds", "nfk/cost_in_steps")


def logged_metrics(version_dir: Path) -> dict[str, float]:
    """``name@epoch`` -> value of every nfk/ and probe/ scalar in a CSVLogger's metrics.csv
    (the ``TIMINGS`` left out)."""
    with open(version_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for row in rows:
        for key, value in row.items():
            if value and key.startswith(("nfk/", "probe/")) and key not in TIMINGS:
                out[f"{key}@{row['epoch']}"] = float(value)
    return out


def fit_quickstart(
    tmp: Path, *extra: str, timeout: float = 240, launcher: Sequence[str] = ()
) -> dict[str, float]:
    """Run the quickstart (``SMALL``, both loggers) in ``tmp``; check the spectrum plots of
    epochs 0 and 1 and the TensorBoard events; return the logged nfk/ and probe/ figures."""
    (tmp / "loggers.yaml").write_text(BOTH_LOGGERS)
    args = ["fit", "--config", str(QUICKSTART), "--config", "loggers.yaml", *SMALL, *extra]
    run_cli(args, tmp, timeout, launcher)
    version = tmp / "lightning_logs" / "quickstart" / "version_0"
    for epoch in (0, 1):  # the spectrum plots of every epoch, written by rank zero
        assert (version / "nfk_spectrum" / f"epoch={epoch:03d}.png").stat().st_size > 0
    events = list((tmp / "lightning_logs" / "quickstart_tb" / "version_0").glob("events.*"))
    assert events and events[0].stat().st_size > 0
    return logged_metrics(version)


def assert_same_figures(one: dict[str, float], two: dict[str, float]) -> None:
    """The nfk/ and probe/ figures of a 2-process run of the quickstart with frozen weights
    (``lr = 0``) equal those of one process, to round-off."""
    assert set(two) == set(one)
    assert {"nfk/sigma_1@1", "nfk/subspace_drift@1", "probe/acc@1"} <= set(two)
    for key, value in one.items():
        if key.startswith("nfk/"):
            # float32 sums over the 1024 probe rows, grouped differently on 1 and 2 ranks
            # (and other kernel shapes per chunk): round-off below 1024 * eps32 = 1.2e-4 of
            # the value; the drift is ~0 (same weights both epochs), hence the absolute part.
            assert two[key] == pytest.approx(value, rel=1.2e-4, abs=1e-4), key
        elif not key.startswith("probe/l2"):
            # accuracies of a probe on features equal to round-off: at most 2 of the 500
            # validation images may sit on a decision boundary within round-off.
            assert two[key] == pytest.approx(value, abs=2 / 500 + 1e-9), key


def free_port() -> int:
    """A free TCP port on loopback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    """A gloo process group with a TCP rendezvous on loopback, as Lightning's DDP does (a
    file store's locks proved flaky in this sandbox: one CI run aborted in gloo)."""
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )


def run_two_gloo(worker, out_dir, seconds: float, what: str) -> None:
    """``worker(rank, world, port, out_dir)`` on two spawned gloo processes, under
    :func:`child_watchdog`."""
    import torch.multiprocessing as mp

    with child_watchdog(seconds, what):
        mp.start_processes(
            worker, args=(2, free_port(), str(out_dir)), nprocs=2, join=True, start_method="spawn"
        )
