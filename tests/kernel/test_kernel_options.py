"""The kernel options the representation experiments use: which parameters define the
kernel, the VAE's centring and Fisher normalisation, and the probe's feature scaling;
each against an independent float64 computation (torch.func) or a closed form."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

from lightning_nfk.kernel import VAEEnergy, exact_nfk, fit_logistic_regression, select_and_fit
from tests.helpers.models import TinyVAE

TOL = 1e-10  # float64 throughout


def reference_scores(vae: TinyVAE, energy: VAEEnergy, x: torch.Tensor) -> torch.Tensor:
    """(N, P) per-example ELBO gradients w.r.t. every parameter, torch.func, float64."""
    (eps,) = energy.extras(x)
    params = {n: p.detach() for n, p in vae.named_parameters()}

    def elbo(p, xi, ei):
        mu, logvar, logits = functional_call(vae, p, (xi[None], ei[:1]))
        ll = -torch.nn.functional.binary_cross_entropy_with_logits(
            logits, xi[None], reduction="sum"
        )
        kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum()
        return ll - kl

    g = vmap(grad(elbo), in_dims=(None, 0, 0))(params, x, eps)
    return torch.cat([g[n].reshape(len(x), -1) for n in params], dim=1)


@pytest.fixture
def vae_and_data():
    torch.manual_seed(0)
    vae = TinyVAE().double()
    x = torch.rand(40, 8, dtype=torch.float64)
    return vae, x


def test_vae_options_against_torch_func(vae_and_data):
    vae, x = vae_and_data
    base = VAEEnergy(vae, num_samples=1)
    g = reference_scores(vae, base, x)
    for centring in (None, "data"):
        for fisher in ("data", None):
            v = exact_nfk(
                VAEEnergy(vae, num_samples=1, centring=centring, fisher=fisher), x
            ).fisher_vectors
            u = g - g.mean(0) if centring == "data" else g
            expect = u / (u.square().mean(0) + 1e-8).sqrt() if fisher == "data" else u
            torch.testing.assert_close(v, expect, rtol=TOL, atol=TOL)


def test_parameter_subset_is_those_columns(vae_and_data):
    vae, x = vae_and_data
    names = [n for n, _ in vae.named_parameters()]
    sizes = [p.numel() for _, p in vae.named_parameters()]
    full = exact_nfk(VAEEnergy(vae), x).fisher_vectors
    sub = exact_nfk(VAEEnergy(vae, parameters=("enc",)), x).fisher_vectors
    cols = torch.cat(
        [
            torch.arange(sum(sizes[:i]), sum(sizes[: i + 1]))
            for i, n in enumerate(names)
            if n.startswith("enc")
        ]
    )
    assert sub.shape == (len(x), len(cols)) and len(cols) < full.shape[1]
    torch.testing.assert_close(sub, full[:, cols], rtol=TOL, atol=TOL)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"parameters": "enc"}, TypeError, r"`parameters` must be None or a sequence"),
        ({"parameters": ("nothing",)}, ValueError, r"`parameters` \['nothing'\] selects none"),
        ({"centring": "samples"}, ValueError, r"`centring` must be None or 'data', got 'samples'"),
        ({"fisher": "identity"}, ValueError, r"`fisher` must be None or 'data', got 'identity'"),
    ],
)
def test_bad_vae_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        VAEEnergy(TinyVAE(), **kwargs)


def test_probe_global_scaling_keeps_relative_feature_sizes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=g, dtype=torch.float64) * torch.tensor([10.0, 1.0, 0.1, 0.01])
    y = (x[:, 0] > 0).long() + 2 * (x[:, 3] > 0).long()
    std = fit_logistic_regression(x, y, 4, 1e-3, scaling="standardize")
    glob = fit_logistic_regression(x, y, 4, 1e-3, scaling="global")
    torch.testing.assert_close(std.std, x.std(0, unbiased=False))
    expect = x.var(0, unbiased=False).mean().sqrt()
    torch.testing.assert_close(glob.std, expect.expand(4))
    # one global scale: multiplying the features by c gives the same probe
    scaled = fit_logistic_regression(7.0 * x, y, 4, 1e-3, scaling="global")
    torch.testing.assert_close(scaled.logits(7.0 * x), glob.logits(x), rtol=1e-6, atol=1e-6)
    # standardisation recovers the tiny feature 3 that carries half the label; one global
    # scale leaves it 1000x below feature 0 under the same penalty
    assert std.accuracy(x, y) > glob.accuracy(x, y)
    with pytest.raises(ValueError, match=r"`scaling` must be one of .*got 'pca'"):
        select_and_fit(x, y, 4, scaling="pca")


def test_probe_callback_checks_scaling():
    from lightning_nfk.callbacks import LinearProbeCallback

    assert LinearProbeCallback(scaling="global").scaling == "global"
    with pytest.raises(ValueError, match=r"`scaling` must be one of"):
        LinearProbeCallback(scaling="whiten")


def test_vae_antithetic_noise_comes_in_pairs_and_cancels_odd_terms(vae_and_data):
    vae, x = vae_and_data
    energy = VAEEnergy(vae, num_samples=4, antithetic=True)
    (eps,) = energy.extras(x)
    torch.testing.assert_close(eps[:, 2:], -eps[:, :2], rtol=0, atol=0)

    # the score is the mean of the single-sample ELBOs at each of the four noise draws,
    # computed here from the VAE's own forward pass
    def one_sample(e: torch.Tensor) -> torch.Tensor:
        mu, logvar, logits = vae(x, e)
        ll = -torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none")
        return ll.sum(1) - 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)

    expect = torch.stack([one_sample(eps[:, s]) for s in range(4)]).mean(0)
    torch.testing.assert_close(energy.score(vae, x, eps), expect, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"`num_samples` must be even, got 3"):
        VAEEnergy(vae, num_samples=3, antithetic=True)
    with pytest.raises(TypeError, match=r"`antithetic` must be a bool or None"):
        VAEEnergy(vae, antithetic="yes")


def test_parameter_prefixes_respect_module_boundaries():
    from torch import nn

    from lightning_nfk.kernel import ClassifierEnergy, GANEnergy
    from lightning_nfk.kernel.per_example import ScoreJacobian

    net = nn.Sequential(*[nn.Linear(2, 2) for _ in range(11)])  # names 0.* .. 10.*
    jac = ScoreJacobian(ClassifierEnergy(net, parameters=("1",)))
    assert jac.names == ["1.weight", "1.bias"]  # not 10.*
    gan = GANEnergy(nn.Linear(4, 1), nn.Linear(2, 4), latent_dim=2, parameters=("bias",))
    assert ScoreJacobian(gan).num_parameters == 1


def test_saved_vae_kernel_refuses_other_noise_settings(tmp_path, vae_and_data):
    from lightning_nfk.kernel import LowRankNFK

    vae, x = vae_and_data
    path = tmp_path / "vae.nfk"
    LowRankNFK(VAEEnergy(vae), k=2, n_iter=1).fit(x).save(path)
    loaded = LowRankNFK.load(path, VAEEnergy(vae))
    assert loaded.transform(x[:3]).shape == (3, 2)
    with pytest.raises(ValueError, match=r"num_samples=8 \(the energy has 1\)"):
        LowRankNFK.load(path, VAEEnergy(vae, num_samples=1))
    with pytest.raises(ValueError, match=r"parameters=None \(the energy has \['enc'\]\)"):
        LowRankNFK.load(path, VAEEnergy(vae, parameters=("enc",)))
