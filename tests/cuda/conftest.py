"""CUDA tests: what only a GPU shows (CPU/GPU tensor mixes, TF32, host syncs, the trainer's
precisions on CUDA). Marked ``cuda``; skipped where ``torch.cuda.is_available()`` is False.
On a GPU machine: ``python -m pytest -m cuda tests/cuda`` (``benchmarks/gpu_check.sh``).
The device is ``tests.cuda.gpu.DEVICE``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.cuda.gpu import DEVICE, new_switches

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip this folder's tests before any of their fixtures runs when there is no GPU."""
    if DEVICE.type != "cuda" or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


@pytest.fixture(params=["legacy-flags", "fp32_precision"])
def tf32_in_the_caller(request: pytest.FixtureRequest) -> Iterator[str]:
    """The caller turned TF32 on, as users do (``allow_tf32 = True``, or the per-operation
    ``fp32_precision = "tf32"`` of torch >= 2.9); yields the API used; restores after."""
    api = request.param
    switches = new_switches()
    if api == "fp32_precision" and not switches:
        pytest.skip("this torch has no fp32_precision switches (torch < 2.9)")
    saved_precision = torch.get_float32_matmul_precision()
    saved_cudnn = torch.backends.cudnn.allow_tf32
    saved_new = {name: s.fp32_precision for name, s in switches.items()}  # type: ignore[attr-defined]
    if api == "legacy-flags":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    try:
        yield api
    finally:
        torch.set_float32_matmul_precision(saved_precision)
        torch.backends.cudnn.allow_tf32 = saved_cudnn
        for name, value in saved_new.items():
            switches[name].fp32_precision = value  # type: ignore[attr-defined]
