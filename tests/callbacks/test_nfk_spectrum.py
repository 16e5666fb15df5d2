"""NFKSpectrumCallback: logged figures, plots, no effect on training, DDP, state, errors."""

from __future__ import annotations

import csv
import pickle

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from lightning_nfk.callbacks import LinearProbeCallback, NFKSpectrumCallback
from lightning_nfk.kernel import LowRankNFK
from tests.helpers.data import RandomImageDataModule
from tests.helpers.lightning import NoProtocol, quick_trainer, tiny_classifier

CB = {"k": 4, "oversample": 6, "n_iter": 3, "probe_size": 96}


def _trainer(tmp_path, callbacks, max_epochs=2, logger=True, **kw) -> pl.Trainer:
    logger = CSVLogger(tmp_path, name="logs") if logger is True else logger
    kw.setdefault("enable_checkpointing", True)
    return quick_trainer(
        tmp_path, callbacks, max_epochs=max_epochs, logger=logger, deterministic=True, **kw
    )


def _csv_metrics(trainer) -> list[dict[str, str]]:
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        return list(csv.DictReader(f))


def test_logs_spectrum_metrics_equal_to_a_direct_fit(tmp_path):
    pl.seed_everything(0)
    cb = NFKSpectrumCallback(**CB)
    dm = RandomImageDataModule(batch_size=32)
    model = tiny_classifier()
    trainer = _trainer(tmp_path, [cb])
    trainer.fit(model, dm)

    m = trainer.callback_metrics
    for name in (
        "sigma_1",
        "explained_variance",
        "effective_rank",
        "stable_rank",
        "k90",
        "seconds",
        "subspace_drift",
    ):
        assert f"nfk/{name}" in m, name
    assert len(cb.history) == 2 and [h["epoch"] for h in cb.history] == [0, 1]
    assert 0 <= m["nfk/subspace_drift"] <= 1
    assert 1 <= m["nfk/effective_rank"] <= CB["k"]
    assert m["nfk/stable_rank"] >= 1

    # the last fit, recomputed here on the same probe rows with the final weights
    x = torch.stack([dm.dataset("train")[int(i)][0] for i in cb.probe_indices])
    assert len(cb.probe_indices) == CB["probe_size"]
    ref = LowRankNFK(model.nfk_energy(), k=4, oversample=6, n_iter=3, seed=0).fit(x)
    # a float32 fit on n = 96 probe rows: round-off up to ~n eps32 relative to sigma_1 (and
    # to 1 for the explained variance, a ratio in [0, 1])
    n, eps32 = len(x), torch.finfo(torch.float32).eps
    sigma_1 = float(ref.singular_values[0])
    torch.testing.assert_close(
        m["nfk/sigma_1"].item(), sigma_1, rtol=n * eps32, atol=n * eps32 * sigma_1
    )
    torch.testing.assert_close(
        m["nfk/explained_variance"].item(),
        float(ref.explained_variance_ratio.sum()),
        rtol=n * eps32,
        atol=n * eps32,
    )
    k90 = m["nfk/k90"].item()
    assert k90 == -1 or (1 <= k90 <= CB["k"] and cb.history[-1]["cumulative"][int(k90) - 1] >= 0.9)

    rows = [r for r in _csv_metrics(trainer) if r.get("nfk/sigma_1")]
    assert len(rows) == 2
    plots = sorted((tmp_path / "logs" / "version_0" / "nfk_spectrum").glob("*.png"))
    assert [p.name for p in plots] == ["epoch=000.png", "epoch=001.png", "heatmap.png"]
    assert plots[-1].stat().st_size > 5000


def test_tensorboard_gets_the_figure(tmp_path):
    cb = NFKSpectrumCallback(**CB)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = _trainer(tmp_path, [cb], max_epochs=1, logger=logger)
    trainer.fit(tiny_classifier(), RandomImageDataModule(batch_size=32))
    assert list((tmp_path / "tb" / "version_0" / "nfk_spectrum").glob("epoch=000.png"))
    events = list((tmp_path / "tb" / "version_0").glob("events.out.tfevents.*"))
    assert events and max(e.stat().st_size for e in events) > 5000  # the PNG went in


def _callbacks(which: str) -> list:
    probe = {
        "max_train": 150,
        "max_val": 64,
        "k": 4,
        "oversample": 6,
        "n_iter": 2,
        "nfk_fit_size": 64,
    }
    return {
        "none": [],
        "spectrum": [NFKSpectrumCallback(**CB, every_n_epochs=1)],
        # per-step fits inside the epoch, warm-started
        "spectrum-steps-warm": [
            NFKSpectrumCallback(
                **CB, every_n_train_steps=1, warm_start=True, strategy="blocked", plot=False
            )
        ],
        # per-block spectra (the blocks' own sketches: another draw from their generator)
        "spectrum-blocks": [NFKSpectrumCallback(**CB, blocks="auto", strategy="blocked")],
        "spectrum+probe": [
            NFKSpectrumCallback(**CB),
            LinearProbeCallback(**probe, nfk_source="spectrum"),
        ],
        "probe-own-nfk": [LinearProbeCallback(**probe)],
        "probe-layer": [LinearProbeCallback(features="net.4", max_train=150, max_val=64)],
    }[which]


def _train_state(tmp_path, which: str):
    pl.seed_everything(0)
    model = tiny_classifier()
    cbs = _callbacks(which)
    trainer = _trainer(
        tmp_path / which, cbs, max_epochs=2, logger=False, enable_checkpointing=False
    )
    trainer.fit(model, RandomImageDataModule(batch_size=32))
    opt = trainer.optimizers[0].state_dict()
    return model.state_dict(), opt, torch.rand(4), [m.training for m in model.modules()]


@pytest.mark.parametrize(
    "which",
    [
        "spectrum",
        "spectrum-steps-warm",
        "spectrum-blocks",
        "spectrum+probe",
        "probe-own-nfk",
        "probe-layer",
    ],
)
def test_training_is_bit_identical_with_and_without_the_callback(tmp_path, which):
    params_a, opt_a, rng_a, modes_a = _train_state(tmp_path, which)
    params_b, opt_b, rng_b, modes_b = _train_state(tmp_path, "none")
    for key in params_b:
        assert torch.equal(params_a[key], params_b[key]), key
    for i, state in opt_b["state"].items():
        for name, value in state.items():
            assert torch.equal(opt_a["state"][i][name], value), (i, name)
    assert torch.equal(rng_a, rng_b), "the global RNG stream moved"
    assert modes_a == modes_b


def test_every_n_epochs(tmp_path):
    cb = NFKSpectrumCallback(**CB, every_n_epochs=2, plot=False)
    _trainer(tmp_path, [cb], max_epochs=3).fit(
        tiny_classifier(), RandomImageDataModule(batch_size=32)
    )
    assert [h["epoch"] for h in cb.history] == [1]


def test_pickle_and_checkpoint_resume(tmp_path):
    cb = NFKSpectrumCallback(**CB, plot=False)
    assert pickle.loads(pickle.dumps(cb)).config == cb.config
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, [cb, ckpt], max_epochs=1).fit(
        tiny_classifier(), RandomImageDataModule(batch_size=32)
    )
    assert pickle.loads(pickle.dumps(cb)).history == cb.history

    resumed = NFKSpectrumCallback(**CB, plot=False)
    trainer = _trainer(tmp_path, [resumed], max_epochs=2)
    trainer.fit(
        tiny_classifier(),
        RandomImageDataModule(batch_size=32),
        ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
    )
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    assert torch.equal(resumed.probe_indices, cb.probe_indices)
    assert "nfk/subspace_drift" in trainer.callback_metrics  # the previous subspace came back


def test_state_key_lets_two_instances_coexist(tmp_path):
    def pair():
        kw = {"oversample": 6, "n_iter": 2, "probe_size": 64, "plot": False}
        return NFKSpectrumCallback(k=4, **kw), NFKSpectrumCallback(k=8, **kw)

    a, b = pair()
    assert a.state_key != b.state_key
    trainer = _trainer(tmp_path, [a, b], max_epochs=1, logger=False, enable_checkpointing=False)
    trainer.fit(tiny_classifier(), RandomImageDataModule(batch_size=32))
    path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(path)
    # one checkpoint holds both states, each under its own key
    saved = torch.load(path, weights_only=False)["callbacks"]
    assert saved[a.state_key]["history"] == a.history
    assert saved[b.state_key]["history"] == b.history
    # the two histories differ (k = 4 vs 8 components), so a mix-up would show
    assert [len(h["cumulative"]) for h in a.history + b.history] == [4, 8]

    # a Trainer resuming from that checkpoint gives each fresh instance its own state
    a2, b2 = pair()
    _trainer(tmp_path / "resumed", [a2, b2], max_epochs=1, logger=False).fit(
        tiny_classifier(), RandomImageDataModule(batch_size=32), ckpt_path=str(path)
    )
    assert a2.history == a.history and b2.history == b.history
    assert torch.equal(a2.probe_indices, a.probe_indices)
    assert torch.equal(b2.probe_indices, b.probe_indices)


def test_module_without_protocol_is_refused(tmp_path):
    with pytest.raises(
        TypeError, match=r"NoProtocol does not implement the NFK protocol: add a method `nfk_energy"
    ):
        _trainer(tmp_path, [NFKSpectrumCallback(**CB)]).fit(
            NoProtocol(), RandomImageDataModule(batch_size=32)
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, r"`k` must be >= 1, got 0"),
        (
            {"probe_size": 10, "k": 8, "oversample": 10},
            r"`k` \+ `oversample` \(8 \+ 10 = 18\) must not exceed `probe_size` \(10\)",
        ),
        ({"probe_split": "test"}, r"`probe_split` must be 'train' or 'val', got 'test'"),
        ({"strategy": "magic"}, r"`strategy` must be one of"),
        ({"every_n_epochs": 0}, r"`every_n_epochs` must be >= 1, got 0"),
    ],
    ids=["k", "too-wide", "split", "strategy", "every"],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NFKSpectrumCallback(**kwargs)


def test_parameter_sharding_strategies_are_refused():
    from pytorch_lightning.strategies import FSDPStrategy

    from lightning_nfk.trainer_utils import check_strategy

    class FakeTrainer:
        strategy = FSDPStrategy()

    with pytest.raises(
        ValueError, match=r"NFKSpectrumCallback does not support FSDPStrategy: it shards"
    ):
        check_strategy(FakeTrainer(), "NFKSpectrumCallback")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"damping": -1.0}, ValueError, r"`damping` must be a finite number >= 0, got -1.0"),
        (
            {"dtype": torch.int32},
            ValueError,
            r"`dtype` must be None, torch.float32 or torch.float64",
        ),
        ({"dtype": torch.float16}, ValueError, r"half-precision Fisher vectors overflow"),
        ({"k": 2.0}, TypeError, r"`k` must be an int, got float \(2.0\)"),
        ({"memory_budget": 0}, ValueError, r"`memory_budget` must be >= 1, got 0"),
    ],
    ids=["damping", "dtype", "half", "float-k", "budget"],
)
def test_kernel_arguments_are_checked_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        NFKSpectrumCallback(**kwargs)
