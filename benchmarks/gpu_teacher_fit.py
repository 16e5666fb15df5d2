"""Timed NFK fit of the distillation teacher: WRN-40-2 on 5,000 CIFAR-10 training images,
k = 20, with the default memory budget against a 1 GiB one. Prints a Markdown table; run by
``benchmarks/gpu_check.sh``.

What is fitted comes from the recipes (one source of truth): the network from
``recipes/cifar10_wrn40_2_teacher.yaml``; k and n_iter from
``recipes/cifar10_wrn16_1_nfkd.yaml``, and what that recipe leaves to the module
(oversample, the batch size the teacher's data is read with) from
:class:`~lightning_nfk.models.NFKDistillationModule`'s defaults. The teacher is at its
seed-0 initialisation (no trained checkpoint travels; the cost does not depend on the
weights); the images are read the way the teacher's targets read them: a ``DataLoader``
over CPU images, pinned on CUDA, one chunk per batch at most.

Images: the first ``--examples`` training images of the CIFAR-10 JPEG copy
(``shared/data/cifar10_jpeg.npz`` in the checkout or beside it), normalised with the data
module's constants; without it, random images of CIFAR's shape (said in the output).

Each fit stops at ``--max-seconds``: it then reports the examples it processed and the
projected time of the whole fit (``n_iter + 2`` passes over the data), so that the script
ends in bounded time on any machine.

    python benchmarks/gpu_teacher_fit.py --device cuda
    python benchmarks/gpu_teacher_fit.py --device cpu --examples 64 --k 2 --n-iter 1  # a smoke run
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from lightning_nfk.data import CIFAR10DataModule
from lightning_nfk.kernel import ClassifierEnergy, LowRankNFK, NFKConfig
from lightning_nfk.models import NFKDistillationModule, WideResNet

ROOT = Path(__file__).resolve().parents[1]
TEACHER_RECIPE = ROOT / "recipes" / "cifar10_wrn40_2_teacher.yaml"
NFKD_RECIPE = ROOT / "recipes" / "cifar10_wrn16_1_nfkd.yaml"
CIFAR_CANDIDATES = [
    ROOT / "shared" / "data" / "cifar10_jpeg.npz",
    ROOT.parent / "shared" / "data" / "cifar10_jpeg.npz",
]
GIB = 2**30


class _Deadline(Exception):
    """Raised from the progress callback when a fit runs past ``--max-seconds``."""


@dataclass
class FitResult:
    budget: str
    finished: bool
    seconds: float
    projected_seconds: float
    examples_processed: int
    rows_per_block: int
    peak_memory_gib: float
    sigma_1: float | None
    sigma_k: float | None


def _recipe_model_args(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["model"]["init_args"]


def teacher_network() -> tuple[torch.nn.Module, str]:
    """The teacher recipe's network, at its seed-0 initialisation, and its name."""
    net = _recipe_model_args(TEACHER_RECIPE)["net"]
    if not net["class_path"].endswith("WideResNet"):
        raise ValueError(f"{TEACHER_RECIPE} no longer trains a WideResNet: {net['class_path']}")
    args = net["init_args"]
    torch.manual_seed(0)
    return WideResNet(**args), f"WRN-{args['depth']}-{args['widen_factor']}"


def nfk_settings() -> tuple[int, int, int, int]:
    """(k, n_iter, oversample, batch size of the teacher's data) of the NFKD recipe."""
    args = _recipe_model_args(NFKD_RECIPE)
    defaults = {
        name: p.default
        for name, p in inspect.signature(NFKDistillationModule).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    k, n_iter, oversample, batch_size = (
        args.get(name, defaults[name]) for name in ("k", "n_iter", "oversample", "nfk_batch_size")
    )
    return k, n_iter, oversample, batch_size


def cifar10_images(n: int) -> tuple[torch.Tensor, str]:
    """The first ``n`` training images (n, 3, 32, 32), normalised as the data module does."""
    found = next((p for p in CIFAR_CANDIDATES if p.exists()), None)
    if found is None:
        g = torch.Generator(device="cpu").manual_seed(0)
        note = "random images of CIFAR-10's shape: no CIFAR-10 JPEG copy at " + " or ".join(
            str(p) for p in CIFAR_CANDIDATES
        )
        return torch.randn(n, 3, 32, 32, generator=g, device="cpu"), note
    from torchvision.io import decode_jpeg

    z = np.load(found, allow_pickle=False)
    data, offsets = z["train_jpeg"], z["train_offsets"]
    if n > len(offsets) - 1:
        raise ValueError(f"`--examples` ({n}) exceeds the {len(offsets) - 1} training images.")
    raw = [torch.from_numpy(data[offsets[i] : offsets[i + 1]].copy()) for i in range(n)]
    x = torch.stack(decode_jpeg(raw)).float().div_(255)
    mean = torch.tensor(CIFAR10DataModule.mean, device="cpu").view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10DataModule.std, device="cpu").view(1, 3, 1, 1)
    return (x - mean) / std, f"CIFAR-10 (JPEG copy, {found})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_fit(
    net: torch.nn.Module,
    loader: DataLoader,
    config: NFKConfig,
    label: str,
    max_seconds: float,
    device: torch.device,
) -> FitResult:
    """One fit, stopped at ``max_seconds`` (then the whole fit's time is projected from the
    examples processed: every pass reads every example)."""
    n = len(loader.dataset)  # type: ignore[arg-type]
    total = n * (config.n_iter + 2)  # `blocked`: the statistics pass, n_iter + 1 product passes
    seen = {"examples": 0, "rows": 0}
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()

    def progress(rows: int) -> None:
        seen["examples"] += rows
        seen["rows"] = max(seen["rows"], rows)
        if time.perf_counter() - start > max_seconds:
            raise _Deadline

    nfk, finished = LowRankNFK(ClassifierEnergy(net), config), True
    try:
        nfk.fit(loader, progress=progress)
    except _Deadline:
        finished = False
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")
    done = max(seen["examples"], 1)
    return FitResult(
        budget=label,
        finished=finished,
        seconds=seconds,
        projected_seconds=seconds if finished else seconds * total / done,
        examples_processed=seen["examples"],
        rows_per_block=seen["rows"],
        peak_memory_gib=peak,
        sigma_1=float(nfk.singular_values[0]) if finished else None,
        sigma_k=float(nfk.singular_values[-1]) if finished else None,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--examples", type=int, default=5000)
    p.add_argument("--k", type=int, default=None, help="default: the NFKD recipe's k")
    p.add_argument("--n-iter", type=int, default=None, help="default: the NFKD recipe's n_iter")
    p.add_argument("--max-seconds", type=float, default=75.0, help="per fit")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    a = p.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch.cuda.is_available() is False.")
    k, n_iter, oversample, batch_size = nfk_settings()
    k = a.k if a.k is not None else k
    n_iter = a.n_iter if a.n_iter is not None else n_iter

    x, source = cifar10_images(a.examples)
    net, label = teacher_network()
    net = net.to(device).eval()
    params = sum(q.numel() for q in net.parameters())
    loader = DataLoader(TensorDataset(x), batch_size=batch_size, pin_memory=device.type == "cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# gpu_teacher_fit.py on {name}, torch {torch.__version__}")
    print(
        f"{label} ({params:,} parameters, seed-0 init), {len(x)} images: {source}; "
        f"k={k}, oversample={oversample}, n_iter={n_iter} ({n_iter + 2} passes), "
        f"loader batch {batch_size}, float32, strategy blocked"
    )
    # warm-up (cuDNN and cuBLAS handles, kernels' first launches): a small fit, not timed
    small = DataLoader(TensorDataset(x[:64]), batch_size=32)
    LowRankNFK(ClassifierEnergy(net), k=2, oversample=2, n_iter=0).fit(small)

    results = []
    for label, budget in (("default", None), ("1 GiB", GIB)):
        config = NFKConfig(
            k=k, oversample=oversample, n_iter=n_iter, strategy="blocked", memory_budget=budget
        )
        results.append(timed_fit(net, loader, config, label, a.max_seconds, device))

    print(
        "\n| memory budget | rows per block | fit s | projected s | examples/s "
        "| peak GiB | sigma_1 | sigma_k |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        rate = r.examples_processed / r.seconds if r.seconds > 0 else float("nan")
        cells = [
            r.budget,
            str(r.rows_per_block),
            f"{r.seconds:.1f}" + ("" if r.finished else " (stopped)"),
            f"{r.projected_seconds:.1f}",
            f"{rate:.0f}",
            f"{r.peak_memory_gib:.1f}",
            "-" if r.sigma_1 is None else f"{r.sigma_1:.6g}",
            "-" if r.sigma_k is None else f"{r.sigma_k:.6g}",
        ]
        print("| " + " | ".join(cells) + " |")
    a_, b_ = results
    if a_.finished and b_.finished:
        rel = abs(a_.sigma_1 - b_.sigma_1) / abs(b_.sigma_1)  # type: ignore[operator]
        print(f"\nsigma_1 relative difference between the budgets: {rel:.2e} (round-off)")
    if all(r.finished for r in results):
        ratio = b_.seconds / a_.seconds
        print(f"1 GiB budget / default budget time: {ratio:.2f}x")
    if a.json:
        a.json.write_text(json.dumps({"source": source, "fits": [asdict(r) for r in results]}))


if __name__ == "__main__":
    main()
