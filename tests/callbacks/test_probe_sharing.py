"""LinearProbeCallback and NFKSpectrumCallback share an NFK fit only when asked
(``nfk_source="spectrum"``), checked at setup, logged; their state keys tell two
differently configured instances apart, and checkpoints of the shorter keys still load."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from lightning_nfk.callbacks import LinearProbeCallback, NFKSpectrumCallback
from tests.helpers.data import RandomImageDataModule
from tests.helpers.lightning import quick_trainer, tiny_classifier

SPECTRUM = {"oversample": 6, "n_iter": 2, "probe_size": 96, "plot": False}
PROBE = {"max_train": 150, "max_val": 64, "oversample": 6, "n_iter": 2, "nfk_fit_size": 64}


def _fit(tmp_path, callbacks, **trainer_kwargs):
    pl.seed_everything(0)
    trainer = quick_trainer(tmp_path, callbacks, **trainer_kwargs)
    trainer.fit(tiny_classifier(), RandomImageDataModule(batch_size=32))
    return trainer


@pytest.mark.parametrize("order", ["spectrum first", "probe first"])
def test_the_probe_fits_its_own_nfk_by_default_whatever_the_order(tmp_path, order):
    spectrum = NFKSpectrumCallback(k=8, **SPECTRUM)
    probe = LinearProbeCallback(k=4, **PROBE)
    callbacks = [spectrum, probe] if order == "spectrum first" else [probe, spectrum]
    trainer = _fit(tmp_path, callbacks)
    # before, a spectrum listed first silently replaced the probe's k = 4 by its 8
    assert trainer.callback_metrics["probe/nfk_k"].item() == 4
    assert trainer.callback_metrics["probe/shared_fit"].item() == 0
    assert probe.history[-1]["probe/nfk_k"] == 4


def test_nfk_source_spectrum_uses_the_spectrum_fit_of_the_epoch(tmp_path):
    spectrum = NFKSpectrumCallback(k=8, every_n_epochs=2, **SPECTRUM)
    probe = LinearProbeCallback(k=4, every_n_epochs=2, nfk_source="spectrum", **PROBE)
    seen = []
    original = probe._nfk

    def spy(trainer, pl_module, reduce):
        nfk = original(trainer, pl_module, reduce)
        seen.append((trainer.current_epoch, nfk))
        return nfk

    probe._nfk = spy
    trainer = _fit(tmp_path, [spectrum, probe], max_epochs=2)
    assert [epoch for epoch, _ in seen] == [1]
    assert seen[0][1] is spectrum.nfk  # the spectrum's fit of epoch 1, not a new one
    assert trainer.callback_metrics["probe/nfk_k"].item() == 8
    assert trainer.callback_metrics["probe/shared_fit"].item() == 1


@pytest.mark.parametrize(
    ("callbacks", "match"),
    [
        (lambda p: [p], r"exactly one NFKSpectrumCallback .* found 0"),
        (
            lambda p: [
                NFKSpectrumCallback(k=4, **SPECTRUM),
                NFKSpectrumCallback(k=8, **SPECTRUM),
                p,
            ],
            r"exactly one NFKSpectrumCallback .* found 2",
        ),
        (
            lambda p: [p, NFKSpectrumCallback(k=4, **SPECTRUM)],
            r"listed after .* list NFKSpectrumCallback first",
        ),
        (
            lambda p: [NFKSpectrumCallback(k=4, every_n_epochs=2, **SPECTRUM), p],
            r"`every_n_epochs` \(1\) must be a multiple of NFKSpectrumCallback's \(2\)",
        ),
    ],
    ids=["none", "two", "after", "schedule"],
)
def test_sharing_is_checked_at_setup(tmp_path, callbacks, match):
    probe = LinearProbeCallback(nfk_source="spectrum", **PROBE)
    model = tiny_classifier()
    steps = []
    model.on_train_batch_start = lambda *a: steps.append(1)
    trainer = quick_trainer(tmp_path, callbacks(probe))
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, RandomImageDataModule(batch_size=32))
    assert not steps, "refused after training had started"


def test_nfk_source_arguments():
    with pytest.raises(ValueError, match=r"`nfk_source` must be 'own' or 'spectrum', got 'auto'"):
        LinearProbeCallback(nfk_source="auto")
    with pytest.raises(ValueError, match=r"needs `features`='nfk', got 'net.4'"):
        LinearProbeCallback(features="net.4", nfk_source="spectrum")


def test_state_keys_tell_two_probes_apart_and_both_states_are_saved(tmp_path):
    a = LinearProbeCallback(k=4, seed=0, **PROBE)
    b = LinearProbeCallback(k=4, seed=1, **PROBE)
    assert a.state_key != b.state_key  # before, seed was not in the key: they collided
    kw = {"k": 4, **SPECTRUM}
    assert (
        NFKSpectrumCallback(seed=0, **kw).state_key != NFKSpectrumCallback(seed=1, **kw).state_key
    )
    assert (
        NFKSpectrumCallback(**{**kw, "n_iter": 1}).state_key != NFKSpectrumCallback(**kw).state_key
    )
    trainer = _fit(tmp_path, [a, b], logger=False)
    path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"]
    assert saved[a.state_key]["history"] == a.history
    assert saved[b.state_key]["history"] == b.history


def test_checkpoints_with_the_earlier_keys_still_restore_the_history(tmp_path):
    spectrum = NFKSpectrumCallback(k=4, **SPECTRUM)
    probe = LinearProbeCallback(k=4, **PROBE)
    trainer = _fit(tmp_path / "a", [spectrum, probe], logger=False)
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    # rewrite the states under the keys earlier versions used
    states = ckpt["callbacks"]
    states[probe._legacy_key()] = states.pop(probe.state_key)
    old_spectrum = spectrum._generate_state_key(k=4, probe_size=96, probe_split="train")
    states[old_spectrum] = states.pop(spectrum.state_key)
    torch.save(ckpt, path)
    resumed_spectrum = NFKSpectrumCallback(k=4, **SPECTRUM)
    resumed_probe = LinearProbeCallback(k=4, **PROBE)
    pl.seed_everything(0)
    trainer = quick_trainer(tmp_path / "b", [resumed_spectrum, resumed_probe], max_epochs=2)
    trainer.fit(tiny_classifier(), RandomImageDataModule(batch_size=32), ckpt_path=str(path))
    assert [h["epoch"] for h in resumed_probe.history] == [0, 1]
    assert resumed_probe.history[0] == probe.history[0]
    assert [h["epoch"] for h in resumed_spectrum.history] == [0, 1]
