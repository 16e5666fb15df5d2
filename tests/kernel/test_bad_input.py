"""Regressions: bad inputs and faults that once gave a silent wrong answer or an obscure error.

Each gets a clear error naming what is wrong before any pass over the data, or a correct
answer.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nfk.kernel import (
    ClassifierEnergy,
    LowRankNFK,
    NonFiniteGradientError,
    NTKEnergy,
    exact_nfk,
)
from tests.helpers.data import RandomImageDataModule
from tests.helpers.models import make_case

KW = {"k": 4, "oversample": 4, "n_iter": 2}


def tiny_cnn(classes: int = 10, norm: nn.Module | None = None) -> nn.Sequential:
    """A small classifier of 1 x 28 x 28 images; ``norm`` after the convolution."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 5, stride=3),  # (B, 4, 8, 8)
        norm or nn.Identity(),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, 16),
        nn.Tanh(),
        nn.Linear(16, classes),
    )


def _images(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    dm = RandomImageDataModule(num_train=n + 16, val_size=16)
    dm.setup()
    return dm.dataset("train").images.float().div(255), dm.dataset("train").labels


def test_shuffled_loader_has_no_fit_embedding_but_the_same_spectrum():
    x, y = _images()
    energy = ClassifierEnergy(tiny_cnn())
    ordered = LowRankNFK(energy, **KW, strategy="blocked").fit(DataLoader(TensorDataset(x, y), 16))
    shuffled = LowRankNFK(energy, **KW, strategy="blocked").fit(
        DataLoader(TensorDataset(x, y), 16, shuffle=True)
    )
    # float32 sums over the 64 rows in another order: round-off n * eps32 of sigma_1
    tol = len(x) * torch.finfo(torch.float32).eps
    scale = ordered.singular_values[0].item()
    torch.testing.assert_close(
        shuffled.singular_values, ordered.singular_values, rtol=tol, atol=tol * scale
    )
    # (V Z) W against V (Z W): each row a sum of P products, round-off P * eps32 of its scale
    emb, p = ordered.fit_embedding, ordered.num_parameters
    atol = p * torch.finfo(torch.float32).eps * emb.abs().max().item()
    torch.testing.assert_close(emb, ordered.transform(x), rtol=tol, atol=atol)
    with pytest.raises(RuntimeError, match=r"`fit_embedding` is not available: `fit` read a"):
        _ = shuffled.fit_embedding


@pytest.mark.parametrize("through", ["loader", "list"])
def test_random_augmentation_is_refused(through):
    dm = RandomImageDataModule(num_train=96, val_size=16, batch_size=16, augment=True)
    dm.setup()
    loader = dm.train_dataloader()
    data = loader if through == "loader" else _Reshuffling(loader)
    with pytest.raises(ValueError, match=r"does not yield the same examples on every pass"):
        LowRankNFK(ClassifierEnergy(tiny_cnn()), **KW).fit(data)


class _Reshuffling:
    """An iterable (not a DataLoader) whose batches change between passes."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)


def test_the_un_augmented_dataset_is_accepted():
    dm = RandomImageDataModule(num_train=96, val_size=16, batch_size=16, augment=True)
    dm.setup()
    nfk = LowRankNFK(ClassifierEnergy(tiny_cnn()), **KW).fit(DataLoader(dm.dataset("train"), 16))
    assert nfk.num_examples == 80


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_compute_dtypes_are_refused(dtype):
    with pytest.raises(ValueError, match=r"half-precision Fisher vectors overflow"):
        LowRankNFK(ClassifierEnergy(tiny_cnn()), **KW, dtype=dtype)


def test_half_precision_model_is_fitted_in_float32():
    x, _ = _images()
    nfk = LowRankNFK(ClassifierEnergy(tiny_cnn().half()), **KW).fit(x.half())
    assert nfk.singular_values.dtype == torch.float32
    assert torch.isfinite(nfk.singular_values).all() and nfk.singular_values[0] > 0


# -- load ----------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    x, _ = _images()
    torch.manual_seed(0)
    net = tiny_cnn()
    LowRankNFK(ClassifierEnergy(net), **KW).fit(x).save(tmp_path / "nfk.pt")
    return tmp_path / "nfk.pt", net


def test_load_refuses_another_energy_class(saved):
    path, net = saved
    with pytest.raises(ValueError, match=r"was saved for a ClassifierEnergy, not a NTKEnergy"):
        LowRankNFK.load(path, NTKEnergy(nn.Sequential(net, nn.Linear(10, 1))))


def test_load_refuses_other_parameter_shapes(saved):
    path, _ = saved
    five = tiny_cnn(classes=5)
    with pytest.raises(
        ValueError, match=r"has shape \(10, 16\) .* has \(5, 16\) .*number of classes"
    ):
        LowRankNFK.load(path, ClassifierEnergy(five))


def test_load_refuses_other_parameter_dtypes(saved):
    path, _ = saved
    with pytest.raises(
        ValueError, match=r"dtype torch.float32; the energy's module has .* torch.float64"
    ):
        LowRankNFK.load(path, ClassifierEnergy(tiny_cnn().double()))


def test_load_refuses_an_empty_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is not a file saved by LowRankNFK.save"):
        LowRankNFK.load(tmp_path / "empty.pt", ClassifierEnergy(tiny_cnn()))


def test_load_refuses_a_model_state_dict(tmp_path):
    net = tiny_cnn()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"is not a saved LowRankNFK .*module.load_state_dict"):
        LowRankNFK.load(tmp_path / "model.pt", ClassifierEnergy(net))


# -- data and energies -----------------------------------------------------------------------
@pytest.mark.parametrize("where", [0, 37], ids=["first", "later"])
def test_nan_input_gives_the_same_clear_error_wherever_it_is(where):
    x, _ = _images()
    x[where] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"^1 of 64 fitting examples have non-finite"):
        LowRankNFK(ClassifierEnergy(tiny_cnn()), **KW).fit(x)


@pytest.mark.parametrize("strategy", ["dense", "blocked", "matrix_free"])
def test_identical_examples_are_refused(strategy):
    x, _ = _images()
    same = x[:1].expand(64, -1, -1, -1).contiguous()
    with pytest.raises(ValueError, match=r"The 64 fitting examples have the same score gradient"):
        LowRankNFK(ClassifierEnergy(tiny_cnn()), **KW, strategy=strategy).fit(same)


def test_exact_path_refuses_identical_examples_too():
    x, _ = _images()
    with pytest.raises(ValueError, match=r"have the same score gradient"):
        exact_nfk(ClassifierEnergy(tiny_cnn()), x[:1].expand(32, -1, -1, -1))


@pytest.mark.parametrize(
    "norm",
    [nn.BatchNorm2d(4, track_running_stats=False), nn.BatchNorm1d(10, track_running_stats=False)],
    ids=["bn2d", "bn1d"],
)
def test_batch_statistics_in_eval_mode_are_refused(norm):
    x, _ = _images()
    net = (
        tiny_cnn(norm=norm) if isinstance(norm, nn.BatchNorm2d) else nn.Sequential(tiny_cnn(), norm)
    )
    with pytest.raises(
        ValueError, match=r"(depends on the other examples of its batch|fails on a single example)"
    ):
        LowRankNFK(ClassifierEnergy(net), **KW).fit(x)


def test_inputs_that_require_grad_give_detached_results():
    case = make_case("gan")
    leaf = case.x.clone().requires_grad_(True)
    x = leaf * 1.0  # e.g. a generator output, not detached
    nfk = LowRankNFK(case.energy, **KW, strategy="blocked").fit(x)
    for t in (nfk.singular_values, nfk.components, nfk.fit_embedding, nfk.transform(x)):
        assert not t.requires_grad and t.grad_fn is None
    assert leaf.grad is None


def test_transform_of_no_rows_is_empty():
    x, _ = _images()
    nfk = LowRankNFK(ClassifierEnergy(tiny_cnn()), **KW).fit(x)
    assert nfk.transform(x[:0]).shape == (0, KW["k"])


@pytest.mark.parametrize("strategy", ["dense", "blocked"])
def test_a_zero_kernel_is_refused_and_the_previous_fit_kept(strategy):
    energy = NTKEnergy(nn.Linear(16, 1, bias=False))  # g_x = x: zero inputs, zero kernel
    nfk = LowRankNFK(energy, **KW, strategy=strategy).fit(torch.randn(32, 16))
    before = nfk.fit_embedding.clone()
    with pytest.raises(ValueError, match=r"Fisher vectors of the fitting data are all zero"):
        nfk.fit(torch.zeros(32, 16))
    assert torch.equal(nfk.fit_embedding, before)  # the same tensor, untouched
    assert nfk.num_examples == 32


def test_load_refuses_another_format_version(saved):
    path, net = saved
    state = torch.load(path, weights_only=True)
    torch.save({**state, "version": 1}, path)
    with pytest.raises(
        ValueError, match=r"has format version 1; this lightning-nfk reads versions 2 and 3"
    ):
        LowRankNFK.load(path, ClassifierEnergy(net))


def test_load_restores_the_saved_config(saved):
    path, net = saved
    loaded = LowRankNFK.load(path, ClassifierEnergy(net))
    assert (loaded.config.k, loaded.config.oversample, loaded.config.n_iter) == (4, 4, 2)
