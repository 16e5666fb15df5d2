"""Transformers through the engine: the sequence energy's exact padding, dict batches,
vmap's batched path over scaled_dot_product_attention, and models from the ecosystem (a
Hugging Face causal LM, a timm ViT; skipped without the extras) against a float64
torch.func reference. The small GPT and ViT of the library are in the reference tests of
test_low_rank_nfk.py (cases "gpt" and "vit")."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

from lightning_nfk.kernel import (
    ClassifierEnergy,
    LowRankNFK,
    SequenceEnergy,
    pack_tokens,
    unpack_tokens,
)
from lightning_nfk.kernel.per_example import ScoreJacobian
from lightning_nfk.models import GPT, ViT
from tests.helpers.models import padded_tokens, sequence_log_likelihood

EPS64 = torch.finfo(torch.float64).eps


def _gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(vocab_size=13, context=12, dim=16, depth=2, heads=2).double()


def _pad(ids: torch.Tensor, t: int, side: str) -> torch.Tensor:
    """One sequence (L,) padded with id 7 to t tokens on ``side``: packed (1, 2, t)."""
    pad = t - ids.shape[0]
    full = torch.full((pad,), 7, dtype=ids.dtype)
    mask = torch.ones_like(ids)
    if side == "right":
        return pack_tokens(torch.cat([ids, full])[None], torch.cat([mask, 0 * full])[None])
    return pack_tokens(torch.cat([full, ids])[None], torch.cat([0 * full, mask])[None])


@pytest.mark.parametrize("pass_mask", [True, False])
def test_padding_does_not_change_the_score_or_its_gradient(pass_mask):
    energy = SequenceEnergy(_gpt(), pass_mask=pass_mask)
    jac = ScoreJacobian(energy)
    ids = torch.randint(0, 13, (6,), generator=torch.Generator().manual_seed(1))
    plain = pack_tokens(ids[None])
    sides = ["right", "left"] if pass_mask else ["right"]  # ids alone: right padding only
    g0, s0 = jac.gradients(plain), jac.scores(plain)
    for side in sides:
        x = _pad(ids, 12, side)
        torch.testing.assert_close(jac.scores(x), s0, rtol=1e-12, atol=0)
        atol = 64 * EPS64 * g0.abs().max().item()
        torch.testing.assert_close(jac.gradients(x), g0, rtol=1e-10, atol=atol)


def test_padding_changes_the_score_when_the_model_ignores_the_mask():
    # control: without the mask, left padding is seen by the model (so the test above
    # could fail)
    jac = ScoreJacobian(SequenceEnergy(_gpt(), pass_mask=False))
    ids = torch.randint(0, 13, (6,), generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(jac.scores(_pad(ids, 12, "left")), jac.scores(pack_tokens(ids[None])))


def test_dict_batches_equal_packed_tensors():
    energy = SequenceEnergy(_gpt())
    x = padded_tokens(40, 13, 12, torch.Generator().manual_seed(2))
    items = [{"input_ids": xi[0], "attention_mask": xi[1]} for xi in x]
    loader = DataLoader(items, batch_size=16)  # default collate: dicts of (B, T)
    a = LowRankNFK(energy, k=3, oversample=5, n_iter=4, strategy="blocked").fit(loader)
    b = LowRankNFK(energy, k=3, oversample=5, n_iter=4, strategy="blocked").fit(x)
    torch.testing.assert_close(a.singular_values, b.singular_values, rtol=1e-10, atol=0)
    torch.testing.assert_close(a.transform(loader), b.transform(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("strategy", ["blocked", "matrix_free"])
def test_vmap_takes_the_batched_attention_path(strategy):
    # float32: torch's fused CPU attention kernel, which vmap would run example by example
    # (with a "performance drop" warning) without the engine's math backend
    torch.manual_seed(0)
    lm = GPT(vocab_size=13, context=12, dim=16, depth=1, heads=2)
    x = padded_tokens(24, 13, 12, torch.Generator().manual_seed(3))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        LowRankNFK(SequenceEnergy(lm), k=3, oversample=3, n_iter=1, strategy=strategy).fit(x)
    assert not [w for w in seen if "batching rule" in str(w.message)]
    # control: the same vmap with the fused kernel does warn
    params = {k: v.detach() for k, v in lm.named_parameters()}

    def score(p, xi):
        return functional_call(lm, p, (xi[None, 0],)).sum()

    with warnings.catch_warnings(record=True) as seen, sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        warnings.simplefilter("always")
        vmap(grad(score), in_dims=(None, 0))(params, x)
    assert [w for w in seen if "batching rule" in str(w.message)]


def test_token_inputs_are_checked():
    with pytest.raises(ValueError, match="`input_ids` must be integer"):
        pack_tokens(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"`attention_mask` has shape \(2, 3\)"):
        pack_tokens(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 4\)"):
        unpack_tokens(torch.zeros(2, 3, 4, dtype=torch.long))
    # a model that returns (B, T, dim) features, not logits over the vocabulary: fine;
    # one that returns (B, dim): refused, naming the shape
    pooled = torch.nn.Sequential(torch.nn.Embedding(13, 4), torch.nn.Flatten())
    with pytest.raises(ValueError, match=r"logits of shape \(B, T, V\) = \(4, 5, V\)"):
        LowRankNFK(SequenceEnergy(pooled, pass_mask=False), k=2, oversample=2).fit(
            torch.randint(0, 13, (16, 5))
        )


# -- models from the ecosystem (optional extras) ----------------------------------------------
def _reference_sigma(model, x, score) -> torch.Tensor:
    """Singular values of V (data centring and diagonal Fisher, damping 1e-8) from
    per-example gradients by vmap(grad(functional_call)) in float64."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    with sdpa_kernel(SDPBackend.MATH):
        g = vmap(grad(lambda p, xi: score(p, xi)), in_dims=(None, 0))(params, x)
    g = torch.cat([g[k].reshape(x.shape[0], -1) for k in params], dim=1)
    u = g - g.mean(0)
    v = u / torch.sqrt(u.square().mean(0) + 1e-8)
    return torch.linalg.svdvals(v)


def _within_residuals(nfk: LowRankNFK, sigma: torch.Tensor) -> None:
    """Each eigenvalue within its residual bound of the reference (plus round-off)."""
    lam, ref = nfk.singular_values.double().square(), sigma.square()
    bound = nfk.residuals + 1e3 * EPS64 * ref[0] / ref
    assert torch.all((lam - ref).abs() / ref <= bound), (lam, ref, nfk.residuals)
    assert torch.all(nfk.residuals < 1e-3)


def _hf_gpt2(**config):
    """A tiny Hugging Face GPT-2 in float64, eval mode (no dropout), seeded."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=13,
        n_positions=12,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=None,
        eos_token_id=None,
        **config,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def test_hugging_face_causal_lm_matches_the_reference():
    model = _hf_gpt2()
    x = padded_tokens(40, 13, 12, torch.Generator().manual_seed(4))

    def score(p, xi):
        def logits(ids, mask, positions):
            # a 4-D boolean mask (HF's 2-D path branches on the mask's values: no vmap)
            t = ids.shape[0]
            keep = torch.ones(t, t, dtype=torch.bool).tril() & (mask[None, :] == 1)
            keep = keep | torch.eye(t, dtype=torch.bool)
            kw = {"attention_mask": keep[None, None], "position_ids": positions[None]}
            return functional_call(model, p, (ids[None],), kw).logits[0]

        return sequence_log_likelihood(logits, xi)

    sigma = _reference_sigma(model, x, score)
    nfk = LowRankNFK(SequenceEnergy(model), k=3, oversample=10, n_iter=20, strategy="blocked")
    nfk.fit(x)
    _within_residuals(nfk, sigma[:3])
    # padding is exact for the Hugging Face model too
    jac = ScoreJacobian(SequenceEnergy(model))
    ids = torch.randint(0, 13, (6,), generator=torch.Generator().manual_seed(1))
    g0 = jac.gradients(pack_tokens(ids[None]))
    for side in ("right", "left"):
        torch.testing.assert_close(
            jac.gradients(_pad(ids, 12, side)), g0, rtol=1e-9, atol=1e-9 * g0.abs().max().item()
        )


def test_hugging_face_eager_attention_reads_the_mask():
    # eager attention adds the mask to its scores: the energy's additive mask must make
    # it equal to SDPA attention, padding exact (a boolean mask would add 1 and 0)
    jacs = {
        impl: ScoreJacobian(SequenceEnergy(_hf_gpt2(attn_implementation=impl)))
        for impl in ("eager", "sdpa")
    }
    ids = torch.randint(0, 13, (6,), generator=torch.Generator().manual_seed(1))
    g0 = jacs["sdpa"].gradients(pack_tokens(ids[None]))
    atol = 1e-9 * g0.abs().max().item()
    for side in ("right", "left"):
        x = _pad(ids, 12, side)
        torch.testing.assert_close(jacs["eager"].gradients(x), g0, rtol=1e-9, atol=atol)


def test_timm_vit_matches_the_reference():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=16, depth=2, num_heads=2
    ).double()
    x = torch.randn(40, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def score(p, xi):
        return torch.logsumexp(functional_call(model, p, (xi[None],))[0], dim=0)

    model.eval()
    sigma = _reference_sigma(model, x, score)
    nfk = LowRankNFK(ClassifierEnergy(model), k=3, oversample=10, n_iter=20, strategy="blocked")
    nfk.fit(x)
    _within_residuals(nfk, sigma[:3])


def test_vit_blocks_auto_names_its_children():
    torch.manual_seed(0)
    vit = ViT(image_size=8, patch_size=4, channels=1, num_classes=5, dim=8, depth=2, heads=2)
    nfk = LowRankNFK(ClassifierEnergy(vit), k=3, oversample=3, n_iter=2, strategy="blocked")
    nfk.fit(torch.randn(32, 1, 8, 8), blocks=["blocks.0", "blocks.1", "head"])
    assert list(nfk.block_spectra) == ["blocks.0", "blocks.1", "head"]
    assert 0 < sum(b.trace_share for b in nfk.block_spectra.values()) < 1
