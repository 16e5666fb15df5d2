"""One blocked pass (l=138), this tree against another (an older commit), side by side.

    git worktree add /tmp/old 8396dec
    python benchmarks/ab_pass.py --old /tmp/old --rounds 3

Each round times the other tree and then this one, each in a fresh process importing its
own ``lightning_nfk`` and its own ``benchmarks/bench_kernel.py`` helpers, and prints a
Markdown table of ms per example (BENCHMARKS.md, "The refactor, side by side").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("LeNet-5", "WRN-16-1", "MLP 784-256-256-10")


def one(repo: Path) -> dict[str, float]:
    """ms per example of one blocked pass for each model, with ``repo``'s code."""
    sys.path.insert(0, str(repo))
    import torch

    from benchmarks import bench_kernel as b

    torch.manual_seed(0)
    device = torch.device("cpu")
    # trees before the recipes-based bench_kernel named these helpers _models and _data
    models = getattr(b, "models", None) or b._models
    data = getattr(b, "data", None) or b._data
    out = {}
    for name, make, kind, n_b, _ in models(False):
        if name in MODELS:
            energy = make()
            x, _ = data(kind, n_b, device)
            op, working = b.operator(energy, "blocked", x)
            out[name] = b.one_pass_time(op, working, x, 138, 3, device) / n_b * 1e3
    return out


def run(repo: Path) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(repo))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(repo)]
    done = subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", type=Path, help="the other tree (e.g. a git worktree)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one)))
        return
    times: dict[str, dict[str, list[float]]] = {m: {"old": [], "new": []} for m in MODELS}
    for _ in range(args.rounds):
        for side, repo in (("old", args.old), ("new", ROOT)):
            for name, t in run(repo).items():
                times[name][side].append(t)
    print("| model | old ms/ex | new ms/ex | median new / old |")
    print("|---|---|---|---|")
    for name, t in times.items():
        ratio = statistics.median(t["new"]) / statistics.median(t["old"])
        cells = [", ".join(f"{v:.3f}" for v in t[s]) for s in ("old", "new")]
        print(f"| {name} | {cells[0]} | {cells[1]} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
