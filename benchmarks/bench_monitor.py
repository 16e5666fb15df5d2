"""NFKSpectrumCallback as a monitor on the training's clock: what each schedule costs in
units of a training step, and warm against cold starts over a training run. The
quickstart recipe's LeNet-5 on Fashion-MNIST (batch 128). Prints Markdown for
BENCHMARKS.md.

    python benchmarks/bench_monitor.py                      # both parts
    python benchmarks/bench_monitor.py --part warm --steps 200 --every 25

Schedules: the same training steps with no callback and with each schedule, in one
process, alternating; the overhead is measured (wall time against the run without it)
and predicted from the callback's own ``nfk/cost_in_steps`` (fits x cost / steps).

Warm against cold: at every ``--every`` steps of one training run, a probe callback fits
the same weights twice with the engine (``LowRankNFK``), cold (``n_iter`` iterations) and
warm (from the previous warm fit's components, stopped once each component's residual
is at most its residual in the first cold fit, as ``NFKSpectrumCallback(warm_start=True)``
does), in alternating order.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from _machine import machine

from lightning_nfk.callbacks import NFKSpectrumCallback
from lightning_nfk.callbacks.nfk_spectrum import ROUND_OFF_RESIDUAL
from lightning_nfk.cli import load_recipe
from lightning_nfk.kernel import LowRankNFK

ROOT = Path(__file__).resolve().parents[1]


def quickstart(data_dir: str, steps: int, root: str):
    """The quickstart recipe's model, data and a bare trainer for ``steps`` training steps
    (no validation), seeded as `lightning-nfk fit` seeds it."""
    return load_recipe(
        "quickstart",
        "--trainer.accelerator=cpu",
        "--trainer.deterministic=false",
        "--trainer.max_epochs=1",
        f"--trainer.limit_train_batches={steps}",
        "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={root}",
        f"--data.init_args.data_dir={data_dir}",
        bare=True,
    )


# -- part 1: schedules --------------------------------------------------------------------------
def schedules(every: int) -> dict[str, dict[str, Any] | None]:
    return {
        "none": None,
        "every epoch (1 fit)": {},
        f"every {4 * every} steps": {"every_n_train_steps": 4 * every},
        f"every {every} steps": {"every_n_train_steps": every},
        "log: steps 1, 2, 4, 8, ...": {"every_n_train_steps": 1, "schedule": "log"},
    }


def run_schedule(args: argparse.Namespace, options: dict[str, Any] | None, root: str):
    r = quickstart(args.data_dir, args.steps, root)
    cb = None
    if options is not None:
        cb = NFKSpectrumCallback(plot=False, **options)
        r.trainer.callbacks.append(cb)
    t0 = time.perf_counter()
    r.trainer.fit(r.model, r.datamodule)
    seconds = time.perf_counter() - t0
    costs = [h["nfk/cost_in_steps"] for h in (cb.history if cb else []) if "nfk/cost_in_steps" in h]
    return seconds, (len(cb.history) if cb else 0), costs


def part_schedules(args: argparse.Namespace) -> None:
    plans = schedules(args.every)
    times: dict[str, list[float]] = {name: [] for name in plans}
    fits: dict[str, int] = {}
    costs: dict[str, list[float]] = {name: [] for name in plans}
    with tempfile.TemporaryDirectory() as root:
        run_schedule(args, None, root)  # warm-up: data read, threads started
        for _ in range(args.repeats):
            for name, options in plans.items():
                secs, n, c = run_schedule(args, options, root)
                times[name].append(secs)
                fits[name] = n
                costs[name] += c
    base = statistics.median(times["none"])
    d = NFKSpectrumCallback()
    print(
        f"\n### The callback's cost per schedule, in training steps: {args.steps} steps of the "
        "quickstart LeNet-5 (batch 128), callback defaults "
        f"(k={d.config.k}, oversample={d.config.oversample}, n_iter={d.config.n_iter}, "
        f"probe_size={d.probe_size})\n"
    )
    print(f"Medians of {args.repeats} alternating repeats; {machine()}.\n")
    print(
        "| schedule | fits | run | overhead measured | median cost_in_steps | overhead predicted (fits x cost / steps) |"
    )
    print("|---|---|---|---|---|---|")
    for name in plans:
        t = statistics.median(times[name])
        c = statistics.median(costs[name]) if costs[name] else float("nan")
        predicted = fits[name] * c / args.steps if costs[name] else 0.0
        print(
            f"| {name} | {fits[name]} | {t:.1f} s | {100 * (t / base - 1):+.0f}% | "
            f"{c:.1f} | {100 * predicted:.0f}% |"
        )


# -- part 2: warm against cold ------------------------------------------------------------------
class SideBySide(pl.Callback):
    """Every ``every`` steps: a cold and a warm fit of the same weights on the probe set."""

    def __init__(self, x: torch.Tensor, every: int, options: dict[str, Any]) -> None:
        self.x, self.every, self.options = x, every, options
        self.rows: list[dict[str, Any]] = []
        self.warm: LowRankNFK | None = None
        self.tol: torch.Tensor | None = None  # the first cold fit's (k,) residuals

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every:
            return
        energy = pl_module.nfk_energy()
        row: dict[str, Any] = {"step": trainer.global_step}
        order = ("cold", "warm") if len(self.rows) % 2 == 0 else ("warm", "cold")
        fitted = {}
        with torch.random.fork_rng(devices=[]):
            for which in order:
                nfk = LowRankNFK(energy, **self.options)
                start = None
                if which == "warm" and self.warm is not None:
                    start = self.warm.components
                t0 = time.perf_counter()
                nfk.fit(self.x, start=start, tol=self.tol if start is not None else None)
                row[f"{which}_s"] = time.perf_counter() - t0
                row[f"{which}_products"] = nfk.products
                row[f"{which}_residual"] = float(nfk.residuals.max())
                fitted[which] = nfk
        cold, warm = fitted["cold"], fitted["warm"]
        if self.tol is None:  # as the callback: floored at round-off
            self.tol = cold.residuals.clamp_min(ROUND_OFF_RESIDUAL * torch.finfo(torch.float32).eps)
        self.warm = warm
        lam_c, lam_w = cold.singular_values.double() ** 2, warm.singular_values.double() ** 2
        row["rel_diff"] = float(((lam_w - lam_c).abs() / lam_c).max())
        row["bound"] = float((cold.residuals + warm.residuals).max())
        row["within"] = bool(
            torch.all((lam_w - lam_c).abs() / lam_c <= cold.residuals + warm.residuals + 1e-5)
        )
        row["cumulative"] = float(warm.explained_variance_ratio.sum())
        self.rows.append(row)


def part_warm(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as root:
        r = quickstart(args.data_dir, args.steps, root)
        r.datamodule.setup()
        ds = r.datamodule.dataset("train", augment=False, with_index=False)
        g = torch.Generator().manual_seed(0)
        x, _ = ds.tensors(torch.randperm(len(ds), generator=g)[: args.probe_size].sort().values)
        options = {"k": 32, "oversample": 10, "n_iter": args.n_iter, "strategy": "blocked"}
        probe = SideBySide(x, args.every, options)
        r.trainer.callbacks.append(probe)
        r.trainer.fit(r.model, r.datamodule)
    rows = probe.rows
    print(
        f"\n### Warm against cold starts over training: quickstart LeNet-5, a fit every "
        f"{args.every} steps for {args.steps} steps, probe set of {args.probe_size}, k=32, "
        f"oversample=10, cold n_iter={args.n_iter}, `blocked`\n"
    )
    print(f"{machine()}. Products: passes over the probe set besides the statistics pass.\n")
    print(
        "| step | cold: products, s, max residual | warm: products, s, max residual | max rel. eigenvalue diff | residual bound | within |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['step']} | {row['cold_products']}, {row['cold_s']:.2f}, {row['cold_residual']:.1e} | "
            f"{row['warm_products']}, {row['warm_s']:.2f}, {row['warm_residual']:.1e} | "
            f"{row['rel_diff']:.1e} | {row['bound']:.1e} | {'yes' if row['within'] else 'no'} |"
        )
    later = rows[1:]  # the first warm fit has no start: it is cold
    if later:
        ratio = statistics.median(r["warm_s"] / r["cold_s"] for r in later)
        print(
            f"\nAfter the first fit: median products cold {statistics.median(r['cold_products'] for r in later)}, "
            f"warm {statistics.median(r['warm_products'] for r in later)}; median time warm/cold {ratio:.2f}."
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("schedules", "warm", "both"), default="both")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--steps", type=int, default=400, help="training steps of each run")
    p.add_argument("--every", type=int, default=50, help="fit interval in steps")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--probe-size", type=int, default=1024, help="warm vs cold: probe set")
    p.add_argument("--n-iter", type=int, default=4, help="warm vs cold: the cold fits' n_iter")
    args = p.parse_args()
    print(f"# bench_monitor.py: {machine()}")
    if args.part in ("schedules", "both"):
        part_schedules(args)
    if args.part in ("warm", "both"):
        part_warm(args)


if __name__ == "__main__":
    main()
