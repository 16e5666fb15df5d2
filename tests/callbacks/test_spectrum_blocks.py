"""NFKSpectrumCallback(blocks=...): per-block spectra logged beside the kernel's, on epoch
and step schedules, drawn in blocks.png, and prefixes checked before training."""

from __future__ import annotations

import csv
import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from lightning_nfk.callbacks import NFKSpectrumCallback
from lightning_nfk.kernel import LowRankNFK
from tests.helpers.data import RandomImageDataModule
from tests.helpers.lightning import quick_trainer, tiny_classifier

CB = {"k": 4, "oversample": 6, "n_iter": 2, "probe_size": 96, "strategy": "blocked"}
# the kernel module of tiny_classifier: Sequential(conv, bn, relu, flatten, linear, tanh, linear)
AUTO = ["0", "1", "4", "6"]


def _fit(tmp_path, cb, **kw):
    pl.seed_everything(0)
    model = tiny_classifier()
    logger = CSVLogger(tmp_path, name="logs")
    trainer = quick_trainer(tmp_path, [cb], logger=logger, **kw)
    trainer.fit(model, RandomImageDataModule(batch_size=32))
    return trainer, model


def _rows(trainer):
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("nfk/sigma_1")]


def test_block_metrics_are_logged_and_equal_a_direct_fit(tmp_path):
    cb = NFKSpectrumCallback(**CB, blocks="auto")
    trainer, model = _fit(tmp_path, cb, max_epochs=2)
    m = trainer.callback_metrics
    for name in AUTO:
        for what in ("sigma_1", "explained_variance", "effective_rank", "trace_share"):
            assert math.isfinite(float(m[f"nfk/block/{name}/{what}"]))
        assert 0 < float(m[f"nfk/block/{name}/explained_variance"]) <= 1 + 1e-6
    shares = [float(m[f"nfk/block/{n}/trace_share"]) for n in AUTO]
    assert math.isclose(sum(shares), 1.0, rel_tol=1e-5), shares
    assert len(_rows(trainer)) == 2  # one CSV row per epoch, with the block columns
    assert all(r["nfk/block/4/effective_rank"] for r in _rows(trainer))
    # the same fit, outside Lightning: equal block spectra (same probe, sketch and model)
    direct = LowRankNFK(model.nfk_energy(), cb.config)
    direct.fit(cb._local_probe(trainer, torch.device("cpu")), blocks="auto")
    for name, b in direct.block_spectra.items():
        torch.testing.assert_close(
            float(m[f"nfk/block/{name}/sigma_1"]), float(b.singular_values[0]), rtol=1e-5, atol=0
        )
    out = tmp_path / "logs" / "version_0" / "nfk_spectrum"
    assert (out / "blocks.png").stat().st_size > 5000
    assert set(cb.history[-1]["block_cumulative"]) == set(AUTO)


def test_step_fits_log_block_rows(tmp_path):
    cb = NFKSpectrumCallback(**CB, blocks=["4", "6"], every_n_train_steps=2, plot=False)
    trainer, _ = _fit(tmp_path, cb, max_epochs=1, log_every_n_steps=50)
    rows = _rows(trainer)
    assert [int(r["step"]) for r in rows] == [1, 3]
    for r in rows:
        assert float(r["nfk/block/6/sigma_1"]) > 0
        assert "nfk/block/0/sigma_1" not in r  # only the blocks asked for


def test_a_prefix_naming_no_parameter_fails_before_training(tmp_path):
    cb = NFKSpectrumCallback(**CB, blocks=["net.0"])  # the kernel's names have no "net."
    pl.seed_everything(0)
    trainer = quick_trainer(tmp_path, [cb])
    with pytest.raises(ValueError, match=r"prefix 'net.0' names none.*\['0', '1', '4', '6'\]"):
        trainer.fit(tiny_classifier(), RandomImageDataModule(batch_size=32))
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    ("blocks", "error"), [("every", ValueError), ([], ValueError), ([1], TypeError)]
)
def test_bad_blocks_are_refused_at_construction(blocks, error):
    with pytest.raises(error, match="`blocks`"):
        NFKSpectrumCallback(blocks=blocks)
