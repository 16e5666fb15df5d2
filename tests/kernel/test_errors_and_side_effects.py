"""What a kernel computation must never do, and every error it raises."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nfk.kernel import (
    ClassifierEnergy,
    Energy,
    LowRankNFK,
    NonFiniteGradientError,
    NTKEnergy,
)
from tests.helpers.models import make_case


def _train_mode_model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(3 * 36, 4),
    )
    net(torch.randn(16, 1, 6, 6))  # non-trivial running statistics
    net[2].eval()  # a mixed train/eval state must come back as it was
    return net


class CountingEnergy(ClassifierEnergy):
    calls = 0

    def score(self, module, x, *extras):
        CountingEnergy.calls += 1
        return super().score(module, x, *extras)


@pytest.mark.parametrize("strategy", ["dense", "blocked", "matrix_free"])
def test_no_side_effects(strategy):
    net = _train_mode_model()
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.5)
    net[0].bias.requires_grad_(False)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    grads = [p.grad.clone() for p in net.parameters()]
    modes = [m.training for m in net.modules()]
    requires = [p.requires_grad for p in net.parameters()]
    x = torch.randn(40, 1, 6, 6)

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    nfk = LowRankNFK(ClassifierEnergy(net), k=3, oversample=5, strategy=strategy).fit(x)
    nfk.transform(x[:5])
    assert torch.equal(torch.rand(3), expected_next), "the global RNG stream moved"

    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))
    assert [m.training for m in net.modules()] == modes
    assert [p.requires_grad for p in net.parameters()] == requires
    # frozen parameters are not part of theta
    assert nfk.num_parameters == sum(p.numel() for p in net.parameters() if p.requires_grad)


def test_dropout_and_train_mode_batchnorm_do_not_corrupt_the_kernel():
    net = _train_mode_model()
    x = torch.randn(40, 1, 6, 6)
    train = LowRankNFK(ClassifierEnergy(net), k=3, oversample=5, seed=0).fit(x)
    net.eval()
    evals = LowRankNFK(ClassifierEnergy(net), k=3, oversample=5, seed=0).fit(x)
    assert torch.equal(train.singular_values, evals.singular_values)


def test_runs_under_inference_mode_and_no_grad():
    case = make_case("mlp")
    base = LowRankNFK(case.energy, k=3, oversample=4).fit(case.x)
    with torch.inference_mode():
        x = case.x.clone()
        nfk = LowRankNFK(case.energy, k=3, oversample=4).fit(x)
        emb = nfk.transform(x[:4])
    with torch.no_grad():
        nfk2 = LowRankNFK(case.energy, k=3, oversample=4).fit(case.x)
    assert torch.equal(nfk.singular_values, base.singular_values)
    assert torch.equal(nfk2.singular_values, base.singular_values)
    assert emb.shape == (4, 3)


def test_non_finite_gradients_are_counted():
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(30, 4)
    x[[2, 5, 11]] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"3 of 30 fitting examples have non-finite"):
        LowRankNFK(ClassifierEnergy(net), k=2, oversample=2).fit(x)
    nfk = LowRankNFK(ClassifierEnergy(net), k=2, oversample=2).fit(x[12:])
    with pytest.raises(NonFiniteGradientError, match=r"2 of 6 inputs have non-finite"):
        nfk.transform(x[:6])


def test_nondeterministic_energy_is_refused():
    class Noisy(ClassifierEnergy):
        def score(self, module, x, *extras):
            return super().score(module, x) + torch.randn(x.shape[0])

    with pytest.raises(ValueError, match=r"Noisy.score is not deterministic"):
        LowRankNFK(Noisy(nn.Linear(4, 3)), k=2, oversample=2).fit(torch.randn(20, 4))


def test_energy_with_wrong_output_shape_is_refused():
    class Summed(Energy):
        def score(self, module, x, *extras):
            return module(x).sum()

    with pytest.raises(
        ValueError, match=r"Summed.score must return one scalar per example, shape \(4,\)"
    ):
        LowRankNFK(Summed(nn.Linear(4, 3)), k=2, oversample=2).fit(torch.randn(20, 4))
    with pytest.raises(ValueError, match=r"NTKEnergy expects a scalar output per example"):
        LowRankNFK(NTKEnergy(nn.Linear(4, 3)), k=2, oversample=2).fit(torch.randn(20, 4))
    with pytest.raises(
        ValueError, match=r"ClassifierEnergy expects the model to return logits of shape \(B, C\)"
    ):
        LowRankNFK(
            ClassifierEnergy(nn.Sequential(nn.Linear(4, 3), nn.Flatten(0))), k=1, oversample=0
        ).fit(torch.randn(20, 4))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": 0}, ValueError, r"`k` must be >= 1, got 0"),
        ({"k": 2.5}, TypeError, r"`k` must be an int, got float \(2.5\)"),
        ({"oversample": -1}, ValueError, r"`oversample` must be >= 0, got -1"),
        ({"n_iter": -1}, ValueError, r"`n_iter` must be >= 0, got -1"),
        ({"damping": -1.0}, ValueError, r"`damping` must be a finite number >= 0, got -1.0"),
        ({"damping": float("nan")}, ValueError, r"`damping` must be a finite number >= 0, got nan"),
        ({"strategy": "fast"}, ValueError, r"`strategy` must be one of .*got 'fast'"),
        (
            {"dtype": torch.int64},
            ValueError,
            r"`dtype` must be None, torch.float32 or torch.float64, got torch.int64\.",
        ),
        ({"memory_budget": 0}, ValueError, r"`memory_budget` must be >= 1, got 0"),
        ({"reduce": 3}, TypeError, r"`reduce` must be callable or None, got int"),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else next(iter(v)),
)
def test_invalid_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LowRankNFK(ClassifierEnergy(nn.Linear(4, 3)), **kwargs)


def test_energy_argument_type():
    with pytest.raises(
        TypeError, match=r"`energy` must be an lightning_nfk.kernel.Energy, got Linear"
    ):
        LowRankNFK(nn.Linear(4, 3))


@pytest.mark.parametrize(
    ("data", "kwargs", "error", "match"),
    [
        (torch.randn(0, 4), {}, ValueError, r"`data` is empty"),
        (
            DataLoader(TensorDataset(torch.randn(0, 4)), batch_size=4),
            {},
            ValueError,
            r"`data` is empty",
        ),
        (
            torch.randn(10, 4),
            {"k": 8, "oversample": 5},
            ValueError,
            r"`k` \+ `oversample` \(8 \+ 5 = 13\) must not exceed min\(number of examples, number of parameters\) = min\(10, 15\)",
        ),
        (torch.randn(100, 4), {"k": 10, "oversample": 10}, ValueError, r"min\(100, 15\)"),
        (
            torch.randn(50, 4),
            {"k": 2, "oversample": 2, "memory_budget": 200, "strategy": "blocked"},
            ValueError,
            r"holds 4 P x l operands with P = 15 parameters and l = k \+ oversample = 4: "
            r"0.0 MiB, and at least one gradient row beside them: more than `memory_budget`: "
            r"0.0 MiB. Lower k \+ oversample",
        ),
        (
            torch.randn(50, 4),
            {"k": 2, "strategy": "dense", "memory_budget": 1000},
            ValueError,
            r"strategy='dense'\) needs V \(50 x 15\).*more than `memory_budget`",
        ),
        (5, {}, TypeError, r"`data` must be a tensor of inputs or an iterable"),
        (
            [{"x": torch.randn(3, 4)}],
            {},
            TypeError,
            r"dict batches must hold tensors 'input_ids' .* or 'pixel_values'; got keys \['x'\]",
        ),
    ],
    ids=[
        "empty-tensor",
        "empty-loader",
        "too-wide-n",
        "too-wide-p",
        "sketch-over-budget",
        "dense-over-budget",
        "not-iterable",
        "dict-batches",
    ],
)
def test_invalid_data_is_refused_before_any_pass(data, kwargs, error, match):
    kwargs = {"k": 2, "oversample": 2, **kwargs}
    CountingEnergy.calls = 0
    with pytest.raises(error, match=match):
        LowRankNFK(CountingEnergy(nn.Linear(4, 3)), **kwargs).fit(data)
    assert CountingEnergy.calls == 0


def test_results_before_fit_raise():
    nfk = LowRankNFK(ClassifierEnergy(nn.Linear(4, 3)))
    with pytest.raises(RuntimeError, match=r"not fitted yet: call `fit\(data\)` first"):
        nfk.singular_values  # noqa: B018
    with pytest.raises(RuntimeError, match=r"not fitted yet"):
        nfk.transform(torch.randn(2, 4))


def test_half_precision_model_is_fitted_in_float32():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(40, 4)
    ref = LowRankNFK(ClassifierEnergy(net), k=2, oversample=4).fit(x)
    half = LowRankNFK(ClassifierEnergy(net.to(torch.bfloat16)), k=2, oversample=4).fit(x.bfloat16())
    assert half.singular_values.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())  # the model is untouched
    # the weights were rounded to bfloat16 (relative error <= eps_bf16 / 2 each, in two
    # layers): V, hence each sigma_i, moves by about eps_bf16 sigma_1 (Weyl)
    eps16 = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(
        half.singular_values,
        ref.singular_values,
        rtol=2 * eps16,
        atol=2 * eps16 * ref.singular_values[0].item(),
    )
