"""LinearProbeCallback refuses features it cannot use, with one message naming `features`,
the constraint, the value seen and the cure; before training where the input allows it
(at setup, at fit start for data modules, at train start for loaders passed to ``fit``),
else on every rank together at the epoch end. Layer features run ``probe_forward`` when the
module defines one, and work under ``bf16-true``."""

from __future__ import annotations

import functools
import os

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_nfk.callbacks import LinearProbeCallback
from lightning_nfk.callbacks.probe_features import check_gathered, gather_features
from lightning_nfk.models import ClassifierModule, GANModule
from lightning_nfk.trainer_utils import strategy_sum
from tests.helpers.data import RandomImageDataModule
from tests.helpers.lightning import quick_trainer, tiny_classifier
from tests.helpers.models import TinyGenerator, tiny_discriminator
from tests.helpers.processes import init_gloo, run_two_gloo

# -- data and modules ---------------------------------------------------------------------------


def _dataset(n: int, classes: int = 10, seed: int = 0) -> TensorDataset:
    """``n`` images 1x28x28 with labels ``arange(n) % classes``."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.arange(n) % classes)


class _DataModule(pl.LightningDataModule):
    """A training and a validation dataset, exposed the way lightning_nfk data modules do."""

    def __init__(self, train: Dataset, val: Dataset) -> None:
        super().__init__()
        self.train, self.val = train, val

    def dataset(self, split: str) -> Dataset:
        return self.val if split == "val" else self.train

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=16)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=16)


class _Pair(nn.Module):
    """A layer whose output is a tuple."""

    def forward(self, x):
        return x, x.detach()


class _Layers(pl.LightningModule):
    """A linear classifier on pixels with awkward layers: ``pair`` returns a tuple, ``act``
    runs twice in one forward, ``unused`` never runs; counts its training steps."""

    steps = 0

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.flat = nn.Flatten()
        self.pair = _Pair()
        self.act = nn.Tanh()
        self.head = nn.Linear(784, 10)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        a, _ = self.pair(self.flat(x))
        return self.head(self.act(self.act(a)))

    def training_step(self, batch, batch_idx):
        type(self).steps += 1
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(tmp_path, callback, data, model=None, **trainer_kwargs):
    """Fit ``model`` (default :class:`_Layers`) on ``data``: a ``(train, val)`` pair of
    datasets passed as a data module, or as loaders to ``fit`` with ``how="loader"``."""
    how = trainer_kwargs.pop("how", "datamodule")
    model = model or _Layers()
    _Layers.steps = 0
    train, val = data
    if how == "loader":  # loaders passed to fit exist from train start on
        trainer = quick_trainer(tmp_path, [callback], num_sanity_val_steps=0, **trainer_kwargs)
        trainer.fit(model, DataLoader(train, batch_size=16), DataLoader(val, batch_size=16))
    else:
        trainer = quick_trainer(tmp_path, [callback], **trainer_kwargs)
        trainer.fit(model, _DataModule(train, val))
    return trainer, model


def _refused_before_training(tmp_path, callback, error, match, data=None, how="datamodule"):
    with pytest.raises(error, match=match):
        _fit(tmp_path, callback, data or (_dataset(64), _dataset(32, seed=1)), how=how)
    assert _Layers.steps == 0, "the error came after training had started"


# -- 1. non-finite features and one-class data ------------------------------------------------


def _all_nan(pl_module, x):
    return torch.full((x.shape[0], 8), float("nan"))


def _nan_column(pl_module, x):
    f = x.flatten(1)[:, :51].clone()
    f[:, 7] = float("nan")
    return f


def _one_inf(pl_module, x):
    f = x.flatten(1)[:, :51].clone()
    f[0, 3] = float("inf")
    return f


@pytest.mark.parametrize(
    ("features", "seen"),
    [
        (_all_nan, r"2 of 2 rows and 8 of 8 columns \(16 NaN, 0 inf\)"),
        (_nan_column, r"2 of 2 rows and 1 of 51 columns \(2 NaN, 0 inf\)"),
        (_one_inf, r"1 of 2 rows and 1 of 51 columns \(0 NaN, 1 inf\)"),
    ],
    ids=["all-nan", "nan-column", "inf"],
)
def test_non_finite_features_refused_before_training(tmp_path, features, seen):
    name = features.__name__
    _refused_before_training(
        tmp_path,
        LinearProbeCallback(features=features),
        ValueError,
        rf"`features` \(callable {name}\) must give finite values; on 2 validation examples "
        rf"before training: {seen}\. Cure: ",
    )


def _nan_after_training_starts(pl_module, x):
    """Finite at fit start (the check), a NaN column once the model has trained."""
    f = x.flatten(1)[:, :51].clone()
    if pl_module.trainer.global_step > 0:
        f[:, 50] = float("nan")
    return f


def test_non_finite_gathered_features_are_refused_at_the_epoch_end(tmp_path):
    cb = LinearProbeCallback(features=_nan_after_training_starts, max_train=40)
    with pytest.raises(
        ValueError,
        match=r"`features` \(callable _nan_after_training_starts\) must give finite values; "
        r"at epoch 0: labelled training split: 40 of 40 rows and 1 of 51 columns \(40 NaN, "
        r"0 inf\); validation split: 32 of 32 rows and 1 of 51 columns \(32 NaN, 0 inf\)\. "
        r"Cure: ",
    ):
        _fit(tmp_path, cb, (_dataset(64), _dataset(32, seed=1)))
    assert cb.history == [] and _Layers.steps == 4


@pytest.mark.parametrize("how", ["datamodule", "loader"])
@pytest.mark.parametrize("split", ["labelled training", "validation"])
def test_one_class_is_refused_at_setup(tmp_path, split, how):
    one, many = _dataset(64, classes=1), _dataset(64)
    data = (one, many) if split == "labelled training" else (many, one)
    cap = "max_train" if split == "labelled training" else "max_val"
    _refused_before_training(
        tmp_path,
        LinearProbeCallback(features="head"),
        ValueError,
        rf"The linear probe needs at least two classes in both splits: the {split} selection "
        rf"\(64 examples, `{cap}`=10000\) holds only class 0\. Cure: ",
        data=data,
        how=how,
    )


def test_one_class_in_the_label_budget_selection(tmp_path):
    # ten classes in the data, but the seeded selection of max_train=1 holds one
    _refused_before_training(
        tmp_path,
        LinearProbeCallback(features="head", max_train=1),
        ValueError,
        r"the labelled training selection \(1 examples, `max_train`=1\) holds only class",
    )


def test_gathered_features_must_be_2d_with_one_row_per_example():
    y = torch.arange(6) % 2
    with pytest.raises(ValueError, match=r"one row per example.*5 rows for 6 examples"):
        check_gathered("'head'", 0, {"validation": (torch.zeros(5, 3), y)})
    with pytest.raises(ValueError, match=r"\(B, d\).*shape \(6,\)"):
        check_gathered("'head'", 0, {"validation": (torch.zeros(6), y)})
    with pytest.raises(ValueError, match=r"the same width in both splits.*4 and 3"):
        check_gathered(
            "'head'",
            0,
            {"labelled training": (torch.zeros(6, 4), y), "validation": (torch.zeros(6, 3), y)},
        )


# -- 2. what the feature function gives, checked on two validation examples ---------------------


def _as_list(pl_module, x):
    return x.flatten(1).tolist()


def _one_dim(pl_module, x):
    return x.flatten(1).sum(1)


def _batch_mean(pl_module, x):
    return x.flatten(1).mean(0, keepdim=True)


def _class_index(pl_module, x):
    return pl_module(x).argmax(1, keepdim=True)


@pytest.mark.parametrize(
    ("features", "error", "match"),
    [
        (
            "pair",
            TypeError,
            r"`features` \('pair'\) must output a Tensor, got tuple of 2 items\. Cure: pass a "
            r"callable",
        ),
        (
            "unused",
            ValueError,
            r"`features` \('unused'\) must name a layer that _Layers.forward runs once; it ran 0 "
            r"times on 2 validation examples before training\. Cure: ",
        ),
        (
            "act",
            ValueError,
            r"`features` \('act'\) must name a layer that _Layers.forward runs once; it ran 2 "
            r"times .* Cure: pass a callable",
        ),
        (_as_list, TypeError, r"`features` \(callable _as_list\) must output a Tensor, got list"),
        (
            _one_dim,
            ValueError,
            r"`features` \(callable _one_dim\) must give \(B, d\) or \(B, \.\.\.\) features, one "
            r"row per example; got shape \(2,\) for 2 examples",
        ),
        (
            _batch_mean,
            ValueError,
            r"one row per example; got shape \(1, 784\) for 2 examples",
        ),
        (
            _class_index,
            TypeError,
            r"`features` \(callable _class_index\) must give floating-point values, got torch.int64",
        ),
    ],
    ids=["tuple-layer", "unused-layer", "layer-twice", "list", "1-d", "batch-mean", "int"],
)
def test_feature_outputs_are_checked_before_training(tmp_path, features, error, match):
    _refused_before_training(tmp_path, LinearProbeCallback(features=features), error, match)


def test_feature_outputs_are_checked_at_train_start_for_loaders(tmp_path):
    _refused_before_training(
        tmp_path,
        LinearProbeCallback(features="unused"),
        ValueError,
        r"`features` \('unused'\) must name a layer that _Layers.forward runs once; it ran 0",
        how="loader",
    )


def _first_row_once_trained(pl_module, x):
    """Right at fit start; one row per batch once the model has trained."""
    f = x.flatten(1)
    return f[:1] if pl_module.trainer.global_step > 0 else f


def test_bad_rows_at_the_epoch_end_are_refused(tmp_path):
    cb = LinearProbeCallback(features=_first_row_once_trained, batch_size=16)
    with pytest.raises(
        ValueError,
        match=r"`features` \(callable _first_row_once_trained\) must give .* one row per "
        r"example; got shape \(1, 784\) for 16 examples",
    ):
        _fit(tmp_path, cb, (_dataset(64), _dataset(32, seed=1)))
    assert cb.history == []


class _Noisy(ClassifierModule):
    """Draws from the global RNG in every forward, in eval mode too (as a module with
    sampling layers may); with BatchNorm (running statistics) and dropout."""

    def forward(self, x):
        return super().forward(x + 0.01 * torch.randn_like(x))


def _noisy_classifier() -> ClassifierModule:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 5, stride=3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(256, 10),
    )
    return _Noisy(net, optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9))


def _run_noisy(tmp_path, callbacks):
    pl.seed_everything(0)
    model = _noisy_classifier()
    trainer = quick_trainer(tmp_path, callbacks, max_epochs=2)
    trainer.fit(model, RandomImageDataModule(batch_size=32, num_train=256, val_size=64))
    momentum = [s["momentum_buffer"] for s in trainer.optimizers[0].state.values()]
    return model.state_dict(), momentum, torch.get_rng_state()


def test_the_checks_leave_the_training_unchanged(tmp_path):
    """Same parameters, BatchNorm statistics, optimizer state and RNG stream with or without
    the callback (its check at fit start and its probe at each epoch end)."""
    plain = _run_noisy(tmp_path / "plain", [])
    probed = _run_noisy(
        tmp_path / "probed", [LinearProbeCallback(features="net.4", max_train=64, max_val=32)]
    )
    for name, value in plain[0].items():
        assert torch.equal(probed[0][name], value), name
    assert all(torch.equal(a, b) for a, b in zip(plain[1], probed[1], strict=True))
    assert torch.equal(plain[2], probed[2])


# -- 3. modules whose forward does not read data examples: probe_forward ----------------------


def test_layer_features_of_a_gan_discriminator(tmp_path):
    pl.seed_everything(0)
    torch.manual_seed(0)
    gan = GANModule(TinyGenerator(latent_dim=4), tiny_discriminator(), latent_dim=4)
    dm = RandomImageDataModule(
        shape=(1, 8, 8), num_train=192, val_size=64, batch_size=32, normalization="symmetric"
    )
    seen = []
    gan.discriminator[1].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    cb = LinearProbeCallback(features="discriminator.1", max_train=128, max_val=64)
    trainer = quick_trainer(tmp_path, [cb])
    trainer.fit(gan, dm)
    assert len(cb.history) == 1 and 0.0 <= cb.history[0]["probe/acc"] <= 1.0
    assert "probe/acc" in trainer.callback_metrics
    assert (2, 4, 4, 4) in seen  # the check at fit start ran the discriminator


class _NoProbeForward(GANModule):
    """A GAN module without ``probe_forward``: its ``forward`` reads latents, not images."""

    probe_forward = None


@pytest.mark.skipif(not hasattr(Exception, "add_note"), reason="exception notes: Python 3.11")
def test_a_forward_that_does_not_read_examples_is_explained_before_training(tmp_path):
    torch.manual_seed(0)
    gan = _NoProbeForward(TinyGenerator(latent_dim=4), tiny_discriminator(), latent_dim=4)
    dm = RandomImageDataModule(shape=(1, 8, 8), num_train=96, val_size=32, batch_size=32)
    trainer = quick_trainer(tmp_path, [LinearProbeCallback(features="discriminator.1")])
    with pytest.raises(RuntimeError) as raised:  # the generator's Linear on images
        trainer.fit(gan, dm)
    assert trainer.global_step == 0
    (note,) = raised.value.__notes__
    assert note.startswith(
        "LinearProbeCallback: raised while running `features` ('discriminator.1') on 2 "
        "validation examples before training. Layer features run _NoProbeForward.forward(x)"
    )
    assert "defines `probe_forward(x)`" in note


# -- 4. bf16-true ----------------------------------------------------------------------------


def _flat_pixels(pl_module, x):
    return x.flatten(1)


@pytest.mark.parametrize("features", ["net.4", _flat_pixels], ids=["layer", "callable"])
def test_bf16_true(tmp_path, features):
    pl.seed_everything(0)
    model = tiny_classifier()
    cb = LinearProbeCallback(features=features, max_train=256, max_val=64)
    trainer = quick_trainer(tmp_path, [cb], precision="bf16-true")
    trainer.fit(model, RandomImageDataModule(batch_size=32, num_train=384, val_size=64))
    assert next(model.parameters()).dtype == torch.bfloat16
    assert len(cb.history) == 1
    assert cb.history[0]["probe/acc"] > 0.5  # 10 well-separated classes: chance is 0.1


# -- DDP: every rank raises, the same error where the gathered features decide ---------------


class _Ranks:
    def __init__(self, world: int) -> None:
        self.world_size = world


def _ranks_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world, port)
    try:
        reduce = strategy_sum(_Ranks(world))
        out = {}
        # rank 1's own output check failed: both ranks raise, neither waits in the gather
        problem = TypeError("`features` (callable f) must output a Tensor, got list.")
        try:
            gather_features(
                "callable f", torch.ones(3, 2), problem if rank else None, reduce, "cpu"
            )
        except TypeError as e:
            out["problem"] = str(e)
        # different widths on the two ranks: refused on both
        try:
            gather_features("callable f", torch.ones(3, 2 + rank), None, reduce, "cpu")
        except ValueError as e:
            out["widths"] = str(e)
        # a NaN in rank 0's rows: the gathered features decide, the same on both ranks
        f = torch.ones(3, 2)
        if rank == 0:
            f[1, 1] = float("nan")
        gathered = gather_features("'head'", f, None, reduce, "cpu")
        try:
            check_gathered("'head'", 0, {"validation": (gathered, torch.arange(6) % 2)})
        except ValueError as e:
            out["finite"] = str(e)
        # the features raised on rank 1's shard (e.g. non-finite NFK rows): both raise
        try:
            gather_features(
                "'nfk'", torch.ones(0, 0), FloatingPointError("bad rows") if rank else None,
                reduce, "cpu",
            )  # fmt: skip
        except (FloatingPointError, RuntimeError) as e:
            out["raised"] = f"{type(e).__name__}: {e}"
        # a rank without rows learns the width from the other: both hold the same 3 rows
        out["empty"] = gather_features(
            "'head'",
            torch.ones(0, 0) if rank == 0 else torch.full((3, 2), 5.0),
            None,
            reduce,
            "cpu",
        )
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


@pytest.mark.slow  # 17 s on the 2-core EPYC: with the slow tests, which CI runs too
def test_ranks_refuse_together(tmp_path):
    run_two_gloo(_ranks_worker, tmp_path, 120, "the 2-process feature checks")
    zero, one = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert one["problem"] == "`features` (callable f) must output a Tensor, got list."
    assert zero["problem"] == (
        "`features` (callable f) failed its output check on process 1 (TypeError): see that "
        "process's error for the value seen and the cure."
    )
    assert zero["widths"] == one["widths"]
    assert "the processes' widths differ: [2, 3]" in zero["widths"]
    assert zero["finite"] == one["finite"]
    assert "validation split: 1 of 6 rows and 1 of 2 columns (1 NaN, 0 inf)" in zero["finite"]
    for out in (zero, one):
        torch.testing.assert_close(out["empty"], torch.full((3, 2), 5.0))
    assert one["raised"] == "FloatingPointError: bad rows"
    assert zero["raised"].startswith(
        "RuntimeError: `features` ('nfk') raised an error on process 1"
    )
