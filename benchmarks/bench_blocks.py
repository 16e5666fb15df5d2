"""Per-block spectra and attention under vmap: what they cost. Prints Markdown for
BENCHMARKS.md.

* ``--part blocks``: a fit with ``blocks=`` against the same fit without, side by side
  (alternating, medians of ``--repeats``), for LeNet-5 (Fashion-MNIST shape, its 5
  layers as blocks), the small ViT of ``recipes/cifar10_vit.yaml`` (6 blocks) and the
  small GPT of ``recipes/fortunes_gpt.yaml`` (7 blocks), with ``blocked`` (and
  ``matrix_free`` for LeNet-5).
* ``--part sdpa``: the GPT's fit with attention by SDPA's math backend (what the engine
  does) against the fused kernel that ``vmap`` runs example by example.

    python benchmarks/bench_blocks.py                 # both parts
    python benchmarks/bench_blocks.py --part blocks --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch
from _machine import machine

from lightning_nfk.kernel import ClassifierEnergy, LowRankNFK, SequenceEnergy
from lightning_nfk.models import GPT, LeNet5, ViT

N = 256  # probe examples


def cases() -> dict[str, tuple]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    tokens = torch.randint(1, 256, (N, 64), generator=g)
    return {
        "LeNet-5 (61.7k)": (
            ClassifierEnergy(LeNet5()),
            torch.randn(N, 1, 28, 28, generator=g),
            "auto",
        ),
        "ViT (0.46M)": (
            ClassifierEnergy(ViT()),
            torch.randn(N, 3, 32, 32, generator=g),
            ["patch", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"],
        ),
        "GPT (0.87M)": (
            SequenceEnergy(GPT(vocab_size=256, context=64, dim=128, depth=4, heads=4)),
            tokens,
            ["tokens", "positions", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"],
        ),
    }


def timed(energy, x, strategy: str, blocks, k: int = 16) -> float:
    nfk = LowRankNFK(energy, k=k, oversample=10, n_iter=3, strategy=strategy)
    start = time.perf_counter()
    nfk.fit(x, blocks=blocks)
    return time.perf_counter() - start


def part_blocks(repeats: int) -> None:
    print("| model | strategy | plain fit (s) | with blocks (s) | blocks | overhead |")
    print("|---|---|---|---|---|---|")
    for name, (energy, x, blocks) in cases().items():
        # matrix_free: a JVP/VJP per block, so B blocks cost about B more products (shown
        # on the smallest model; the larger ones would take minutes per fit)
        for strategy in ("blocked", "matrix_free") if name.startswith("LeNet") else ("blocked",):
            plain, with_blocks = [], []
            timed(energy, x[:32], strategy, None)  # warm-up
            for _ in range(repeats):
                plain.append(timed(energy, x, strategy, None))
                with_blocks.append(timed(energy, x, strategy, blocks))
            a, b = statistics.median(plain), statistics.median(with_blocks)
            count = len(blocks) if isinstance(blocks, list) else "auto (5)"
            print(f"| {name} | {strategy} | {a:.2f} | {b:.2f} | {count} | {b / a - 1:+.0%} |")


def part_sdpa(repeats: int) -> None:
    energy, x, _ = cases()["GPT (0.87M)"]
    x = x[:64]
    fused = mock.patch("lightning_nfk.kernel.per_example.batched_attention", contextlib.nullcontext)
    runs: dict[str, list[float]] = {"math backend (the engine)": [], "fused kernel": []}
    timed(energy, x[:32], "blocked", None)  # warm-up
    for _ in range(repeats):
        runs["math backend (the engine)"].append(timed(energy, x, "blocked", None))
        with fused:
            runs["fused kernel"].append(timed(energy, x, "blocked", None))
    math_s = statistics.median(runs["math backend (the engine)"])
    print(
        "| GPT (0.87M), 64 sequences of 64 tokens, blocked | fit (s) | against the math backend |"
    )
    print("|---|---|---|")
    for label, values in runs.items():
        m = statistics.median(values)
        print(f"| {label} | {m:.2f} | {m / math_s:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("blocks", "sdpa", "both"), default="both")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(
        f"Machine: {machine()}; {N} probe examples, k = 16, oversample 10, n_iter 3; "
        f"medians of {args.repeats}, alternating.\n"
    )
    if args.part in ("blocks", "both"):
        part_blocks(args.repeats)
        print()
    if args.part in ("sdpa", "both"):
        part_sdpa(args.repeats)


if __name__ == "__main__":
    main()
