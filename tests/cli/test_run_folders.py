"""Run folders: concurrent runs of one recipe never share a folder, ``--ckpt_path last``
means this recipe's newest run, and ``test`` refuses to evaluate nothing."""

from __future__ import annotations

import csv
import multiprocessing
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from lightning_nfk.cli import build_cli
from lightning_nfk.runs import (
    RunFolderError,
    claim_new_run,
    latest_checkpoint,
    lock_holder,
    lock_path,
    lock_run,
    resolve_checkpoint,
)
from tests.cli.test_recipes import RECIPES, _small
from tests.helpers.processes import QUICKSTART, SMALL, Run, run_cli

ONE_EPOCH = ["--trainer.max_epochs=1", "--trainer.accelerator=cpu"]


@pytest.mark.slow  # two CLI runs side by side: about a minute on 2 cores
def test_concurrent_runs_of_one_recipe_write_to_their_own_folders(tmp_path):
    """The user's report: two runs of the quickstart started together both wrote version_0
    (two rows per epoch in one metrics.csv, one config, overwritten plots) and split their
    checkpoints as last.ckpt / last-v1.ckpt in one folder."""
    args = ["fit", "--config", str(QUICKSTART), *SMALL, *ONE_EPOCH]
    runs = [Run([*args, f"--seed_everything={seed}"], tmp_path) for seed in (0, 1)]
    for run in runs:
        assert run.wait(300) == 0, run.output[-3000:]
    root = tmp_path / "lightning_logs" / "quickstart"
    assert sorted(p.name for p in root.iterdir()) == ["version_0", "version_1"]  # no lock left
    for run in runs:  # a fresh run's folder is empty when its logger opens it
        assert "will be deleted" not in run.output
    seeds = set()
    for version in root.iterdir():
        assert [p.name for p in (version / "checkpoints").glob("last*.ckpt")] == ["last.ckpt"]
        assert list((version / "nfk_spectrum").glob("epoch=000.png"))
        with open(version / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("nfk/sigma_1")]
        assert len(rows) == 1  # one spectrum row for its one epoch, not two runs' rows
        config = yaml.safe_load((version / "config.yaml").read_text())
        seeds.add(config["seed_everything"])
        assert not lock_path(version).exists()  # released when the run ended
        state = torch.load(version / "checkpoints" / "last.ckpt", weights_only=False)
        assert state["epoch"] == 0
    assert seeds == {0, 1}  # each folder holds its own run's settings

    # `test --ckpt_path last`: the newest run's checkpoint, logged to a new folder
    newest = latest_checkpoint(root)
    tested = run_cli(["test", "--config", str(QUICKSTART), *SMALL, "--ckpt_path", "last"], tmp_path)
    assert str(newest.relative_to(tmp_path)) in tested.output
    assert "test/acc" in tested.output
    assert (root / "version_2" / "metrics.csv").is_file()


@pytest.mark.slow  # 15 s on the 2-core EPYC: with the slow tests, which CI runs too
def test_test_with_no_checkpoint_is_an_error_not_an_untrained_accuracy(tmp_path):
    run = Run(["test", "--config", str(QUICKSTART), *SMALL, "--ckpt_path", "last"], tmp_path)
    assert run.wait(120) != 0
    assert "--ckpt_path last` found no checkpoint" in run.output
    assert "test/acc" not in run.output
    assert "Traceback" not in run.output  # one line, not a traceback


def _claim(root, queue) -> None:
    queue.put(claim_new_run(root))


def test_claimed_run_numbers_are_distinct_under_a_race(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(tmp_path, queue)) for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    numbers = sorted(queue.get(timeout=5) for _ in procs)
    assert numbers == list(range(8))


def _run_with_checkpoint(tmp_path, n: int = 0):
    run = tmp_path / "lightning_logs" / "quickstart" / f"version_{n}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    return run


def test_resuming_a_run_another_live_process_trains_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = _run_with_checkpoint(tmp_path)
    path = lock_path(run)
    holds = (
        "import fcntl, os, socket, sys, time\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, f'{os.getpid()} {socket.gethostname()}\\n'.encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    sleeper = subprocess.Popen([sys.executable, "-c", holds], stdout=subprocess.PIPE, text=True)
    try:
        assert sleeper.stdout.readline().strip() == "locked"
        assert lock_holder(run) == f"process {sleeper.pid} on {socket.gethostname()}"
        with pytest.raises(RunFolderError, match="is in use by process"):
            build_cli(["fit", "--config", str(QUICKSTART), "--ckpt_path", "last"])
        # a teacher_checkpoint naming the recipe's folder: not a run still training
        with pytest.raises(RunFolderError, match="still training"):
            resolve_checkpoint(run.parent, "`teacher_checkpoint`")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert path.exists() and lock_holder(run) is None  # the process was killed: stale
    assert resolve_checkpoint(run.parent, "x") == run / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("recipe", ["fashion_mnist_gan", "fashion_mnist_vae"])
def test_test_subcommand_on_the_gan_and_vae_recipes(tmp_path, recipe):
    (path,) = [p for p in RECIPES if p.stem == recipe]
    config = _small(yaml.safe_load(path.read_text()), tmp_path)
    small = tmp_path / "config.yaml"
    small.write_text(yaml.safe_dump(config))
    with pytest.warns(UserWarning, match="without --ckpt_path evaluates the model"):
        cli = build_cli(["test", "--config", str(small)])
    key = "test/d_real" if "gan" in recipe else "test/elbo"
    assert torch.isfinite(cli.trainer.callback_metrics[key])


def _lock(run, ready, go, queue) -> None:
    try:
        lock_run(run)
        queue.put("locked")
    except RunFolderError:
        queue.put("refused")
    ready.wait(30)
    go.wait(30)  # hold the lock until every process has tried


def test_one_of_many_concurrent_resumes_gets_the_lock(tmp_path):
    """Checking for a holder and then writing the lock let two resumes both train into one
    folder; the lock is now an exclusive flock, taken atomically."""
    run = tmp_path / "version_0"
    run.mkdir()
    ctx = multiprocessing.get_context("fork")
    queue, ready, go = ctx.Queue(), ctx.Barrier(6), ctx.Event()
    procs = [ctx.Process(target=_lock, args=(run, ready, go, queue)) for _ in range(6)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=30) for _ in procs)
    go.set()
    for p in procs:
        p.join(30)
    assert results == ["locked"] + ["refused"] * 5
    assert lock_holder(run) is None  # the holder ended (os._exit: no cleanup), so did its lock
    lock_run(run)  # and the next resume takes it


@pytest.mark.slow  # 22 s on the 2-core EPYC: with the slow tests, which CI runs too
def test_a_resumed_run_keeps_its_metrics(tmp_path, monkeypatch):
    """Lightning's CSV logger deletes the metrics.csv it finds in its folder: a resumed run
    lost every epoch logged before the interruption."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(QUICKSTART), *SMALL, "--trainer.accelerator=cpu"]
    build_cli([*args, "--trainer.max_epochs=1"])
    build_cli([*args, "--trainer.max_epochs=2", "--ckpt_path", "last"])
    root = tmp_path / "lightning_logs" / "quickstart"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["version_0"]
    with open(root / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    spectrum_epochs = [r["epoch"] for r in rows if r.get("nfk/sigma_1")]
    assert spectrum_epochs == ["0", "1"]
    assert not list((root / "version_0").glob("*.before-resume"))
