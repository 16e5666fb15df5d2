"""Files the library reads and writes: atomic writes, integrity checks, clear refusals.

* Every file the library writes appears whole or not at all: it is written to a temporary
  file in the same folder and renamed over the target (``os.replace``), so a reader, a
  concurrent run or a crash never leaves half a file.
* A torch file (``torch.save``'s zip format) holds a CRC-32 of each record, which
  ``torch.load`` does not check: :func:`check_torch_file` does, so that flipped bytes in
  a checkpoint are an error rather than weights of 1e26.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed to ``path`` when the block succeeds (and
    removed when it fails). The parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates 0600: give the file the mode a plain open() would (0666 less
        # the umask), so that others on a shared machine read it as before
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (``os.umask``
    sets it for every thread while it reads)."""
    with contextlib.suppress(OSError, StopIteration, ValueError), open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path`` (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def check_torch_file(path: str | os.PathLike, what: str) -> None:
    """Raise a ValueError naming ``what`` when ``path`` is empty or a zip-format torch
    file whose records fail their CRC-32 check (corrupted on disk or in transfer). Files of
    the legacy (non-zip) format pass: they carry no checksum."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {str(path)!r} is empty (0 bytes): an interrupted copy or save?")
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(
            f"{what} {str(path)!r} is damaged ({type(e).__name__}: {e}): copy or save it again."
        ) from e
    if bad is not None:
        raise ValueError(
            f"{what} {str(path)!r} is corrupted: its record {bad!r} fails its CRC-32 check "
            "(changed bytes on disk or in transfer). Copy or save it again."
        )


def update_digest(digest: Any, value: Any) -> None:
    """Feed a tensor (its dtype, shape and bytes, read in place), an array or a Python
    scalar to a ``hashlib`` digest."""
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value, device="cpu")
    t = value.detach().cpu().contiguous()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().data)


def describe_error(e: BaseException) -> str:
    """``Type: message``, or ``Type`` alone when the message is empty."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
