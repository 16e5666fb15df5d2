"""LinearProbeCallback and the logistic regression under it."""

from __future__ import annotations

import pickle

import pytest
import pytorch_lightning as pl
import torch

from lightning_nfk.callbacks import LinearProbeCallback
from lightning_nfk.kernel.linear_probe import fit_logistic_regression, select_and_fit
from tests.helpers.data import RandomImageDataModule
from tests.helpers.lightning import quick_trainer, tiny_classifier


def _fit(tmp_path, callbacks, dm=None, epochs=1):
    pl.seed_everything(0)
    trainer = quick_trainer(tmp_path, callbacks, max_epochs=epochs)
    model = tiny_classifier()
    trainer.fit(model, dm or RandomImageDataModule(batch_size=32))
    return trainer, model


def test_logistic_regression_separable_and_deterministic():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 5, generator=g) * 4
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 5, generator=g)
    a = select_and_fit(x, y, 3, seed=0)
    b = select_and_fit(x, y, 3, seed=0)
    assert torch.equal(a.weight, b.weight) and a.l2 == b.l2
    assert a.accuracy(x, y) > 0.95
    # a huge penalty shrinks the weights towards zero
    strong = fit_logistic_regression(x, y, 3, l2=100.0)
    assert strong.weight.norm() < 0.1 * a.weight.norm()


@pytest.mark.parametrize("features", ["nfk", "net.4", "callable"])
def test_probe_accuracy_is_logged_and_beats_chance(tmp_path, features):
    if features == "callable":
        features = _flat_pixels
    cb = LinearProbeCallback(
        features=features, max_train=300, max_val=128, k=8, oversample=6, n_iter=3
    )
    trainer, _ = _fit(tmp_path, [cb])
    acc = trainer.callback_metrics["probe/acc"].item()
    assert acc > 0.5, acc  # 10 well-separated classes: chance is 0.1
    assert cb.history[-1]["probe/l2"] in cb.l2_grid
    # logged as a float32 tensor: the grid value (> 0) rounded to float32
    assert trainer.callback_metrics["probe/l2"].item() == pytest.approx(
        cb.history[-1]["probe/l2"], rel=torch.finfo(torch.float32).eps
    )
    assert len(cb.history) == 1


def _flat_pixels(pl_module, x):
    return x.flatten(1)


def test_label_budget_restricts_training_examples(tmp_path):
    dm = RandomImageDataModule(batch_size=32, num_labels=40)
    cb = LinearProbeCallback(features=_flat_pixels, max_train=1000, max_val=64)
    _fit(tmp_path, [cb], dm=dm)
    x, y, _, _ = cb._split(_FakeTrainer(dm), "labeled")
    assert x.shape[0] == 40 and torch.bincount(y).tolist() == [4] * 10


class _FakeTrainer:
    def __init__(self, dm):
        self.datamodule, self.global_rank, self.world_size = dm, 0, 1


def test_bad_layer_name_is_refused(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"`features` \('net.99'\) is neither 'nfk' nor a submodule of ClassifierModule",
    ):
        _fit(tmp_path, [LinearProbeCallback(features="net.99")])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"features": 3},
            TypeError,
            r"`features` must be 'nfk', a submodule name or a callable, got int",
        ),
        ({"max_train": 0}, ValueError, r"`max_train` must be >= 1, got 0"),
        ({"k": 2.0}, TypeError, r"`k` must be an int, got float \(2.0\)"),
        (
            {"k": 8, "oversample": 10, "nfk_fit_size": 16},
            ValueError,
            r"`k` \+ `oversample` \(8 \+ 10 = 18\) must not exceed `nfk_fit_size` \(16\)",
        ),
        ({"l2_grid": ()}, ValueError, r"`l2_grid` must be a non-empty sequence of numbers >= 0"),
        ({"l2_grid": (-1.0,)}, ValueError, r"`l2_grid` must be a non-empty sequence"),
    ],
    ids=["features", "max-train", "float-k", "fit-size", "empty-grid", "negative-l2"],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LinearProbeCallback(**kwargs)


def test_pickle_and_state(tmp_path):
    cb = LinearProbeCallback(features=_flat_pixels, max_train=100, max_val=64)
    _fit(tmp_path, [cb])
    clone = pickle.loads(pickle.dumps(cb))
    assert clone.history == cb.history
    fresh = LinearProbeCallback(features=_flat_pixels)
    fresh.load_state_dict(cb.state_dict())
    assert fresh.history == cb.history


def test_same_seed_same_probe(tmp_path):
    runs = []
    for i in range(2):
        cb = LinearProbeCallback(max_train=200, max_val=64, k=6, oversample=6, n_iter=2, seed=3)
        _fit(tmp_path / str(i), [cb])
        runs.append(cb.history)
    assert runs[0] == runs[1]
