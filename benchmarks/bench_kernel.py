"""Benchmarks of ``lightning_nfk.kernel``; prints Markdown tables (results go in BENCHMARKS.md).

Sections (each a table; every ratio is measured side by side in this one process, and
times are medians of repeats):

* ``accuracy``: the quickstart recipe's LeNet-5 on the first 1024 Fashion-MNIST training images, k=16,
  oversample=10, n_iter=10, against the exact float64 NFK (at its initialisation and after one
  epoch of the recipe's training; ``--quick``: initialisation only).
* ``speed``: one power iteration (one pass V^T V Z), the default strategy (``blocked``)
  against the paper's ``matrix_free`` JVP/VJP products, k=128.
* ``training``: one power iteration against one training forward+backward over the same
  examples.
* ``exact``: the randomized fit against the exact path (the paper's Alg. 1) at
  N=2^14, k=32, n_iter=4, and the exact path's refusal beyond its memory budget.
* ``scaling``: fit time and peak memory for N = 2^10 .. 2^15 (one subprocess per N).

Usage::

    python benchmarks/bench_kernel.py --quick            # about a minute on 2 CPU cores
    python benchmarks/bench_kernel.py                    # the full tables (about 30 min)
    python benchmarks/bench_kernel.py --device cuda      # GPU mode (TF32 off)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nfk.cli import load_recipe
from lightning_nfk.data import CIFAR10DataModule, FashionMNISTDataModule, ImageTensorDataset
from lightning_nfk.kernel import (
    ClassifierEnergy,
    LowRankNFK,
    OperatorOptions,
    exact_nfk,
    prepare_fisher_vectors,
)
from lightning_nfk.models import MLP

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10_jpeg.npz"
NOTES: list[str] = []


# -- data and models: the library's data modules and recipes ------------------------------------
def fashion_mnist(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Fashion-MNIST training images (n, 1, 28, 28), normalised as the classifier recipes
    do (``normalization="standard"``), and labels, in file order."""
    dm = FashionMNISTDataModule(data_dir=str(ROOT / "data"), val_size=0)
    try:
        train = dm.dataset("train")
    except FileNotFoundError:
        NOTES.append(
            "Fashion-MNIST not found (apt-get install -y dataset-fashion-mnist): Gaussian inputs used."
        )
        g = torch.Generator().manual_seed(0)
        m = n or 60000
        return (
            torch.randn(m, 1, 28, 28, generator=g),
            torch.randint(0, 10, (m,), generator=g),
            "synthetic",
        )
    x, y = train.tensors(None if n is None else torch.arange(min(n, len(train))))
    return x, y, "Fashion-MNIST"


def cifar10(n: int) -> tuple[torch.Tensor, str]:
    """CIFAR-10 (JPEG copy) training images (n, 3, 32, 32), normalised as
    :class:`CIFAR10DataModule` does (its ``standard`` mean and std)."""
    if CIFAR.exists():
        from torchvision.io import decode_jpeg

        z = np.load(CIFAR, allow_pickle=False)
        b, o = z["train_jpeg"], z["train_offsets"]
        imgs = decode_jpeg([torch.from_numpy(b[o[i] : o[i + 1]].copy()) for i in range(n)])
        labels = torch.from_numpy(z["train_labels"][:n].astype(np.int64))
        data = ImageTensorDataset(
            torch.stack(imgs), labels, CIFAR10DataModule.mean, CIFAR10DataModule.std
        )
        return data.tensors()[0], "CIFAR-10 (JPEG copy)"
    NOTES.append(f"{CIFAR} not found: Gaussian 3x32x32 inputs used for the CIFAR-sized models.")
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)), "synthetic"


# every recipe's trainer runs on the CPU here (the benchmark moves the model to --device),
# and never switches torch to deterministic algorithms for the whole process
_CPU = ("--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.deterministic=false")


def recipe_model(recipe: str, *overrides: str) -> pl.LightningModule:
    """The model ``recipe`` builds (seeded as the recipe says), at its initialisation."""
    return load_recipe(recipe, *_CPU, *overrides, bare=True).model


def lenet_energy(device: torch.device) -> ClassifierEnergy:
    """The quickstart recipe's LeNet-5 at its initialisation, on ``device``."""
    return recipe_model("quickstart").to(device).nfk_energy()


def lenet_trained_one_epoch(device: torch.device) -> ClassifierEnergy:
    """The quickstart recipe's LeNet-5 after one epoch of its own training (the whole
    Fashion-MNIST training split, no validation), on ``device``."""
    r = load_recipe(
        "quickstart",
        *_CPU,
        f"--data.init_args.data_dir={ROOT / 'data'}",
        "--data.init_args.val_size=0",
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=0",
        bare=True,
    )
    r.trainer.fit(r.model, datamodule=r.datamodule)
    return r.model.to(device).eval().nfk_energy()


# -- helpers ------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def table(title: str, header: list[str], rows: list[list[object]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    sys.stdout.flush()


def operator(energy, strategy: str, data: torch.Tensor):
    """A Fisher-vector operator with its statistics fitted, for timing single passes."""
    op = prepare_fisher_vectors(energy, data, OperatorOptions(strategy=strategy))
    return op, op.energy


def one_pass_time(op, energy, data, l: int, repeats: int, device) -> float:
    g = torch.Generator().manual_seed(0)
    z, _ = torch.linalg.qr(torch.randn(op.num_parameters, l, generator=g).to(device))
    return median_time(lambda: op.normal_matmat(data, z), repeats, device)


# -- sections -----------------------------------------------------------------------------------
def accuracy(args, device) -> dict:
    x_all, _, source = fashion_mnist(1024)
    x = x_all.to(device)
    rows, out = [], {}
    # the trained state needs the recipe's data (its training has no synthetic stand-in)
    trained = not args.quick and source == "Fashion-MNIST"
    states = ("seed-0 init", "after 1 epoch") if trained else ("seed-0 init",)
    for state in states:
        if state == "after 1 epoch":
            t0 = time.perf_counter()
            net = lenet_trained_one_epoch(device).module
            NOTES.append(
                f"One training epoch of the quickstart recipe's LeNet-5 on {source}: "
                f"{time.perf_counter() - t0:.1f} s."
            )
        else:
            net = lenet_energy(device).module
        ref = exact_nfk(ClassifierEnergy(net), x, dtype=torch.float64)
        ref_eig = ref.singular_values[:16].double().cpu() ** 2
        for dtype in (torch.float64, torch.float32):
            t0 = time.perf_counter()
            nfk = LowRankNFK(
                ClassifierEnergy(net),
                k=16,
                oversample=10,
                n_iter=10,
                strategy="blocked",
                dtype=dtype,
            ).fit(x)
            secs = time.perf_counter() - t0
            rel = ((nfk.singular_values.double().cpu() ** 2 - ref_eig).abs() / ref_eig).numpy()
            tgt8 = 1e-8 if dtype == torch.float64 else 1e-4
            ok = rel[:8].max() <= tgt8 and rel.max() <= 1e-3
            name = str(dtype).removeprefix("torch.")
            rows.append(
                [
                    state,
                    name,
                    f"{rel[:8].max():.1e} (<= {tgt8:.0e})",
                    f"{rel.max():.1e} (<= 1e-3)",
                    f"{nfk.residuals[:8].max():.1e}",
                    f"{secs:.1f}",
                    "yes" if ok else "**no**",
                ]
            )
            out[f"{state}/{name}"] = rel.tolist()
    table(
        f"Accuracy: LeNet-5, first 1024 {source} training images, k=16, oversample=10, n_iter=10, "
        "vs exact float64 (relative error of eigenvalues)",
        [
            "weights",
            "dtype",
            "top-8 max rel. err.",
            "top-16 max rel. err.",
            "top-8 residual bound",
            "fit s",
            "target met",
        ],
        rows,
    )
    return out


def models(quick: bool):
    """(name, energy factory, data source, examples blocked, examples matrix-free): the
    recipes' models at initialisation (the GAN: the experiments' CIFAR-10 DCGAN), and
    the library's MLP, which no recipe trains."""

    def gan():
        return recipe_model("cifar10_dcgan", "--model.init_args.nfk_num_samples=256").nfk_energy()

    def mlp():
        torch.manual_seed(0)
        return ClassifierEnergy(MLP())

    q = quick
    return [
        (
            "LeNet-5",
            lambda: recipe_model("quickstart").nfk_energy(),
            "fashion",
            256 if q else 1024,
            32 if q else 128,
        ),
        (
            "WRN-16-1",
            lambda: recipe_model("cifar10_wrn").nfk_energy(),
            "cifar",
            128 if q else 512,
            4 if q else 16,
        ),
        ("MLP 784-256-256-10", mlp, "fashion", 256 if q else 1024, 128 if q else 512),
        ("DCGAN discriminator", gan, "cifar", 128 if q else 512, 8 if q else 32),
    ]


def data(kind: str, n: int, device):
    if kind == "fashion":
        x, _, src = fashion_mnist(n)
    else:
        x, src = cifar10(n)
    return x.to(device), src


def speed(args, device) -> dict:
    rows, out = [], {}
    repeats = 3 if args.quick else 5
    for name, make, kind, n_b, n_m in models(args.quick):
        energy = make()
        energy.module.to(device)
        for m in energy.auxiliary_modules():
            m.to(device)
        x, src = data(kind, n_b, device)
        op_b, w_b = operator(energy, "blocked", x)
        t_b = one_pass_time(op_b, w_b, x, 138, repeats, device) / n_b
        op_m, w_m = operator(energy, "matrix_free", x[:n_m])
        t_m = one_pass_time(op_m, w_m, x[:n_m], 138, 1 if args.quick else 3, device) / n_m
        ratio = t_m / t_b
        target = 50 if name in ("LeNet-5", "WRN-16-1") else 2
        rows.append(
            [
                name,
                op_b.num_parameters,
                src,
                n_b,
                f"{t_b * 1e3:.3f}",
                n_m,
                f"{t_m * 1e3:.2f}",
                f"{ratio:.1f}x (>= {target}x)",
                "yes" if ratio >= target else "**no**",
            ]
        )
        out[name] = {"blocked_ms": t_b * 1e3, "matrix_free_ms": t_m * 1e3, "ratio": ratio}
    table(
        "Speed per power iteration (one pass V^T V Z), k=128 (l=138): default `blocked` vs the "
        "paper's `matrix_free`, ms per example",
        [
            "model",
            "P",
            "data",
            "N blocked",
            "blocked ms/ex",
            "N matrix-free",
            "matrix-free ms/ex",
            "speed-up",
            "target met",
        ],
        rows,
    )
    return out


def train_pass(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 128) -> None:
    """One training forward+backward over x (no optimizer step), batches of ``batch``."""
    net.train()
    for i in range(0, len(x), batch):
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x[i : i + batch]), y[i : i + batch]).backward()
    net.zero_grad(set_to_none=True)
    net.eval()


def training(args, device) -> dict:
    rows, out = [], {}
    n = 256 if args.quick else 1024
    repeats = 3 if args.quick else 5
    for name, make, kind, *_ in models(args.quick)[:2]:
        energy = make()
        net = energy.module.to(device)
        x, src = data(kind, n, device)
        y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0)).to(device)

        t_train = median_time(lambda: train_pass(net, x, y), repeats, device)  # noqa: B023
        for k in (16, 128):
            op, w = operator(energy, "blocked", x)
            t_it = one_pass_time(op, w, x, k + 10, repeats, device)
            ratio = t_it / t_train
            rows.append(
                [
                    name,
                    src,
                    n,
                    k,
                    f"{t_train:.3f}",
                    f"{t_it:.3f}",
                    f"{ratio:.1f}x (<= 4x)",
                    "yes" if ratio <= 4 else "**no**",
                ]
            )
            out[f"{name}/k={k}"] = ratio
    table(
        "One power iteration (`blocked`) vs one training forward+backward (batches of 128) over "
        "the same examples",
        ["model", "data", "N", "k", "train fwd+bwd s", "power iteration s", "ratio", "target met"],
        rows,
    )
    return out


def exact(args, device) -> dict:
    n = 2**11 if args.quick else 2**14
    x, _, src = fashion_mnist(n)
    x = x.to(device)
    energy = lenet_energy(device)
    t0 = time.perf_counter()
    nfk = LowRankNFK(energy, k=32, oversample=10, n_iter=4, strategy="blocked").fit(x)
    sync(device)
    t_rand = time.perf_counter() - t0
    try:
        exact_nfk(energy, fashion_mnist(2**14)[0][: 2**14].to(device))
        refusal = "(no refusal: fits the default budget)"
    except ValueError as e:
        refusal = str(e)
    t0 = time.perf_counter()
    ref = exact_nfk(energy, x, memory_budget=64 * 2**30)
    sync(device)
    t_exact = time.perf_counter() - t0
    rel = (
        nfk.singular_values.double().cpu() - ref.singular_values[:32].double().cpu()
    ).abs() / ref.singular_values[:32].double().cpu()
    ratio = t_exact / t_rand
    table(
        f"Randomized (`blocked`, k=32, oversample=10, n_iter=4) vs the exact path (Alg. 1: V, Gram, "
        f"eigendecomposition), LeNet-5, {src}",
        ["N", "randomized s", "exact s", "speed-up", "top-32 max rel. err. of sigma", "target met"],
        [
            [
                n,
                f"{t_rand:.1f}",
                f"{t_exact:.1f}",
                f"{ratio:.1f}x (>= 10x)",
                f"{rel.max():.1e}",
                "yes" if ratio >= 10 else "**no**",
            ]
        ],
    )
    print(f"\nThe exact path at N=2^14 with its default memory budget: `{refusal}`")
    return {"n": n, "randomized_s": t_rand, "exact_s": t_exact, "ratio": ratio}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return -1


def scaling_child(n: int, device_name: str) -> None:
    device = torch.device(device_name)
    x, _, _ = fashion_mnist(n)
    x = x.to(device)
    energy = lenet_energy(device)
    LowRankNFK(energy, k=16, oversample=10, n_iter=1, strategy="blocked").fit(x[:1024])  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM)
        base = _rss_kib("VmRSS:") * 1024
    t0 = time.perf_counter()
    LowRankNFK(energy, k=16, oversample=10, n_iter=2, strategy="blocked").fit(x)
    sync(device)
    secs = time.perf_counter() - t0
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else _rss_kib("VmHWM:") * 1024
    )
    print(json.dumps({"n": n, "seconds": secs, "peak_extra_bytes": peak - base}))


def scaling(args, device) -> dict:
    sizes = [2**e for e in (range(10, 13) if args.quick else range(10, 16))]
    results = []
    for n in sizes:
        cmd = [sys.executable, __file__, "--scaling-child", str(n), "--device", str(device)]
        line = (
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        results.append(json.loads(line))
    logn = np.log([r["n"] for r in results])
    logt = np.log([r["seconds"] for r in results])
    slope = float(np.polyfit(logn, logt, 1)[0])
    peaks = [r["peak_extra_bytes"] for r in results]
    spread = (max(peaks) - min(peaks)) / min(peaks)
    rows = [
        [
            r["n"],
            f"{r['seconds']:.2f}",
            f"{r['seconds'] / r['n'] * 1e3:.3f}",
            f"{r['peak_extra_bytes'] / 2**20:.0f}",
        ]
        for r in results
    ]
    table(
        "Scaling: LeNet-5, Fashion-MNIST, `blocked`, k=16, oversample=10, n_iter=2 (3 passes + "
        "statistics); peak memory of the fit above the resident data",
        ["N", "fit s", "ms per example", "peak extra MiB"],
        rows,
    )
    print(
        f"\nlog-log slope of time vs N: {slope:.2f} (target <= 1.1: {'yes' if slope <= 1.1 else '**no**'}); "
        f"peak memory spread over N: {spread * 100:.0f}% (target <= 10%: {'yes' if spread <= 0.10 else '**no**'})"
    )
    return {"slope": slope, "memory_spread": spread, "points": results}


SECTIONS = {
    "accuracy": accuracy,
    "speed": speed,
    "training": training,
    "exact": exact,
    "scaling": scaling,
}


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if device.type == "cuda":
        desc += f", GPU {torch.cuda.get_device_name(device)}"
    return desc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, a minute or two on 2 CPU cores"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--scaling-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if args.scaling_child:
        scaling_child(args.scaling_child, args.device)
        return
    print(f"# bench_kernel.py{' --quick' if args.quick else ''} on {machine(device)}")
    t0 = time.perf_counter()
    results = {}
    for name in args.sections.split(","):
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; choose from {list(SECTIONS)}")
        results[name] = SECTIONS[name](args, device)
    for note in dict.fromkeys(NOTES):
        print(f"\nNote: {note}")
    print(f"\nTotal {time.perf_counter() - t0:.0f} s.")
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine(device), **results}, indent=1, default=float)
        )


if __name__ == "__main__":
    main()
