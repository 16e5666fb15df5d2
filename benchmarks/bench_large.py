"""The NFK of a 100M-parameter transformer on a CPU: a GPT-2-small-sized causal LM
(12 blocks, width 768, 50,257-token vocabulary; Hugging Face's ``GPT2LMHeadModel`` from a
config when ``transformers`` is installed, 124M parameters with the tied head, else the
library's ``GPT``, 163M untied), its ``SequenceEnergy`` on 24 sequences of 32 tokens,
``strategy="blocked"``, k = 4: with all parameters and with a subset (``parameters=``).
Each fit runs in a process of its own, so that its peak resident memory is its own.
Prints Markdown for BENCHMARKS.md.

    python benchmarks/bench_large.py                  # all parameters, then the last block
    python benchmarks/bench_large.py --oversample 4 --n-iter 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from _machine import machine

from lightning_nfk.kernel import LowRankNFK, SequenceEnergy
from lightning_nfk.kernel.memory import SKETCH_COPIES, sketch_bytes


def model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "hf":
        import transformers

        config = transformers.GPT2Config(n_positions=64, bos_token_id=None, eos_token_id=None)
        return transformers.GPT2LMHeadModel(config)
    from lightning_nfk.models import GPT

    return GPT(vocab_size=50257, context=64, dim=768, depth=12, heads=12)


def one(args: argparse.Namespace) -> dict:
    """One fit in this process: its figures and peak resident memory."""
    net = model(args.model)
    parameters = None if args.subset is None else [args.subset]
    energy = SequenceEnergy(net, parameters=parameters)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (args.sequences, args.tokens), generator=g)
    p = sum(q.numel() for n, q in net.named_parameters() if energy.defines_kernel(n))
    nfk = LowRankNFK(
        energy,
        k=args.k,
        oversample=args.oversample,
        n_iter=args.n_iter,
        strategy="blocked",
        memory_budget=args.memory_budget,
    )
    start = time.perf_counter()
    nfk.fit(x)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "parameters": p,
        "subset": args.subset,
        "seconds": seconds,
        "peak_gib": peak / 2**30,
        "chunk": nfk.operator.max_rows,
        "row_gib": p * 4 / 2**30,
        "sketch_gib": sketch_bytes(p, args.k + args.oversample, 4) / 2**30,
        "products": nfk.products,
        "sigma": nfk.singular_values.tolist(),
        "residual": float(nfk.residuals.max()),
        "explained": float(nfk.explained_variance_ratio.sum()),
        "memory_budget_gib": None if args.memory_budget is None else args.memory_budget / 2**30,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("hf", "own"), default=None)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--oversample", type=int, default=4)
    p.add_argument("--n-iter", type=int, default=2)
    p.add_argument("--sequences", type=int, default=24)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--memory-budget", type=int, default=None)
    p.add_argument("--subset", default=None, help="(internal) one fit with this prefix")
    p.add_argument("--one", action="store_true", help="(internal) one fit, JSON out")
    args = p.parse_args()
    if args.model is None:
        try:
            import transformers  # noqa: F401

            args.model = "hf"
        except ImportError:
            args.model = "own"
    if args.one:
        print(json.dumps(one(args)))
        return
    last = "transformer.h.11" if args.model == "hf" else "blocks.11"
    rows = []
    for subset in (None, last):
        cmd = [sys.executable, __file__, "--one", f"--model={args.model}", f"--k={args.k}"]
        cmd += [f"--oversample={args.oversample}", f"--n-iter={args.n_iter}"]
        cmd += [f"--sequences={args.sequences}", f"--tokens={args.tokens}"]
        if args.memory_budget is not None:
            cmd.append(f"--memory-budget={args.memory_budget}")
        if subset is not None:
            cmd.append(f"--subset={subset}")
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"the fit {subset or 'of all parameters'} failed")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"Machine: {machine()}. Model: {args.model} GPT-2 small; {args.sequences} x "
        f"{args.tokens} tokens; k={args.k}, oversample={args.oversample}, "
        f"n_iter={args.n_iter}, blocked; {SKETCH_COPIES} sketch copies counted.\n"
    )
    print(
        "| parameters | P | fit (s) | peak RSS (GiB) | chunk (rows) | a row (GiB) | "
        "sketches (GiB) | products | max residual |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['subset'] or 'all'} | {r['parameters'] / 1e6:.1f}M | {r['seconds']:.0f} | "
            f"{r['peak_gib']:.1f} | {r['chunk']} | {r['row_gib']:.2f} | {r['sketch_gib']:.1f} | "
            f"{r['products']} | {r['residual']:.2g} |"
        )
    print("\n" + json.dumps(rows))


if __name__ == "__main__":
    main()
