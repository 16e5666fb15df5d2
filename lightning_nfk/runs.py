"""Run folders: every run of a recipe writes to a folder of its own, resumed only on purpose.

A recipe's logger names the recipe's folder, ``<save_dir>/<name>`` (``lightning_logs/
quickstart``); each run of it gets the next ``version_<N>`` inside, claimed atomically
(``mkdir``), so two runs started at once never share one. The run's folder holds everything
it writes: ``metrics.csv`` (or TensorBoard events), ``config.yaml``, the spectrum plots and
``checkpoints/`` (a ``ModelCheckpoint`` without ``dirpath`` writes there).

While a run trains, its folder holds a lock file naming its process; a run that ended (or
was killed) leaves a stale lock, which the next resume takes over.

``--ckpt_path last`` means "the newest ``checkpoints/last.ckpt`` among this recipe's runs":
``fit`` then continues that run in its own folder (refused while the run's process is still
alive), ``validate``/``test`` read it and log to a new folder, and both refuse when no run
has one. :func:`resolve_checkpoint` gives the same meaning to a folder passed as a checkpoint
(e.g. a distillation recipe's ``teacher_checkpoint: lightning_logs/<teacher recipe>``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import socket
from pathlib import Path

RUN_PREFIX = "version_"
LOCK_NAME = ".lightning-nfk.lock"
_RUN = re.compile(rf"^{RUN_PREFIX}(\d+)$")


class RunFolderError(ValueError):
    """A run folder or checkpoint that cannot be used as asked (the message says why and
    what to do)."""


def run_versions(root: str | os.PathLike) -> list[int]:
    """The run numbers ``N`` of ``root/version_N`` folders, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = (_RUN.match(p.name) for p in root.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def claim_new_run(root: str | os.PathLike) -> int:
    """Create ``root/version_N`` for the next free N and return N. Safe against concurrent
    runs: ``mkdir`` fails for all but one process, the others take the next number."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n = max(run_versions(root), default=-1) + 1
    while True:
        try:
            (root / f"{RUN_PREFIX}{n}").mkdir()
            return n
        except FileExistsError:
            n += 1


def last_checkpoint(run: str | os.PathLike) -> Path | None:
    """The newest ``last*.ckpt`` in ``run/checkpoints`` (None without one)."""
    folder = Path(run) / "checkpoints"
    if not folder.is_dir():
        return None
    found = [p for p in folder.iterdir() if p.name.startswith("last") and p.suffix == ".ckpt"]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest ``last.ckpt`` among the runs ``root/version_*`` (None without one)."""
    found = [last_checkpoint(Path(root) / f"{RUN_PREFIX}{n}") for n in run_versions(root)]
    return max((p for p in found if p is not None), key=lambda p: p.stat().st_mtime, default=None)


def run_of(checkpoint: str | os.PathLike) -> tuple[Path, int] | None:
    """``(root, N)`` when ``checkpoint`` lies in ``root/version_N/checkpoints/``."""
    path = Path(checkpoint).absolute()
    match = _RUN.match(path.parent.parent.name)
    if path.parent.name != "checkpoints" or match is None:
        return None
    return path.parent.parent.parent, int(match.group(1))


def resolve_checkpoint(path: str | os.PathLike, what: str) -> Path:
    """``path`` when it is a file; for a folder, its newest ``last.ckpt``: a recipe's folder
    (``<save_dir>/<name>``, its runs ``version_*``) or one run's folder.

    Raises:
        RunFolderError: a folder holding no ``last.ckpt``, or whose newest one belongs to a
            run that is still training (its weights are not final).
    """
    path = Path(path)
    if not path.is_dir():
        return path
    found = last_checkpoint(path) if _RUN.match(path.name) else latest_checkpoint(path)
    if found is None:
        raise RunFolderError(
            f"{what} {str(path)!r} is a folder without a run's checkpoints/last.ckpt: train "
            "that recipe first, or give the checkpoint file."
        )
    holder = lock_holder(found.parent.parent)
    if holder is not None:
        raise RunFolderError(
            f"{what} {str(path)!r}: its newest checkpoint {str(found)!r} belongs to a run "
            f"still training ({holder}): wait for it to end, or give a checkpoint file."
        )
    return found


# -- locks ------------------------------------------------------------------------------------
def lock_holder(run: str | os.PathLike) -> str | None:
    """``"process P on HOST"`` when a live process other than this one holds ``run``'s lock
    (None when unlocked or stale: the process ended, or was killed)."""
    try:
        pid_text, host = (Path(run) / LOCK_NAME).read_text().split()[:2]
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    if pid == os.getpid():
        return None
    if host != socket.gethostname():  # another machine: alive as far as we can tell
        return f"process {pid} on {host}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    return f"process {pid} on {host}"


def lock_run(run: str | os.PathLike) -> None:
    """Mark ``run`` as trained by this process until it exits.

    Raises:
        RunFolderError: another live process holds it.
    """
    run = Path(run)
    holder = lock_holder(run)
    if holder is not None:
        raise RunFolderError(
            f"The run {str(run)!r} is in use by {holder}: two processes must not train "
            "into one folder. Wait for it to end, or start a new run (without --ckpt_path)."
        )
    run.mkdir(parents=True, exist_ok=True)
    lock = run / LOCK_NAME
    tmp = run / f"{LOCK_NAME}.{os.getpid()}"
    tmp.write_text(f"{os.getpid()} {socket.gethostname()}\n")
    os.replace(tmp, lock)
    atexit.register(_unlock, lock, lock.read_text())


def _unlock(lock: Path, mine: str) -> None:
    with contextlib.suppress(OSError):
        if lock.read_text() == mine:
            lock.unlink()


def launch_rank() -> int:
    """This process's global rank as its launcher set it in the environment (torchrun,
    SLURM, Lightning's ``ddp`` launcher), 0 when launched alone. Readable before any
    process group exists."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        value = os.environ.get(name, "0")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


__all__ = [
    "RunFolderError",
    "claim_new_run",
    "last_checkpoint",
    "latest_checkpoint",
    "launch_rank",
    "lock_holder",
    "lock_run",
    "resolve_checkpoint",
    "run_of",
    "run_versions",
]
