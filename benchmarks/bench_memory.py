"""What the memory budget counts against what a fit really holds (peak resident memory).

Each case runs in a fresh process: its peak resident set size (``ru_maxrss``) less the
resident size just before the fit is what the fit held. The budget's count for the same
problem comes from the engine's own accounting (``bytes_per_row`` and the dense path's
total). Prints a Markdown table (BENCHMARKS.md, "Memory: counted and measured").

    python benchmarks/bench_memory.py            # all cases, a few minutes on 2 CPU cores
    python benchmarks/bench_memory.py --quick    # smaller N
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
    "exact LeNet-5",
    "blocked CIFAR-10 VAE (S=8)",
    "blocked CIFAR-10 VAE (S=8), rows-only chunks",
)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def one(case: str, quick: bool) -> dict[str, float]:
    import torch

    from lightning_nfk.kernel import ClassifierEnergy, LowRankNFK, NFKConfig, VAEEnergy, exact_nfk
    from lightning_nfk.kernel.fisher_vectors import _dense_bytes
    from lightning_nfk.kernel.memory import activation_bytes, bytes_per_row, sketch_bytes
    from lightning_nfk.kernel.per_example import ScoreJacobian
    from lightning_nfk.models import ConvVAE, LeNet5

    torch.manual_seed(0)
    torch.set_num_threads(2)
    if case == "exact LeNet-5":
        n = 1024 if quick else 4096
        energy = ClassifierEnergy(LeNet5())
        x = torch.randn(n, 1, 28, 28)
        jac = ScoreJacobian(energy)
        p = jac.num_parameters
        act = activation_bytes(jac, x[:2], ())
        row = bytes_per_row(p, 4, act)
        rows = min(1024, n)
        counted = _dense_bytes(n, p, 4, rows * row, 1)
        before = _rss()
        exact_nfk(energy, x, memory_budget=2**40)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = nfk._fitted_operator().max_rows
    counted = rows * bytes_per_row(p, 4, act) + sketch_bytes(p, config.columns, 4)
    return {"N": n, "counted": counted, "measured": peak - before, "rows": rows,
            "budget": budget}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.quick)))
        return
    print(
        "| case | N | rows per block | budget MiB | counted MiB | measured MiB | measured / counted |"
    )
    print("|---|---|---|---|---|---|---|")
    for case in CASES:
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
