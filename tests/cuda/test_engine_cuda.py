"""The engine on CUDA: every strategy and energy gives the CPU's answer, with TF32 left on
by the caller (the engine turns it off inside its fit and restores it), and ``transform``
runs without a host sync.

Tolerances: the same float32 computation on two devices, with the same sketch (drawn on the
CPU from the same seed), differs by round-off only: on the CPU, other chunkings of these
fits move the singular values and the embeddings by about 1e-7 of sigma_1. The singular
values must agree within 1e-4 relative and the embeddings within 1e-5 sigma_1; TF32
products (about 1e-3 relative per product) would not stay inside.
"""

from __future__ import annotations

import pytest
import torch

from lightning_nfk.kernel import LowRankNFK, NFKConfig
from tests.cuda.gpu import no_host_sync, on_device, tf32_flags
from tests.helpers.models import make_case

pytestmark = pytest.mark.cuda

# the package's energies, by their tiny models in tests/helpers/models.py
ENERGIES = {"classifier": "cnn", "gan": "gan", "vae": "vae", "ntk": "ntk"}
STRATEGIES = ["dense", "blocked", "matrix_free"]


def _config(strategy: str) -> NFKConfig:
    return NFKConfig(k=4, oversample=4, n_iter=2, strategy=strategy, chunk_size=16)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("energy", ENERGIES)
def test_fit_on_the_device_equals_the_cpu_fit(energy, strategy, device, tf32_in_the_caller):
    flags_before = tf32_flags(tf32_in_the_caller)
    case = make_case(ENERGIES[energy], n=40)
    cpu_energy = case.energy.to(torch.float32)
    x, x_new = case.x.float(), case.x_new.float()
    expected = LowRankNFK(cpu_energy, _config(strategy)).fit(x)
    nfk = LowRankNFK(on_device(cpu_energy, device), _config(strategy)).fit(x.to(device))
    assert nfk.strategy_used == expected.strategy_used == strategy
    torch.testing.assert_close(
        nfk.singular_values.cpu(), expected.singular_values, rtol=1e-4, atol=0
    )
    assert tf32_flags(tf32_in_the_caller) == flags_before  # restored after the fit
    # embeddings: computed on the device, equal up to each component's sign
    emb = nfk.transform(x_new.to(device))
    want = expected.transform(x_new)
    assert emb.device.type == device.type and emb.dtype == torch.float32
    scale = float(expected.singular_values[0])
    torch.testing.assert_close(emb.abs().cpu(), want.abs(), rtol=0, atol=1e-5 * scale)
    if nfk.fit_embedding is not None:
        assert nfk.fit_embedding.device.type == device.type
    assert tf32_flags(tf32_in_the_caller) == flags_before


@pytest.mark.parametrize("where", ["fitted", "loaded-on-cpu"])
@pytest.mark.parametrize("strategy", ["blocked", "matrix_free"])
def test_transform_has_no_host_sync(strategy, where, device, tmp_path):
    case = make_case("cnn", n=40)
    energy = on_device(case.energy.to(torch.float32), device)
    nfk = LowRankNFK(energy, _config(strategy)).fit(case.x.float().to(device))
    if where == "loaded-on-cpu":  # e.g. a cache read with map_location="cpu"
        nfk.save(tmp_path / "nfk.pt")
        nfk = LowRankNFK.load(tmp_path / "nfk.pt", energy, map_location="cpu")
    x = case.x_new.float().to(device)
    want = nfk.transform(x, check_finite=False)  # warm-up
    with no_host_sync(device):
        got = nfk.transform(x, check_finite=False)
    assert got.device.type == device.type
    # the same computation twice on one device: equal to round-off (GPU kernels may pick
    # other reduction orders between calls)
    scale = float(nfk.singular_values[0])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale)
