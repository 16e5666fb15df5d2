"""Time and scale (the paper's Fig. 3, top): fit time and peak memory against
N = 2^7..2^16 for the randomized fit (``LowRankNFK``, top-32 as in the paper) and for the
exact path (``exact_nfk``: V and its Gram matrix) until it refuses its memory budget.

LeNet-5 (the shared Fashion-MNIST classifier) on Fashion-MNIST images (training and test
splits together: 70,000 >= 2^16). Each fit runs in a fresh subprocess; its peak memory
is the process's peak resident set during the fit (the high-water mark is reset just
before the fit, through /proc/self/clear_refs) less the resident set before it, so data
loading does not count.

    python experiments/scale.py --data-dir /usr/share/datasets/fashion-mnist
    python experiments/scale.py --quick
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import common
import torch

from lightning_nfk.kernel import DEFAULT_MEMORY_BUDGET, LowRankNFK, exact_nfk


def rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def reset_peak() -> None:
    """Reset the process's resident-set high-water mark (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(run: common.Run, n: int, method: str, n_iter: int) -> dict:
    dm = common.data_for(run, "fmnist_lenet")
    assert dm is not None
    x = torch.cat([common.tensors(dm, "train")[0], common.tensors(dm, "test")[0]])
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]].contiguous()
    energy = common.shared_model(run, "fmnist_lenet").nfk_energy()
    before = rss_mib()
    reset_peak()
    t = time.time()
    try:
        if method == "randomized":
            LowRankNFK(energy, k=32, n_iter=n_iter, strategy="blocked").fit(x)
        else:
            exact_nfk(energy, x, memory_budget=4 * DEFAULT_MEMORY_BUDGET)
    except ValueError as e:  # the exact path refuses beyond its memory budget
        return {"n": n, "method": method, "refused": str(e).split("\n")[0][:200]}
    seconds = time.time() - t
    peak = peak_mib()
    return {
        "n": n,
        "method": method,
        "seconds": round(seconds, 2),
        "peak_mib": round(peak - before, 1),
        "examples": len(x),
    }


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=2, metavar=("N", "METHOD"), help=argparse_hidden())
    args = p.parse_args()
    run = common.Run("scale", args)
    n_iter = run.pick(1, 2)
    if args.worker:
        print(
            "RESULT " + json.dumps(worker(run, int(args.worker[0]), args.worker[1], n_iter)),
            flush=True,
        )
        return
    common.shared_model(run, "fmnist_lenet")  # trained once, before the timed workers
    sizes = [2**e for e in run.pick(range(7, 9), range(7, 17))]
    rows = []
    for method in ("randomized", "exact"):
        for n in sizes:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                str(n),
                method,
                "--cache",
                str(run.cache),
                "--out",
                str(run.out),
                "--data-dir",
                args.data_dir,
            ]
            if args.quick:
                cmd.append("--quick")
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:  # e.g. killed for memory: record it, go on
                row = {
                    "n": n,
                    "method": method,
                    "failed": f"rc {proc.returncode}: {proc.stderr[-300:]}",
                }
            else:
                row = json.loads(lines[0][7:])
            rows.append(row)
            run.log(row)
            if "refused" in row or "failed" in row:
                break
    run.results.update(
        setting={
            "k": 32,
            "oversample": 10,
            "n_iter": n_iter,
            "model": "LeNet-5 (61,706 parameters)",
        },
        rows=rows,
    )
    fig, axes = common.figure(1, 2, size=(4.6, 3.6))
    for method, marker in (("randomized", "o"), ("exact", "s")):
        ok = [r for r in rows if r["method"] == method and "seconds" in r]
        refused = [r for r in rows if r["method"] == method and ("refused" in r or "failed" in r)]
        axes[0][0].loglog(
            [r["n"] for r in ok], [r["seconds"] for r in ok], marker=marker, label=method
        )
        axes[0][1].loglog(
            [r["n"] for r in ok], [max(r["peak_mib"], 1) for r in ok], marker=marker, label=method
        )
        for r in refused:
            axes[0][0].plot(
                r["n"],
                ok[-1]["seconds"] if ok else 1,
                "rx",
                ms=10,
                label=f"{method} refused (N={r['n']})",
            )
    axes[0][0].set_ylabel("fit time (s)")
    axes[0][1].set_ylabel("peak memory growth (MiB)")
    for ax in axes[0]:
        ax.set_xlabel("N (examples)")
        ax.legend(fontsize=7)
    fig.suptitle("LeNet-5, Fashion-MNIST, top-32, one 2-core CPU", fontsize=9)
    common.save_figure(run, fig, "scale")
    run.save()


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
