"""Overhead of NFKSpectrumCallback at its defaults on a full Fashion-MNIST LeNet-5 epoch,
and the quickstart recipe's wall time. Prints Markdown tables for BENCHMARKS.md.

    python benchmarks/bench_callbacks.py              # 3 alternating repeats of each epoch
    python benchmarks/bench_callbacks.py --repeats 1 --no-quickstart

The epochs with and without the callback alternate in one process, so both see the same
machine load; the figure is the ratio of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_nfk.callbacks import NFKSpectrumCallback
from lightning_nfk.cli import load_recipe

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"  # or the Debian package's folder, which the data module also reads


def quickstart(*overrides: str):
    """The quickstart recipe's objects, without its logger, callbacks and checkpoints."""
    return load_recipe(
        "quickstart",
        "--trainer.accelerator=cpu",
        "--trainer.deterministic=false",  # process-wide once set: both arms alike
        f"--data.init_args.data_dir={DATA}",
        *overrides,
        bare=True,
    )


def epoch_seconds(
    with_callback: bool, dm: pl.LightningDataModule, root: str
) -> tuple[float, float]:
    """Wall time of one training epoch of the quickstart recipe's model (no validation;
    ``dm`` set up already), and the callback's own time."""
    r = quickstart(
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={root}",
    )
    cb = NFKSpectrumCallback(plot=False)
    if with_callback:
        r.trainer.callbacks.append(cb)
    t0 = time.perf_counter()
    r.trainer.fit(r.model, dm)
    total = time.perf_counter() - t0
    return total, (cb.history[-1]["nfk/seconds"] if with_callback else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-quickstart", action="store_true")
    args = parser.parse_args()
    dm = quickstart("--seed_everything=false").datamodule
    dm.setup()
    print(f"# bench_callbacks.py on {torch.get_num_threads()} threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as root:
        epoch_seconds(False, dm, root)  # warm-up
        without, with_, fit = [], [], []
        for _ in range(args.repeats):
            without.append(epoch_seconds(False, dm, root)[0])
            total, own = epoch_seconds(True, dm, root)
            with_.append(total)
            fit.append(own)
    a, b = statistics.median(without), statistics.median(with_)
    d = NFKSpectrumCallback()
    print(
        "\n### NFKSpectrumCallback overhead: one Fashion-MNIST epoch (55,000 images), LeNet-5, batch 128, CPU\n"
    )
    print(
        f"Callback defaults: k={d.config.k}, oversample={d.config.oversample}, "
        f"n_iter={d.config.n_iter}, probe_size={d.probe_size}; "
        f"medians of {args.repeats} alternating repeats.\n"
    )
    print("| epoch without | epoch with | NFK fit inside | overhead | target (<= 10%) |")
    print("|---|---|---|---|---|")
    over = b / a - 1
    print(
        f"| {a:.2f} s | {b:.2f} s | {statistics.median(fit):.2f} s | {over * 100:.1f}% | "
        f"{'yes' if over <= 0.10 else '**no**'} |"
    )
    if not args.no_quickstart:
        with tempfile.TemporaryDirectory() as logs:
            cmd = [
                sys.executable,
                "-m",
                "lightning_nfk",
                "fit",
                "--config",
                str(ROOT / "recipes" / "quickstart.yaml"),
                "--trainer.enable_progress_bar=false",
                f"--data.init_args.data_dir={ROOT / 'data'}",
            ]
            t0 = time.perf_counter()  # in a scratch folder: logs and checkpoints go there
            subprocess.run(cmd, check=True, capture_output=True, cwd=logs)
            secs = time.perf_counter() - t0
        print(
            f"\nQuickstart (`lightning-nfk fit --config recipes/quickstart.yaml`, 3 epochs with both callbacks, "
            f"start-up included): {secs:.0f} s."
        )


if __name__ == "__main__":
    main()
