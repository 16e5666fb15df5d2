"""What the memory budget counts against what a fit really holds (peak resident memory).

Each case runs in a fresh process: its peak resident set size (``VmHWM``; not
``ru_maxrss``, which keeps the parent's peak from the fork) less the
resident size just before the fit is what the fit held. The budget's count for the same
problem comes from the engine's own accounting (``bytes_per_row`` and the dense path's
total). Prints a Markdown table (BENCHMARKS.md, "Memory: counted and measured").

    python benchmarks/bench_memory.py            # all cases, a few minutes on 2 CPU cores
    python benchmarks/bench_memory.py --quick    # smaller N
    python benchmarks/bench_memory.py --cases LeNet   # the dense cases only
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = (
    "exact LeNet-5 (N=2000)",
    "exact LeNet-5 (N=4096)",
    "dense LeNet-5 (N=4096)",
    "blocked CIFAR-10 VAE (S=8)",
    "blocked CIFAR-10 VAE (S=8), rows-only chunks",
)


def _peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def one(case: str, quick: bool) -> dict[str, float]:
    import torch

    from lightning_nfk.kernel import (
        ClassifierEnergy,
        LowRankNFK,
        NFKConfig,
        ScoreJacobian,
        VAEEnergy,
        exact_nfk,
    )
    from lightning_nfk.kernel.memory import (
        activation_bytes,
        bytes_per_row,
        dense_block_rows,
        dense_peak_bytes,
        sketch_bytes,
    )
    from lightning_nfk.models import ConvVAE, LeNet5

    torch.manual_seed(0)
    torch.set_num_threads(2)
    if case.startswith("exact LeNet-5") or case.startswith("dense LeNet-5"):
        n = int(case.split("N=")[1].rstrip(")")) // (4 if quick else 1)
        energy = ClassifierEnergy(LeNet5())
        x = torch.randn(n, 1, 28, 28)
        jac = ScoreJacobian(energy)
        p = jac.num_parameters
        row = bytes_per_row(p, 4, activation_bytes(jac, x[:2], ()))
        rows = dense_block_rows(n, p, 4, row, 2**40, 1)
        counted = dense_peak_bytes(n, p, 4, rows * row, 1)
        before = _rss()
        if case.startswith("exact"):
            exact_nfk(energy, x, memory_budget=2**40)
        else:
            LowRankNFK(energy, k=8, strategy="dense", memory_budget=2**40).fit(x)
        peak = _peak()
        return {"N": n, "counted": counted, "measured": peak - before, "rows": rows, "budget": 0}
    n = 256 if quick else 1024
    vae = ConvVAE(channels=3, latent_dim=128, width=64, image_size=32)
    energy = VAEEnergy(vae, likelihood="gaussian", gaussian_std=0.1, num_samples=8)
    x = torch.rand(n, 3, 32, 32)
    budget = 2**30
    jac = ScoreJacobian(energy)
    p = jac.num_parameters
    act = activation_bytes(jac, x[:2], energy.extras(x[:2]))
    rows_only = max(1, budget // bytes_per_row(p, 4, 0))
    chunk = min(rows_only, 1024) if case.endswith("rows-only chunks") else None
    config = NFKConfig(k=8, oversample=4, n_iter=1, strategy="blocked", memory_budget=budget,
                       chunk_size=chunk)  # fmt: skip
    nfk = LowRankNFK(energy, config)
    before = _rss()
    nfk.fit(x)
    peak = _peak()
    rows = nfk.operator.max_rows
    counted = rows * bytes_per_row(p, 4, act) + sketch_bytes(p, config.columns, 4)
    return {"N": n, "counted": counted, "measured": peak - before, "rows": rows,
            "budget": budget}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cases", default="", help="only the cases whose name contains this")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.quick)))
        return
    print(
        "| case | N | rows per block | budget MiB | counted MiB | measured MiB | measured / counted |"
    )
    print("|---|---|---|---|---|---|---|")
    for case in (c for c in CASES if args.cases in c):
        cmd = [sys.executable, __file__, "--one", case] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        mib = 2**20
        print(
            f"| {case} | {r['N']} | {r['rows']} | {r['budget'] / mib or '-'} | {r['counted'] / mib:.0f} | "
            f"{r['measured'] / mib:.0f} | {r['measured'] / r['counted']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
