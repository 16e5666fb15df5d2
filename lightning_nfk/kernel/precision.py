"""Full float32/float64 arithmetic for the kernel, whatever the caller's precision settings.

Inside a Lightning step under ``16-mixed`` or ``bf16-mixed`` autocast is on, and on
Ampere and newer GPUs cuDNN convolutions (and, after ``torch.set_float32_matmul_precision
("high")``, matrix products) run in TF32, about 1e-3 relative: per-example gradients
and the randomized SVD would silently lose three to four digits. :func:`full_precision`
turns autocast off for every device type and asks for IEEE float32 in matmuls,
convolutions and RNNs on CUDA (cuBLAS, cuDNN) and on the CPU (oneDNN), then restores
exactly what it found.

The TF32 switches are read and written through PyTorch's ``fp32_precision`` attributes
where they exist (torch >= 2.9; mixing them with the legacy ``allow_tf32`` flags in one
process raises), else through the legacy flags.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")
# (backend, operation) pairs of the new API: torch.backends.<backend>.<operation>.fp32_precision
_FP32_SWITCHES = (
    ("cuda", "matmul"),
    ("cudnn", "conv"),
    ("cudnn", "rnn"),
    ("mkldnn", "matmul"),
    ("mkldnn", "conv"),
    ("mkldnn", "rnn"),
)


def _switches() -> list[object]:
    found = []
    for backend, operation in _FP32_SWITCHES:
        owner = getattr(getattr(torch.backends, backend, None), operation, None)
        if owner is not None and hasattr(owner, "fp32_precision"):
            found.append(owner)
    return found


@contextlib.contextmanager
def _ieee_float32() -> Iterator[None]:
    switches = _switches()
    if switches:
        saved = [s.fp32_precision for s in switches]  # type: ignore[attr-defined]
        try:
            for s in switches:
                s.fp32_precision = "ieee"  # type: ignore[attr-defined]
            yield
        finally:
            for s, value in zip(switches, saved):
                s.fp32_precision = value  # type: ignore[attr-defined]
        return
    # torch < 2.9: the legacy flags
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.set_float32_matmul_precision(precision)


def _autocast_device_types() -> list[str]:
    types = []
    for device_type in _AUTOCAST_DEVICE_TYPES:
        try:
            if torch.is_autocast_enabled(device_type):
                types.append(device_type)
        except (RuntimeError, ValueError):  # a device type this build does not know
            continue
    return types


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Autocast off on every device type where it is on, and IEEE float32 (no TF32, no
    bfloat16 emulation) in matmuls, convolutions and RNNs; all restored on exit."""
    with contextlib.ExitStack() as stack:
        for device_type in _autocast_device_types():
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        stack.enter_context(_ieee_float32())
        yield
