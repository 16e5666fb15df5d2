"""state_dict / load_state_dict and save / load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_nfk.kernel import ClassifierEnergy, LowRankNFK
from tests.helpers.models import make_case


@pytest.mark.parametrize("strategy", ["blocked", "matrix_free"])
def test_save_load_round_trip(tmp_path, strategy):
    case = make_case("cnn")
    nfk = LowRankNFK(case.energy, k=3, oversample=5, strategy=strategy, dtype=torch.float64).fit(
        case.x
    )
    path = tmp_path / "nfk.pt"
    nfk.save(path)
    loaded = LowRankNFK.load(
        path, make_case("cnn", seed=5).energy
    )  # other weights, same architecture
    assert loaded.config == nfk.config and loaded.strategy_used == strategy
    for name in (
        "singular_values",
        "eigenvalues",
        "explained_variance_ratio",
        "total_variance",
        "components",
    ):
        assert torch.equal(getattr(loaded, name), getattr(nfk, name)), name
    assert loaded.num_examples == nfk.num_examples
    torch.testing.assert_close(
        loaded.transform(case.x_new), nfk.transform(case.x_new), rtol=0, atol=0
    )


def test_state_dict_is_weights_only_loadable(tmp_path):
    case = make_case("gan")
    nfk = LowRankNFK(case.energy, k=2, oversample=4).fit(case.x)
    torch.save(nfk.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    other = LowRankNFK(case.energy, k=2, oversample=4)
    other.load_state_dict(state)
    torch.testing.assert_close(
        other.transform(case.x_new), nfk.transform(case.x_new), rtol=0, atol=0
    )


def test_load_into_a_different_architecture_is_refused(tmp_path):
    case = make_case("mlp")
    nfk = LowRankNFK(case.energy, k=2, oversample=4).fit(case.x)
    nfk.save(tmp_path / "nfk.pt")
    with pytest.raises(ValueError, match=r"saved parameters do not match the energy's module"):
        LowRankNFK.load(tmp_path / "nfk.pt", ClassifierEnergy(nn.Linear(6, 3)))


def test_the_snapshot_is_keyed_by_the_modules_names_and_older_states_load():
    case = make_case("cnn")
    nfk = LowRankNFK(case.energy, k=2, oversample=4).fit(case.x)
    module_state = case.energy.module.state_dict()
    assert set(nfk.snapshot) == set(module_state)
    for name, t in module_state.items():
        assert torch.equal(nfk.snapshot[name], t), name
    # version 2 keyed the snapshot by an internal wrapper's names ("net." + the module's)
    state = nfk.state_dict()
    old = {**state, "version": 2}
    for part in ("theta", "constants"):
        old[part] = {f"net.{n}": t for n, t in state[part].items()}
    other = LowRankNFK(case.energy, k=2, oversample=4)
    other.load_state_dict(old)
    assert set(other.snapshot) == set(module_state)
    torch.testing.assert_close(
        other.transform(case.x_new), nfk.transform(case.x_new), rtol=0, atol=0
    )


def test_a_version_3_state_without_products_loads():
    case = make_case("mlp")
    nfk = LowRankNFK(case.energy, k=2, oversample=4, strategy="blocked", n_iter=2).fit(case.x)
    assert nfk.products == 3
    state = nfk.state_dict()
    v3 = {**state, "version": 3}
    v3["result"] = {k: v for k, v in state["result"].items() if k != "products"}
    other = LowRankNFK(case.energy, k=2, oversample=4)
    other.load_state_dict(v3)
    assert other.products == 0  # not recorded then
    torch.testing.assert_close(other.transform(case.x), nfk.transform(case.x), rtol=0, atol=0)
