"""Frozen per-example Gaussian noise: a fixed function of an example's content and a seed,
computed batched on the example's device, bit-identical on every device and batching.

Three steps, all in torch operations whose results IEEE 754 fixes exactly (integer
arithmetic that never overflows int64; float64 ``+``, ``-``, ``*``, ``/``, ``sqrt``; sums of
integers below :math:`2^{53}`), so that no step depends on the device, on the vector width
of a CPU kernel, or on the order of a reduction:

1. **Content hash.** The float32 bits of each example, as 16-bit pieces :math:`x_j`,
   enter four independent multilinear hashes :math:`h_l(x) = b_l + \\sum_j a_{lj} x_j` with
   random 25-bit coefficients drawn from ``seed`` (Carter and Wegman's universal hashing).
   The sums are exact integers, one float64 matrix product per chunk of 2,048 pieces
   (longer rows are hashed chunk by chunk, then the chunk sums again). The generator reads
   the low 32 bits of each lane: for two different examples, a piece difference
   :math:`2^k o` (o odd, k <= 15) leaves at least 17 random bits of its coefficient
   modulo :math:`2^{32}`, so each lane agrees with probability at most :math:`2^{-17}`,
   all four at most :math:`2^{-68}`.
2. **Counter-based generator.** Philox4x32-10 (Salmon, Moraes, Dror and Shaw, *Parallel
   random numbers: as easy as 1, 2, 3*, SC 2011), the generator of cuRAND and of
   PyTorch's CUDA RNG; an example's stream is named by its hash (the key and three
   counter words), block ``c`` of it is a pure function of (hash, c). The 32-bit
   products are split into 16-bit halves so that every intermediate stays below
   :math:`2^{49}`.
3. **Box-Muller** (Box and Muller, 1958): two 52-bit uniforms give two standard normals,
   with :math:`\\log`, :math:`\\cos` and :math:`\\sin` evaluated by fixed polynomials:
   ``torch.log`` and ``torch.cos`` can differ in the last bit between CPU kernels (the
   vectorised loop and its scalar tail) and CUDA.
"""

from __future__ import annotations

import functools
import math
import sys

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers, for counter words 0 and 2
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key schedule (Weyl) increments
_LANES = 4  # independent content hashes per example
_COEFFICIENT_BITS = 25
_CHUNK = 2048  # pieces per exact product: 2^11 * 2^16 * 2^25 < 2^53 (exact in float64)
_TAG_COEFFICIENTS, _TAG_BIAS = 1, 2  # separate uses of the seed-keyed generator

# Taylor coefficients of log(m) = 2 atanh(s) = 2 s sum_k s^(2k) / (2k + 1), |s| <= 0.1716:
# the first omitted term is below 1e-17 relative.
_ATANH = [1.0 / (2 * k + 1) for k in range(12)]
# sin(p) / p and cos(p) in p^2 for |p| <= pi / 4: the first omitted terms are below 1e-18.
_SIN = [(-1) ** k / math.factorial(2 * k + 1) for k in range(9)]
_COS = [(-1) ** k / math.factorial(2 * k) for k in range(10)]


def _mulhilo(a: Tensor, m: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """The 64-bit product of 32-bit words ``a`` and ``m = m_hi 2^16 + m_lo`` as (high, low)
    32-bit words, with every intermediate below 2^49 (no int64 overflow)."""
    t, u = a * m[1], a * m[0]  # a m = u 2^16 + t, both < 2^48
    return (u + (t >> 16)) >> 16, (t + ((u & 0xFFFF) << 16)) & _MASK32


def philox4x32(counter: tuple[Tensor, ...], key: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Philox4x32-10: four 32-bit output words for four counter words and two key words.

    Args:
        counter: four int64 tensors of 32-bit words (values in [0, 2^32)), broadcastable.
        key: two int64 tensors of 32-bit words, broadcastable with ``counter``.

    Returns:
        Four int64 tensors of 32-bit words, of the broadcast shape.
    """
    c0, c1, c2, c3 = torch.broadcast_tensors(*counter, *key)[:4]
    k0, k1 = key
    device = c0.device
    # (M0, M1) made on the device (a fill, not a copy from the host: no sync)
    m = _PHILOX_M[0] + (_PHILOX_M[1] - _PHILOX_M[0]) * torch.arange(
        2, dtype=torch.int64, device=device
    )
    m = m.view(2, *[1] * c0.ndim)
    halves = (m >> 16, m & 0xFFFF)
    for _ in range(10):
        hi, lo = _mulhilo(torch.stack([c0, c2]), halves)
        c0, c1, c2, c3 = hi[1] ^ c1 ^ k0, lo[1], hi[0] ^ c3 ^ k1, lo[0]
        k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
    return c0, c1, c2, c3


def _seed_words(seed: int, device: torch.device) -> tuple[Tensor, Tensor]:
    s = seed & 0xFFFFFFFFFFFFFFFF  # two's complement: negative seeds are distinct seeds
    return (
        torch.full((), s & _MASK32, dtype=torch.int64, device=device),
        torch.full((), s >> 32, dtype=torch.int64, device=device),
    )


def _plan(n: int) -> list[tuple[int, int]]:
    """(chunk, chunks) per level of the content hash of ``n`` pieces: each level's chunk
    sums (``chunks`` x 4 lanes x four 16-bit pieces) are the next level's pieces."""
    levels = []
    while True:
        chunk = min(n, _CHUNK)
        chunks = -(-n // chunk)
        levels.append((chunk, chunks))
        if chunks == 1:
            return levels
        n = chunks * _LANES * 4


@functools.lru_cache(maxsize=16)
def _hash_parameters(
    n: int, features: int, seed: int, device: torch.device
) -> tuple[tuple[Tensor, ...], Tensor]:
    """The coefficients of each level, (chunk, 4) float64 integers in [0, 2^25), and the
    (4,) int64 offsets b_l, all drawn from ``seed`` (the offsets also from ``features``,
    so that an all-zero example depends on the seed and the input size). Cached: the same
    for every chunk of a fit."""
    sizes = [chunk for chunk, _ in _plan(n)]
    counters = [
        torch.stack(
            [
                torch.arange(chunk, dtype=torch.int64, device=device),
                torch.full((chunk,), level, dtype=torch.int64, device=device),
                torch.full((chunk,), _TAG_COEFFICIENTS, dtype=torch.int64, device=device),
                torch.zeros(chunk, dtype=torch.int64, device=device),
            ]
        )
        for level, chunk in enumerate(sizes)
    ]
    bias = [features & _MASK32, features >> 32, _TAG_BIAS, 0]
    counters.append(
        torch.stack([torch.full((1,), w, dtype=torch.int64, device=device) for w in bias])
    )
    words = torch.stack(philox4x32(tuple(torch.cat(counters, dim=1)), _seed_words(seed, device)))
    coefficients = (words[:, :-1] >> (32 - _COEFFICIENT_BITS)).to(torch.float64).T  # (rows, 4)
    return coefficients.split(sizes), words[:, -1]


def content_hash(x: Tensor, seed: int) -> Tensor:
    """(B, 4) int64: four universal hashes of each example's float32 bits and ``seed``,
    exact integers below 2^53 in absolute value, the same on every device and batching."""
    b = x.shape[0]
    features = math.prod(x.shape[1:])
    # 16-bit pieces of each float's bits, lower half first (signed: |piece| <= 2^15)
    pieces = x.detach().reshape(b, features).to(torch.float32).contiguous().view(torch.int16)
    if sys.byteorder == "big":  # the same pieces in the same order on every machine
        pieces = pieces.view(b, features, 2).flip(2)
    # (through int32: a direct int16 -> float64 conversion is 3x slower on the CPU)
    pieces = pieces.reshape(b, 2 * features).to(torch.int32).to(torch.float64)
    coefficients, bias = _hash_parameters(2 * features, features, seed, x.device)
    for a in coefficients:
        chunk = a.shape[0]
        pad = -pieces.shape[1] % chunk
        if pad:
            pieces = torch.nn.functional.pad(pieces, (0, pad))
        # exact: |piece| < 2^16, a < 2^25, at most 2^11 terms: every partial sum < 2^52
        sums = (pieces.view(b, -1, chunk) @ a).to(torch.int64)  # (B, chunks, 4)
        if sums.shape[1] == 1:
            return sums[:, 0] + bias
        shifts = torch.arange(0, 64, 16, dtype=torch.int64, device=x.device)
        pieces = ((sums[..., None] >> shifts) & 0xFFFF).reshape(b, -1).to(torch.float64)
    raise AssertionError("unreachable: the last level has one chunk")  # pragma: no cover


def _uniform(high: Tensor, low: Tensor) -> Tensor:
    """Float64 in (0, 1): 52 random bits from two 32-bit words, (2n + 1) / 2^53."""
    n = ((high >> 12) << 32) | low  # < 2^52
    return (2 * n + 1).to(torch.float64) * 2.0**-53


def _polynomial(t: Tensor, coefficients: list[float]) -> Tensor:
    """sum_k c_k t^k by Horner's rule, one rounded operation at a time."""
    out = torch.full_like(t, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        out = out * t + c
    return out


def _log(u: Tensor) -> Tensor:
    """Natural log of float64 ``u`` > 0 (normal numbers): exponent and mantissa from the
    bits, then log(m) = 2 atanh((m - 1) / (m + 1)) with m in (sqrt(1/2), sqrt(2)]."""
    bits = u.view(torch.int64)
    exponent = ((bits >> 52) & 0x7FF) - 1023
    m = ((bits & ((1 << 52) - 1)) | (1023 << 52)).view(torch.float64)  # [1, 2)
    big = m > math.sqrt(2.0)
    m = m * (1.0 - 0.5 * big.to(torch.float64))  # halved (exactly) above sqrt(2)
    exponent = exponent + big.to(torch.int64)
    s = (m - 1.0) / (m + 1.0)
    return exponent.to(torch.float64) * math.log(2.0) + 2.0 * s * _polynomial(s * s, _ATANH)


def _cos_sin_2pi(u: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of 2 pi u: u = (q + f) / 4 with q the nearest quarter turn, exactly; then
    the Taylor polynomials of the remaining angle, |f pi / 2| <= pi / 4, turned by q
    quarters (a swap and signs: exact)."""
    v = u * 4.0
    q = torch.round(v)
    p = (v - q) * (math.pi / 2)
    t = p * p
    sin, cos = p * _polynomial(t, _SIN), _polynomial(t, _COS)
    quarter = q.to(torch.int64)
    odd = (quarter & 1).to(torch.float64)  # quarters 1 and 3: cos and sin swap
    cos_sign = 1.0 - 2.0 * (((quarter + 1) >> 1) & 1).to(torch.float64)  # - in 1, 2
    sin_sign = 1.0 - 2.0 * ((quarter >> 1) & 1).to(torch.float64)  # - in 2, 3 (4 is 0)
    even = 1.0 - odd
    # exact: one product is x * 1, the other x * 0
    return cos_sign * (cos * even + sin * odd), sin_sign * (sin * even + cos * odd)


def frozen_normal(x: Tensor, seed: int, count: int) -> Tensor:
    """(B, count) float64 standard normals on ``x``'s device, a fixed function of each
    example's float32 bits and ``seed``: the same values whatever the batch, the position
    in it, the device or the input dtype.

    Args:
        x: a batch of examples, ``(B, ...)``.
        seed: any Python int (taken modulo 2^64).
        count: normals per example.
    """
    b = x.shape[0]
    if b == 0 or count == 0:
        return torch.zeros(b, count, dtype=torch.float64, device=x.device)
    words = content_hash(x, seed)  # (B, 4)
    low, high = words & _MASK32, (words >> 32) & _MASK32
    key = (low[:, 0:1], low[:, 1:2])  # the example's stream: its hash in key and counter
    mix = high[:, 0:1] ^ high[:, 1:2] ^ high[:, 2:3] ^ high[:, 3:4]
    blocks = torch.arange((count + 1) // 2, dtype=torch.int64, device=x.device)
    w0, w1, w2, w3 = philox4x32((blocks[None, :], low[:, 2:3], low[:, 3:4], mix), key)
    r = (-2.0 * _log(_uniform(w0, w1))).sqrt()
    cos, sin = _cos_sin_2pi(_uniform(w2, w3))
    return torch.stack([r * cos, r * sin], dim=2).reshape(b, -1)[:, :count]


__all__ = ["content_hash", "frozen_normal", "philox4x32"]
