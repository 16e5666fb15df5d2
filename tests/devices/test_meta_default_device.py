"""Every tensor the package creates names its device: emulated on the CPU.

With ``torch.set_default_device("meta")`` and the models and data on the CPU, a factory
call without a device (``torch.zeros(n)``, ``torch.tensor(...)``, a CPU generator's draw
moved afterwards) makes a ``meta`` tensor, and mixing it with the CPU tensors fails
loudly: what CUDA does on a CPU/GPU mix. Each fit path runs under it here and must give
the same answer as without it.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from lightning_nfk.kernel import LowRankNFK, NFKConfig, exact_nfk
from tests.helpers.models import make_case


@contextlib.contextmanager
def meta_default_device():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def test_the_emulation_catches_a_device_less_factory_call():
    x = torch.ones(3, device="cpu")
    with meta_default_device(), pytest.raises((RuntimeError, NotImplementedError)):
        (x + torch.ones(3)).sum().item()


@pytest.mark.parametrize("strategy", ["dense", "blocked", "matrix_free"])
@pytest.mark.parametrize("name", ["cnn", "gan", "vae", "ntk"])
def test_low_rank_fit_and_transform(name, strategy):
    case = make_case(name, n=40)
    config = NFKConfig(k=4, oversample=4, n_iter=2, strategy=strategy, chunk_size=16)
    expected = LowRankNFK(case.energy, config).fit(case.x)
    want = expected.transform(case.x_new)
    with meta_default_device():
        nfk = LowRankNFK(case.energy, config).fit(case.x)
        got = nfk.transform(case.x_new)
    assert got.device.type == "cpu" and nfk.singular_values.device.type == "cpu"
    scale = float(expected.singular_values[0])
    torch.testing.assert_close(nfk.singular_values, expected.singular_values, rtol=1e-10, atol=0)
    torch.testing.assert_close(got.abs(), want.abs(), rtol=1e-8, atol=1e-10 * scale)


@pytest.mark.parametrize("name", ["cnn", "vae"])
def test_exact_nfk(name):
    case = make_case(name, n=24)
    expected = exact_nfk(case.energy, case.x)
    with meta_default_device():
        got = exact_nfk(case.energy, case.x)
    torch.testing.assert_close(
        got.singular_values,
        expected.singular_values,
        rtol=1e-10,
        atol=1e-12 * float(expected.singular_values[0]),
    )
