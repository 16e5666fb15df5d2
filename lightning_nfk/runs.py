"""Run folders: every run of a recipe writes to a folder of its own, resumed only on purpose.

A recipe's logger names the recipe's folder, ``<save_dir>/<name>`` (``lightning_logs/
quickstart``); each run of it gets the next ``version_<N>`` inside, claimed atomically
(``mkdir``), so two runs started at once never share one. The run's folder holds everything
it writes: ``metrics.csv`` (or TensorBoard events), ``config.yaml``, the spectrum plots and
``checkpoints/`` (a ``ModelCheckpoint`` without ``dirpath`` writes there).

While a run trains, it holds a lock (``flock``) on ``.version_N.lock`` beside its folder,
naming its process; the operating system releases it when the process ends, even when it
is killed, and the next resume takes it.

``--ckpt_path last`` means "the newest ``checkpoints/last.ckpt`` among this recipe's runs":
``fit`` then continues that run in its own folder (refused while the run's process is still
alive), ``validate``/``test`` read it and log to a new folder, and both refuse when no run
has one. :func:`resolve_checkpoint` gives the same meaning to a folder passed as a checkpoint
(e.g. a distillation recipe's ``teacher_checkpoint: lightning_logs/<teacher recipe>``).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import re
import socket
from pathlib import Path

RUN_PREFIX = "version_"
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
        except FileExistsError:
            n += 1
            continue
        # a run that fails before writing anything (a refused argument) leaves no folder
        atexit.register(_remove_if_empty, root / f"{RUN_PREFIX}{n}")
        return n


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()  # refused unless empty


def last_checkpoint(run: str | os.PathLike) -> Path | None:
    """The newest ``last*.ckpt`` in ``run/checkpoints`` (None without one)."""
    folder = Path(run) / "checkpoints"
    if not folder.is_dir():
        return None
    found = [p for p in folder.iterdir() if p.name.startswith("last") and p.suffix == ".ckpt"]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The most recently written ``last*.ckpt`` among the runs ``root/version_*`` (None
    without one)."""
    found = [(last_checkpoint(Path(root) / f"{RUN_PREFIX}{n}"), n) for n in run_versions(root)]
    # the newest by modification time; equal times (coarse file systems): the higher run
    return max(
        ((p, n) for p, n in found if p is not None),
        key=lambda pn: (pn[0].stat().st_mtime_ns, pn[1]),
        default=(None, 0),
    )[0]


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
def lock_path(run: str | os.PathLike) -> Path:
    """The lock file of ``run`` (``root/version_N``): ``root/.version_N.lock``, beside the
    folder, so that a new run's folder is empty when its logger opens it."""
    run = Path(run)
    return run.parent / f".{run.name}.lock"


_HELD: dict[Path, int] = {}  # this process's locks: path -> open descriptor holding flock


def lock_holder(run: str | os.PathLike) -> str | None:
    """``"process P on HOST"`` when a process other than this one holds ``run``'s lock
    (None when unlocked, or the lock is stale: its process ended or was killed, and the
    operating system released it). A lock written on another host counts as held (this
    host cannot see that process); delete the lock file if that run is gone."""
    path = lock_path(run)
    if path in _HELD:
        return None
    try:
        text = path.read_text().split()
        pid, host = int(text[0]), text[1]
    except (OSError, ValueError, IndexError):
        return None
    if host != socket.gethostname():
        return f"process {pid} on {host} (lock file {str(path)!r})"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return f"process {pid} on {host}"
    finally:
        os.close(fd)  # closing drops the probe's shared lock too
    return None


def lock_run(run: str | os.PathLike) -> None:
    """Mark ``run`` as trained by this process until it exits: an exclusive ``flock`` on
    its lock file, taken atomically (two processes cannot both get it) and released by the
    operating system when the process ends, however it ends.

    Raises:
        RunFolderError: another process holds it.
    """
    run = Path(run)
    path = lock_path(run)
    if path in _HELD:
        return
    run.mkdir(parents=True, exist_ok=True)
    while True:
        holder = lock_holder(run)  # another host's lock: flock may not reach across machines
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        if holder is None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = lock_holder(run) or "another process"
        if holder is not None or _same_file(fd, path):
            break
        os.close(fd)  # locked a file its holder unlinked on exit: lock the new one
    if holder is not None:
        os.close(fd)
        raise RunFolderError(
            f"The run {str(run)!r} is in use by {holder}: two processes must not train "
            "into one folder. Wait for it to end, or start a new run (without --ckpt_path)."
        )
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    _HELD[path] = fd
    atexit.register(_unlock, path)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except OSError:
        return False


def _unlock(path: Path) -> None:
    fd = _HELD.pop(path, None)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        path.unlink()  # while still holding it: a waiting process then sees no lock
    with contextlib.suppress(OSError):
        os.close(fd)


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
    "lock_path",
    "lock_run",
    "resolve_checkpoint",
    "run_of",
    "run_versions",
]
