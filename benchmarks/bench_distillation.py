"""Cost of distillation with a WRN-40-2 teacher and a WRN-16-1 student (CIFAR-10 shapes,
batch 128): one training step of each mode and target source, and the teacher's NFK fit.
Prints Markdown tables for BENCHMARKS.md.

    python benchmarks/bench_distillation.py               # 3 alternating repeats
    python benchmarks/bench_distillation.py --repeats 1 --fit-examples 128 --no-forward

The steps are the module's own ``training_step`` (forward, loss, backward, SGD step),
alternated in one process so that all see the same machine load; medians. Online targets
are timed both ways the engine computes :math:`V_x P`: per-example gradients (``blocked``,
what the module uses) and forward-mode products (``matrix_free``, k JVPs per batch).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from lightning_nfk.kernel import ClassifierEnergy, LowRankNFK
from lightning_nfk.models import NFKDistillationModule, WideResNet
from lightning_nfk.models.teacher_targets import trainable


def module(mode: str, targets: str, teacher: torch.nn.Module) -> NFKDistillationModule:
    torch.manual_seed(0)
    m = NFKDistillationModule(
        WideResNet(16, 1),
        teacher,
        mode=mode,
        targets=targets,
        optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
    )
    m.log = lambda *a, **k: None  # no trainer: logging is not what is timed
    return m


def step_seconds(m: NFKDistillationModule, opt, batch) -> float:
    start = time.perf_counter()
    opt.zero_grad()
    m.training_step(batch, 0).backward()
    opt.step()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fit-examples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--no-forward", action="store_true", help="skip the forward-mode timing")
    a = p.parse_args()
    print(
        f"# bench_distillation.py on {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    torch.manual_seed(0)
    teacher = WideResNet(40, 2).eval()
    x_fit = torch.randn(a.fit_examples, 3, 32, 32)
    batch_x = torch.randn(a.batch_size, 3, 32, 32)
    batch = (batch_x, torch.randint(0, 10, (a.batch_size,)), torch.arange(a.batch_size))

    # -- the teacher's NFK fit (k = 20, n_iter = 1: 3 passes, the statistics' included) ----
    with trainable(teacher):
        nfk = LowRankNFK(ClassifierEnergy(teacher), k=20, oversample=10, n_iter=1)
        start = time.perf_counter()
        nfk.fit(x_fit)
        fit_s = time.perf_counter() - start
    passes = 1 + 1 + 1  # statistics pass, the range pass, one power iteration (n_iter=1)
    per_example_pass = fit_s / (passes * a.fit_examples)

    # -- training steps ------------------------------------------------------------------------
    setups = {
        "student alone (`none`)": ("none", "precomputed"),
        "KD (teacher forward)": ("kd", "precomputed"),
        "NFKD, precomputed targets": ("nfkd", "precomputed"),
        "NFKD, online targets (per-example gradients)": ("nfkd", "online"),
    }
    mods = {}
    for name, (mode, targets) in setups.items():
        m = module(mode, targets, teacher)
        if m.teacher_targets is not None:  # NFKD: looked-up rows, whose values do not matter
            m.teacher_targets.use_fit(nfk, torch.randn(a.batch_size, 20))
        mods[name] = (m, m.configure_optimizers())
        step_seconds(*mods[name], batch)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in mods}
    for _ in range(a.repeats):
        for name, (m, opt) in mods.items():
            times[name].append(step_seconds(m, opt, batch))
    med = {name: statistics.median(t) for name, t in times.items()}

    # -- online targets alone: per-example gradients vs forward mode ---------------------------
    op = nfk.operator
    components = nfk.components.to(op.dtype)
    with trainable(teacher):
        start = time.perf_counter()
        blocked = op.local_matmat(batch_x, components)
        blocked_s = time.perf_counter() - start
        forward_s = float("nan")
        if not a.no_forward:
            fwd = op.with_strategy("matrix_free")
            start = time.perf_counter()
            forward = fwd.local_matmat(batch_x, components)
            forward_s = time.perf_counter() - start
            err = float((forward - blocked).abs().max() / blocked.abs().max())

    p_t = nfk.num_parameters
    print(
        f"\n### One training step, WRN-16-1 student, WRN-40-2 teacher ({p_t:,} parameters), "
        f"batch {a.batch_size} of 3x32x32, CPU; medians of {a.repeats} alternating repeats\n"
    )
    base = med["student alone (`none`)"]
    print("| step | seconds | vs student alone |")
    print("|---|---|---|")
    for name, s in med.items():
        print(f"| {name} | {s:.3f} | {s / base:.1f}x |")
    print(
        f"\n### Online targets of one batch of {a.batch_size}: e(x) = V_x P, k = 20 (single timings)\n"
    )
    print("| way | seconds | vs per-example gradients |")
    print("|---|---|---|")
    print(f"| per-example gradients (`blocked`, used) | {blocked_s:.2f} | 1.0x |")
    if not a.no_forward:
        print(
            f"| forward mode (`matrix_free`, k JVPs) | {forward_s:.2f} | {forward_s / blocked_s:.1f}x "
            f"(max rel. difference {err:.1e}) |"
        )
    n_full, iters = 50_000, 10
    full_passes = iters + 2
    print(
        f"\n### The teacher's NFK fit (k = 20, oversample = 10): {a.fit_examples} examples, "
        "n_iter = 1 (3 passes: statistics, range, one power iteration)\n"
    )
    print("| measured fit | per example per pass | projected: 50,000 examples, n_iter = 10 |")
    print("|---|---|---|")
    print(
        f"| {fit_s:.1f} s | {per_example_pass * 1e3:.1f} ms | "
        f"{per_example_pass * n_full * full_passes / 3600:.1f} h ({full_passes} passes; linear in N) |"
    )
    print(
        f"\nMemory: components {p_t} x 20 float32 = {p_t * 20 * 4 / 2**20:.0f} MiB (kept for "
        f"online targets, never checkpointed); the precomputed table of 50,000 x 20 = "
        f"{50_000 * 20 * 4 / 2**20:.1f} MiB (checkpointed); per-example gradient blocks of "
        f"{op.max_rows} rows x {p_t} = {op.max_rows * p_t * 4 / 2**20:.0f} MiB at a time."
    )


if __name__ == "__main__":
    main()
