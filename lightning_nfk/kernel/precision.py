"""Full float32/float64 arithmetic for the kernel, whatever the caller's precision settings.

Inside a Lightning step under ``16-mixed`` or ``bf16-mixed`` autocast is on, and on
Ampere and newer GPUs cuDNN convolutions (and, after ``torch.set_float32_matmul_precision
("high")``, matrix products) run in TF32, about 1e-3 relative: per-example gradients
and the randomized SVD would silently lose three to four digits. :func:`full_precision`
turns autocast off for every device type and asks for IEEE float32 in matmuls,
convolutions and RNNs on CUDA (cuBLAS, cuDNN) and on the CPU (oneDNN), then restores
exactly what it found. :func:`kernel_mode` adds eval mode and an untouched global RNG: the
conditions every pass of the kernel runs under.

PyTorch >= 2.9 has two APIs for these switches, the legacy ``allow_tf32`` flags and the
``fp32_precision`` attributes, and raises when a process mixes them: the switches are
set and restored through the API the caller's state is in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lightning_nfk.kernel.energies.base import Energy

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


def _legacy_flags() -> tuple[bool, bool, str] | None:
    """The legacy TF32 state, or None when the caller set the new ``fp32_precision`` API
    (reading the legacy flags then raises: the two must not be mixed)."""
    try:
        return (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision(),
        )
    except RuntimeError:
        return None


@contextlib.contextmanager
def _ieee_float32() -> Iterator[None]:
    """IEEE float32 through the API the caller's state is in: the legacy flags where they
    can be read (never set, or set the legacy way), else the ``fp32_precision`` switches,
    which also cover oneDNN's reduced-precision float32 modes on the CPU."""
    legacy, switches = _legacy_flags(), _switches()
    if legacy is None and switches:
        saved = [s.fp32_precision for s in switches]  # type: ignore[attr-defined]
        try:
            for s in switches:
                s.fp32_precision = "ieee"  # type: ignore[attr-defined]
            yield
        finally:
            for s, value in zip(switches, saved):
                s.fp32_precision = value  # type: ignore[attr-defined]
        return
    mkldnn = [s for s in switches if s in _mkldnn_switches()]
    saved_mkldnn = [s.fp32_precision for s in mkldnn]  # type: ignore[attr-defined]
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        for s in mkldnn:  # the CPU's switches have no legacy flag
            s.fp32_precision = "ieee"  # type: ignore[attr-defined]
        yield
    finally:
        if legacy is not None:
            torch.backends.cuda.matmul.allow_tf32 = legacy[0]
            torch.backends.cudnn.allow_tf32 = legacy[1]
            torch.set_float32_matmul_precision(legacy[2])
        for s, value in zip(mkldnn, saved_mkldnn):
            s.fp32_precision = value  # type: ignore[attr-defined]


def _mkldnn_switches() -> list[object]:
    mkldnn = getattr(torch.backends, "mkldnn", None)
    return [getattr(mkldnn, op) for op in ("matmul", "conv", "rnn") if hasattr(mkldnn, op)]


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


@contextlib.contextmanager
def restored_modes(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Every submodule's train/eval flag as it was on entry, whatever the body sets."""
    flags = [(m, m.training) for root in modules for m in root.modules()]
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def kernel_mode(*owners: Energy | nn.Module) -> Iterator[None]:
    """Eval mode, gradients enabled, inference mode off, global RNG untouched, float32/64
    arithmetic (autocast off, no TF32: :func:`full_precision`); all restored.

    ``owners`` are energies (their kernel module and auxiliary modules) or plain modules.
    """
    modules: list[nn.Module] = []
    for owner in owners:
        if isinstance(owner, Energy):
            modules += [owner.module, *owner.auxiliary_modules()]
        else:
            modules.append(owner)
    devices = sorted(
        {p.device.index or 0 for r in modules for p in r.parameters() if p.device.type == "cuda"}
    )
    with (
        restored_modes(modules),
        torch.random.fork_rng(devices=devices),
        full_precision(),
        torch.inference_mode(False),
        torch.enable_grad(),
    ):
        for root in modules:
            root.eval()
        yield
