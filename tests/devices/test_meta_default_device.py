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
@pytest.mark.parametrize("name", ["cnn", "gan", "vae", "ntk", "vit", "gpt"])
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


@pytest.mark.parametrize("strategy", ["dense", "blocked", "matrix_free"])
@pytest.mark.parametrize("name", ["cnn", "gpt"])
def test_block_spectra(name, strategy):
    case = make_case(name, n=40)
    config = NFKConfig(k=4, oversample=4, n_iter=2, strategy=strategy, chunk_size=16)
    expected = LowRankNFK(case.energy, config).fit(case.x, blocks="auto").block_spectra
    with meta_default_device():
        got = LowRankNFK(case.energy, config).fit(case.x, blocks="auto").block_spectra
    assert list(got) == list(expected)
    for name_, b in got.items():
        assert b.singular_values.device.type == "cpu"
        torch.testing.assert_close(
            b.singular_values, expected[name_].singular_values, rtol=1e-10, atol=0
        )


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


@contextlib.contextmanager
def _hook_under_meta(pl_module):
    """A callback hook under a ``meta`` default device; Lightning's own logging (which
    creates device-less tensors of its own) runs outside it."""
    log = pl_module.log

    def lightning_log(*args, **kwargs):
        torch.set_default_device(None)
        try:
            return log(*args, **kwargs)
        finally:
            torch.set_default_device("meta")

    pl_module.log = lightning_log
    try:
        with meta_default_device():
            yield
    finally:
        del pl_module.log


def _under_meta(callback_class):
    """The callback with its epoch-end work run under a ``meta`` default device."""

    class Emulated(callback_class):
        def on_train_epoch_end(self, trainer, pl_module):
            with _hook_under_meta(pl_module):
                super().on_train_epoch_end(trainer, pl_module)

        def on_validation_epoch_end(self, trainer, pl_module):
            with _hook_under_meta(pl_module):
                super().on_validation_epoch_end(trainer, pl_module)

    return Emulated


@pytest.mark.parametrize("features", ["nfk", "own fit", "layer"])
def test_callback_fits(tmp_path, features):
    import pytorch_lightning as pl

    from lightning_nfk.callbacks import LinearProbeCallback, NFKSpectrumCallback
    from tests.helpers.data import RandomImageDataModule
    from tests.helpers.lightning import quick_trainer, tiny_classifier

    probe_features = {"nfk": "nfk", "own fit": "nfk", "layer": "net.4"}[features]
    callbacks = [_under_meta(LinearProbeCallback)(features=probe_features, max_train=128)]
    if features == "nfk":
        callbacks.insert(0, _under_meta(NFKSpectrumCallback)(k=4, oversample=4, probe_size=64))
    pl.seed_everything(0)
    trainer = quick_trainer(tmp_path, callbacks, limit_train_batches=2)
    trainer.fit(tiny_classifier(), RandomImageDataModule(batch_size=32))
    for cb in callbacks:
        assert cb.history, type(cb).__name__
    metrics = trainer.callback_metrics
    assert 0.0 <= float(metrics["probe/acc"]) <= 1.0
    if features == "nfk":
        assert float(metrics["nfk/sigma_1"]) > 0
