"""The VAE's frozen noise on CUDA: bit-identical to the CPU's (every operation of the draw is
exact in IEEE 754: integer arithmetic, float64 +, -, *, /, sqrt, integer-valued float64
products below 2^53), drawn on the device without a host sync.
"""

from __future__ import annotations

import pytest
import torch

from lightning_nfk.kernel import VAEEnergy
from tests.cuda.gpu import no_host_sync
from tests.helpers.models import TinyVAE

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 40, 40)], ids=["mnist", "two-levels"])
def test_vae_noise_on_the_device_is_the_cpus(shape, device):
    energy = VAEEnergy(TinyVAE(latent_dim=16), num_samples=8, seed=3)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand(257, *shape, generator=g, device="cpu", dtype=torch.float64)
    (want,) = energy.extras(x)
    x_dev = x.to(device)
    with no_host_sync(device):  # drawn where the inputs are: no copy to the host
        (got,) = energy.extras(x_dev)
        (half,) = energy.extras(x_dev[100:])  # another batch: the same noise per example
    assert got.device == x_dev.device and got.dtype == torch.float64
    assert torch.equal(got.cpu(), want)
    assert torch.equal(half.cpu(), want[100:])
