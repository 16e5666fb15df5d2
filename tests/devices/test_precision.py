"""The kernel computes in float32/float64 whatever the trainer's precision.

Autocast (``16-mixed``, ``bf16-mixed``) and the TF32 / bfloat16-emulation switches of
cuBLAS, cuDNN and oneDNN are off inside :func:`kernel_mode` and restored after; a module
trained in ``bf16-true`` has its NFK computed from a float32 copy, and its forward-only
probe features get inputs in its own dtype.
"""

from __future__ import annotations

import functools
import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_nfk.callbacks import LinearProbeCallback, NFKSpectrumCallback
from lightning_nfk.kernel import LowRankNFK, NFKConfig, kernel_mode
from lightning_nfk.kernel.precision import _switches
from lightning_nfk.models import ClassifierModule
from tests.helpers.data import RandomImageDataModule
from tests.helpers.lightning import quick_trainer
from tests.helpers.models import make_case


@pytest.fixture
def tf32_everywhere():
    """The caller asked for TF32 / bfloat16 float32 arithmetic wherever PyTorch allows it."""
    switches = _switches()
    saved = [s.fp32_precision for s in switches]
    asked = {}
    for s in switches:
        for value in ("tf32", "bf16"):
            try:
                s.fp32_precision = value
                asked[s] = value
                break
            except (RuntimeError, ValueError):
                continue
    yield asked
    for s, value in zip(switches, saved):
        s.fp32_precision = value


def test_kernel_mode_turns_autocast_and_tf32_off_and_restores_them(tf32_everywhere):
    assert tf32_everywhere, "this torch has no fp32_precision switches"
    module = nn.Linear(3, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with kernel_mode(module):
            assert not torch.is_autocast_enabled("cpu")
            assert all(s.fp32_precision == "ieee" for s in tf32_everywhere)
            assert module(torch.ones(1, 3)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
        assert module(torch.ones(1, 3)).dtype == torch.bfloat16
    assert {s: s.fp32_precision for s in tf32_everywhere} == tf32_everywhere


def test_a_caller_on_the_legacy_tf32_flags_keeps_them_and_gets_ieee_inside():
    module = nn.Linear(3, 2)
    before = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    try:
        with kernel_mode(module):
            # the same (legacy) API, readable inside: no mix of the two APIs
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before[0]
        torch.backends.cudnn.allow_tf32 = before[1]
        torch.set_float32_matmul_precision(before[2])


@pytest.mark.parametrize("strategy", ["blocked", "matrix_free"])
def test_a_fit_inside_a_bf16_autocast_step_equals_a_float32_fit(strategy):
    case = make_case("cnn", n=40)
    energy = case.energy.to(torch.float32)
    x, x_new = case.x.float(), case.x_new.float()
    config = NFKConfig(k=4, oversample=6, n_iter=3, strategy=strategy)
    expected = LowRankNFK(energy, config).fit(x)
    want = expected.transform(x_new)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in a `bf16-mixed` training step
        got = LowRankNFK(energy, config).fit(x)
        emb = got.transform(x_new)
    assert emb.dtype == torch.float32
    eps = torch.finfo(torch.float32).eps
    # same computation, same dtype: round-off only (bfloat16 would be off by about 1e-2)
    torch.testing.assert_close(
        got.singular_values, expected.singular_values, rtol=1e3 * eps, atol=0
    )
    scale = float(expected.singular_values[0])
    torch.testing.assert_close(emb.abs(), want.abs(), rtol=0, atol=1e3 * eps * scale)


def _bf16_exact_classifier() -> ClassifierModule:
    """No BatchNorm and lr 0: the weights stay fixed; rounded to bfloat16 values, so that
    a `bf16-true` run holds exactly the weights of a `32-true` one."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 5, stride=3), nn.ReLU(), nn.Flatten(), nn.Linear(256, 16), nn.Tanh(),
        nn.Linear(16, 10),
    )  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(p.bfloat16().float())
    return ClassifierModule(net, optimizer=functools.partial(torch.optim.SGD, lr=0.0))


def _run(tmp_path, precision):
    spectrum = NFKSpectrumCallback(k=4, oversample=6, n_iter=3, probe_size=96)
    # a layer's activations: a forward pass of the module in its own dtype
    probes = [LinearProbeCallback(features="net.4", max_train=128, max_val=64)]
    trainer = quick_trainer(
        tmp_path / precision, [spectrum, *probes], precision=precision, limit_train_batches=2
    )
    pl.seed_everything(0)
    trainer.fit(_bf16_exact_classifier(), RandomImageDataModule(batch_size=32))
    return spectrum, probes, trainer


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("fp32"), "32-true")


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_trainer_precisions_give_the_float32_nfk(tmp_path, precision, float32_run):
    spectrum, probes, trainer = _run(tmp_path, precision)
    want = float32_run[0].nfk
    got = spectrum.nfk
    assert got.components.dtype == torch.float32
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(got.singular_values, want.singular_values, rtol=1e3 * eps, atol=0)
    for name, value in trainer.callback_metrics.items():
        if name.startswith(("nfk/", "probe")):
            assert math.isfinite(float(value)), (name, value)
    assert all(p.history and math.isfinite(p.history[-1]["probe/acc"]) for p in probes)
