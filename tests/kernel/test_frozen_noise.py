"""The VAE's frozen noise generator: Philox4x32-10 against its published answers, the noise
bit-identical for any batching, input dtype and default device (exact operations only),
and its statistics those of independent standard normals.

Bit-identity (``torch.equal``) is what is asked here: the same example must get the same
noise in every pass, whatever batch it comes in, and every operation of the draw is exact
(no reduction whose order could matter), so this is the same computation on one machine.

The statistical checks are run on one fixed draw (deterministic: it passes or fails the
same way every time); each tolerance is five standard errors of the statistic under the
hypothesis of independent N(0, 1) values.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_nfk.kernel.energies.frozen_noise import (
    _cos_sin_2pi,
    _log,
    _uniform,
    content_hash,
    frozen_normal,
    philox4x32,
)

# Random123's kat_vectors: counter (4 words), key (2 words) -> output (4 words)
KNOWN_ANSWERS = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    (
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
        [0xA4093822, 0x299F31D0],
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ),
]


def _words(values: list[int]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor([v], dtype=torch.int64, device="cpu") for v in values)


def test_philox_gives_the_published_answers():
    for counter, key, expected in KNOWN_ANSWERS:
        out = philox4x32(_words(counter), _words(key))
        assert [int(w) for w in out] == expected
    # broadcast: one key per row, one counter per column, each entry its own block
    counters = torch.arange(3, dtype=torch.int64)[None, :]
    keys = torch.tensor([[0], [0xA4093822]], dtype=torch.int64)
    zero = torch.zeros(1, 1, dtype=torch.int64)
    block = philox4x32((counters, zero, zero, zero), (keys, zero))
    assert block[0].shape == (2, 3)
    assert [int(w[0, 0]) for w in block] == KNOWN_ANSWERS[0][2]


def _examples(n: int = 37, features: int = 35) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, 1, 5, 7, generator=g, device="cpu") * 10.0 ** torch.randint(
        -30, 30, (n, 1, 5, 7), generator=g, device="cpu"
    )
    x[0] = 0.0
    x[1] = -0.0  # another bit pattern: another example
    x[2, 0, 0, 0] = float("inf")
    return x


def test_noise_is_the_same_for_any_batching_dtype_and_order():
    x = _examples()
    noise = frozen_normal(x, 3, 10)
    assert noise.shape == (37, 10) and noise.dtype == torch.float64
    assert torch.isfinite(noise).all()
    one_by_one = torch.cat([frozen_normal(x[i : i + 1], 3, 10) for i in range(len(x))])
    assert torch.equal(one_by_one, noise)
    split = torch.cat([frozen_normal(part, 3, 10) for part in x.split([5, 13, 19])])
    assert torch.equal(split, noise)
    order = torch.randperm(len(x), generator=torch.Generator(device="cpu").manual_seed(1))
    assert torch.equal(frozen_normal(x[order], 3, 10), noise[order])
    assert torch.equal(frozen_normal(x.double(), 3, 10), noise)  # the float32 bits count
    assert torch.equal(frozen_normal(x[:, None], 3, 10), noise)  # layout does not
    # a prefix of a longer stream: more samples extend, never change, the first ones
    assert torch.equal(frozen_normal(x, 3, 25)[:, :10], noise)
    # every example, seed and input size its own noise; -0.0 is not 0.0
    assert not torch.equal(noise[0], noise[1])
    assert not torch.equal(frozen_normal(x, 4, 10), noise)
    zeros = [frozen_normal(torch.zeros(1, d, device="cpu"), 3, 4) for d in (2, 3)]
    assert not torch.equal(*zeros)
    assert frozen_normal(x[:0], 3, 10).shape == (0, 10)


def test_long_examples_are_hashed_chunk_by_chunk():
    # 3,000 floats: 6,000 16-bit pieces, three chunks of 2,048, then a second level
    x = torch.rand(4, 3000, generator=torch.Generator(device="cpu").manual_seed(0))
    noise = frozen_normal(x, 0, 6)
    assert torch.equal(torch.cat([frozen_normal(r[None], 0, 6) for r in x]), noise)
    for j in (0, 1500, 2999):  # a change in any chunk, down to the last bit, is seen
        y = x.clone()
        y[0, j] = torch.nextafter(y[0, j], torch.tensor(2.0))
        assert not torch.equal(frozen_normal(y, 0, 6)[0], noise[0]), j
    # the four lanes are distinct hashes; rows that permute each other's values differ
    h = content_hash(torch.stack([x[0], x[0].flip(0)]), 0)
    assert len(set(h[0].tolist())) == 4 and not torch.equal(h[0], h[1])


def test_no_device_less_tensor_is_created():
    x = _examples()
    expected = frozen_normal(x, 3, 10)
    torch.set_default_device("meta")
    try:
        got = frozen_normal(x, 3, 10)
    finally:
        torch.set_default_device(None)
    assert got.device.type == "cpu" and torch.equal(got, expected)


def test_seeds_are_taken_modulo_two_to_the_64():
    x = _examples(4)
    assert torch.equal(frozen_normal(x, -1, 4), frozen_normal(x, 2**64 - 1, 4))
    assert not torch.equal(frozen_normal(x, -1, 4), frozen_normal(x, 1, 4))


def test_log_and_cos_sin_match_torch():
    g = torch.Generator(device="cpu").manual_seed(0)
    words = torch.randint(0, 2**32, (2, 20_000), generator=g, dtype=torch.int64, device="cpu")
    u = _uniform(words[0], words[1])
    assert float(u.min()) > 0 and float(u.max()) < 1
    u = torch.cat([u, torch.tensor([2.0**-53, 0.5, 1 - 2.0**-53, 0.25, 0.75], device="cpu")])
    eps = torch.finfo(torch.float64).eps
    # a few ulps of log(u), |log u| up to 37: the polynomial is accurate to 1e-16 relative
    torch.testing.assert_close(_log(u), torch.log(u), rtol=4 * eps, atol=0)
    cos, sin = _cos_sin_2pi(u)
    # torch's cos(2 pi u) rounds 2 pi u first: errors of a few eps times 2 pi
    torch.testing.assert_close(cos, torch.cos(2 * math.pi * u), rtol=0, atol=32 * eps)
    torch.testing.assert_close(sin, torch.sin(2 * math.pi * u), rtol=0, atol=32 * eps)


def _within(value: float, expected: float, standard_error: float) -> bool:
    return abs(value - expected) <= 5 * standard_error


def test_noise_statistics_are_those_of_independent_standard_normals():
    n, count = 2048, 64
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator(device="cpu").manual_seed(0))
    z = frozen_normal(x, 0, count)  # (n, count)
    flat, m = z.flatten(), z.numel()
    assert _within(float(flat.mean()), 0.0, 1 / math.sqrt(m))
    assert _within(float(flat.var()), 1.0, math.sqrt(2 / m))
    assert _within(float(flat.pow(3).mean()), 0.0, math.sqrt(15 / m))
    assert _within(float(flat.pow(4).mean()), 3.0, math.sqrt(96 / m))
    for t, p in ((1.0, 0.317310507862914), (2.0, 0.045500263896358), (3.0, 0.002699796063260)):
        share = float((flat.abs() > t).double().mean())
        assert _within(share, p, math.sqrt(p * (1 - p) / m)), t
    # Kolmogorov-Smirnov distance to the normal CDF, below its 0.1% critical value
    cdf = torch.special.ndtr(flat.sort().values)
    steps = torch.arange(1, m + 1, dtype=torch.float64, device="cpu") / m
    distance = float(torch.maximum(steps - cdf, cdf - (steps - 1 / m)).max())
    assert distance < 1.95 / math.sqrt(m)

    def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a * b).mean())  # both (nearly) standard: E[ab] is the correlation

    # no correlation between neighbouring examples, neighbouring draws of one example,
    # or the cosine and sine halves of a Box-Muller pair
    assert _within(correlation(z[1:], z[:-1]), 0.0, 1 / math.sqrt(m))
    assert _within(correlation(z[:, 1:], z[:, :-1]), 0.0, 1 / math.sqrt(m))
    assert _within(correlation(z[:, 0::2], z[:, 1::2]), 0.0, 1 / math.sqrt(m / 2))
    # nor between an example and the same example one ulp away, or under another seed
    nudged = x.clone()
    nudged[:, 0, 3, 4] = torch.nextafter(nudged[:, 0, 3, 4], torch.tensor(2.0))
    assert _within(correlation(frozen_normal(nudged, 0, count), z), 0.0, 1 / math.sqrt(m))
    assert _within(correlation(frozen_normal(x, 1, count), z), 0.0, 1 / math.sqrt(m))


def test_distinct_examples_get_distinct_hashes():
    # 20,000 examples that differ in one float, by one ulp or by a sign
    base = torch.full((20_000, 16), 0.5)
    base[torch.arange(20_000), torch.arange(20_000) % 16] += torch.arange(20_000) * 2.0**-24
    base[-1, 0] = -base[-1, 0]
    h = content_hash(base, 0)
    assert len(torch.unique(h, dim=0)) == 20_000
    keys = h[:, :2] & 0xFFFFFFFF  # the generator's key alone: 64 bits, no collision either
    assert len(torch.unique(keys, dim=0)) == 20_000


@pytest.mark.parametrize("count", [1, 2, 7])
def test_any_count(count):
    x = _examples(5)
    assert frozen_normal(x, 0, count).shape == (5, count)
    assert torch.equal(frozen_normal(x, 0, count), frozen_normal(x, 0, 8)[:, :count])
