"""Helpers of the CUDA tests: the device they run on, a guard against host syncs, energies
moved to a device, and the TF32 settings as a caller reads them.

``DEVICE`` is ``"cuda"``. To check the tests' own logic on a CPU, set it to ``"cpu"``
locally (host-sync guards are then no-ops: the sync debug mode exists on CUDA only); leave
it ``"cuda"``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch

from lightning_nfk.kernel import Energy

DEVICE = torch.device("cuda")


@contextlib.contextmanager
def no_host_sync(device: torch.device) -> Iterator[None]:
    """Every synchronizing CUDA call (``.item()``, ``.cpu()``, a blocking host-to-device
    copy, ``torch.cuda.synchronize``) raises inside the block; a no-op off CUDA."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def on_device(energy: Energy, device: torch.device) -> Energy:
    """A copy of ``energy`` whose modules (kernel and auxiliary) sit on ``device``."""
    clone = copy.deepcopy(energy)
    for module in [clone.module, *clone.auxiliary_modules()]:
        module.to(device)
    return clone


# The per-operation switches (torch >= 2.9); the legacy flags map onto them.
_NEW_SWITCHES = (("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"))


def new_switches() -> dict[str, object]:
    """The ``fp32_precision`` switches this torch has, by ``backend.operation``."""
    found = {}
    for backend, operation in _NEW_SWITCHES:
        owner = getattr(getattr(torch.backends, backend, None), operation, None)
        if owner is not None and hasattr(owner, "fp32_precision"):
            found[f"{backend}.{operation}"] = owner
    return found


def tf32_flags(api: str) -> dict[str, object]:
    """The TF32 settings as a caller using ``api`` reads them: the legacy flags, or the
    per-operation ``fp32_precision`` switches (reading a legacy flag raises once the new
    switches disagree with it, so each caller reads its own API only)."""
    if api == "legacy-flags":
        return {
            "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        }
    return {f"{name}.fp32_precision": s.fp32_precision for name, s in new_switches().items()}  # type: ignore[attr-defined]
