"""A training step of the CIFAR-10 recipes' networks on the CPU in float32 against the
recipes' ``bf16-mixed`` (bfloat16 autocast), side by side, alternating, medians of
``--repeats``: the GPU recipes' precision on a CPU. Prints Markdown for BENCHMARKS.md.

    python benchmarks/bench_cpu_precision.py
    python benchmarks/bench_cpu_precision.py --batch 128 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _machine import machine

from lightning_nfk.models import WideResNet


def step(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> float:
    """Forward, cross-entropy and backward, as Lightning's precision plugins run them."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(net(x), y)
    loss.backward()
    net.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (a.batch,), generator=g)
    print(
        f"Machine: {machine()}; batch {a.batch}, medians of {a.repeats} steps after one warm-up.\n"
    )
    print("| network | float32 step, s | bf16-mixed step, s | bf16 / float32 |")
    print("|---|---|---|---|")
    for depth, width in ((16, 1), (16, 2)):
        torch.manual_seed(0)
        net = WideResNet(depth, width, num_classes=10)
        times: dict[bool, list[float]] = {False: [], True: []}
        for bf16 in (False, True):
            step(net, x, y, bf16)  # warm-up
        for _ in range(a.repeats):
            for bf16 in (False, True):
                times[bf16].append(step(net, x, y, bf16))
        f32, b16 = statistics.median(times[False]), statistics.median(times[True])
        print(f"| WRN-{depth}-{width} | {f32:.2f} | {b16:.2f} | {b16 / f32:.1f}x |")


if __name__ == "__main__":
    main()
