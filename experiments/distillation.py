"""NFK distillation at CPU scale: a WRN teacher, then WRN-16-1 students in the three modes
(nfkd, kd, none) over several seeds, and a low-label row; every run is the recipes' own
``lightning-nfk fit`` / ``lightning-nfk test`` with command-line overrides.

    # /work/cifar10: a CIFAR-10 image-folder tree, {train,test}/<class>/*.jpg
    python experiments/distillation.py --data-dir /work/cifar10 --out /work/exp/distill
    python experiments/distillation.py --data-dir /work/cifar10 --out /tmp/q --quick

The settings the paper leaves open are NFKD variants of the full row (``--sweep alpha0.1
alpha0.9 mse cosine raw n_iter10``, each at ``--sweep-seeds``); the label budget's row with
every training image (``train_split=semi``) has its own epochs (``--semi-epochs``).

Writes ``OUT/results.json`` (every run: mode, seed, test accuracy, wall time, command)
after each run, so an interrupted experiment keeps what finished, skips runs whose
result is already there and continues a stopped fit from its ``last.ckpt``; then
``OUT/summary.json`` (per row: mean, sd, seeds, minutes; commit, machine) and
``OUT/distillation.png``. ``--quick``: a 500-image subset, a WRN-10-1
teacher, 1 epoch, n_iter 1 (2 for ``n_iter10``): minutes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common

from lightning_nfk.runs import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
# The NFKD settings the paper leaves open, each against the main row (the module's defaults:
# alpha 0.5, cosine loss, standardised targets; the teacher's NFK at --n-iter): name ->
# (student overrides, n_iter). The main row used the MSE loss before the cosine loss became
# the default; "cosine" names the runs of that time and is the main row's setting now.
SWEEP: dict[str, tuple[list[str], int | None]] = {
    "alpha0.1": (["--model.alpha=0.1"], None),
    "alpha0.9": (["--model.alpha=0.9"], None),
    "cosine": (["--model.teacher_loss=cosine"], None),
    "mse": (["--model.teacher_loss=mse"], None),
    "raw": (["--model.target_scaling=raw"], None),
    "n_iter10": ([], 10),  # the paper's 10 power iterations for the teacher's NFK
}

# --quick: every path once, in minutes (a WRN-10-1 teacher, 1 epoch, n_iter 1)
QUICK = {
    "train_subset": 500,
    "val_size": 250,
    "teacher_epochs": 1,
    "epochs": 1,
    "teacher_depth": 10,
    "teacher_width": 1,
    "n_iter": 1,
    "seeds": [0],
    "low_label": 100,
    "low_label_epochs": 1,
    "semi_epochs": 1,
}


def metrics(run_dir: Path, name: str) -> dict[str, float]:
    """The last value of each metric over the CSV logs of ``name`` in version order (the
    fit's, then the test's)."""
    versions = sorted(
        (run_dir / "lightning_logs" / name).glob("version_*"),
        key=lambda p: int(p.name.split("_")[1]),
    )
    out: dict[str, float] = {}
    for version in versions:
        if not (version / "metrics.csv").is_file():  # a run that stopped before logging
            continue
        with open(version / "metrics.csv") as f:
            for row in csv.DictReader(f):
                out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


def cli(run_dir: Path, args: list[str], log: Path) -> float:
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ lightning-nfk " + " ".join(args) + "\n")
        f.flush()
        subprocess.run(
            ["lightning-nfk", *args], cwd=run_dir, stdout=f, stderr=subprocess.STDOUT, check=True
        )
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", required=True, help="CIFAR-10 image-folder tree")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--val-size", type=int, default=2000)
    p.add_argument("--teacher-depth", type=int, default=16)
    p.add_argument("--teacher-width", type=int, default=2)
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="none: no full rows")
    p.add_argument("--modes", nargs="+", default=["nfkd", "kd", "student"])
    p.add_argument("--n-iter", type=int, default=3)
    p.add_argument("--low-label", type=int, default=1000, help="0: no low-label row")
    p.add_argument("--low-label-epochs", type=int, default=40)
    p.add_argument("--low-label-seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--semi-epochs",
        type=int,
        default=4,
        help="the low-label row with every training image (train_split=semi): the labelled "
        "row's steps (40 epochs of 1,000 = 4 of 10,000); 0: no semi row",
    )
    p.add_argument("--semi-only", action="store_true", help="of the low-label rows, only semi")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for the students")
    p.add_argument("--tag", default="", help="suffix of the run names (sweeps)")
    p.add_argument(
        "--sweep",
        nargs="*",
        default=[],
        choices=sorted(SWEEP),
        help="NFKD variants on the full row, named by the setting changed (run names nfkd-<name>)",
    )
    p.add_argument("--sweep-seeds", type=int, nargs="+", default=[0])
    a = p.parse_args()
    if a.quick:  # new defaults; what the command line names still wins
        p.set_defaults(**QUICK)
        a = p.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    log = out / "log.txt"
    data = [
        f"--data.data_dir={Path(a.data_dir).resolve()}",
        f"--data.train_subset={a.train_subset}",
        f"--data.val_size={a.val_size}",
        "--data.num_workers=0",
    ]
    # float32: the recipes train in bf16-mixed for a GPU; on a CPU without bfloat16
    # instructions autocast emulates it (11-27x slower steps on a 2-core AMD EPYC, BENCHMARKS.md)
    cpu = [
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        "--trainer.enable_progress_bar=false",
    ]

    def milestones(epochs: int) -> str:  # the paper's 150/200 of 250 epochs
        return (
            f"--model.scheduler.init_args.milestones=[{round(0.6 * epochs)},{round(0.8 * epochs)}]"
        )

    def record(key: str, entry: dict) -> None:
        results[key] = entry
        results_path.write_text(json.dumps(results, indent=1))

    # -- teacher --------------------------------------------------------------------------------
    teacher_dir = out / "teacher"
    teacher_args = [
        "--config",
        str(RECIPES / "cifar10_wrn40_2_teacher.yaml"),
        *cpu,
        f"--trainer.max_epochs={a.teacher_epochs}",
        f"--model.net.init_args.depth={a.teacher_depth}",
        f"--model.net.init_args.widen_factor={a.teacher_width}",
        milestones(a.teacher_epochs),
        *data,
    ]
    # the teacher recipe's folder: `teacher_checkpoint` reads its newest run's last.ckpt
    teacher_ckpt = teacher_dir / "lightning_logs/cifar10_wrn40_2_teacher"
    if "teacher" not in results:
        # a fit stopped on the way (or finished) continues from its last.ckpt
        resumed = latest_checkpoint(teacher_ckpt) is not None
        seconds = cli(teacher_dir, ["fit", *teacher_args, "--ckpt_path=last"], log)
        cli(teacher_dir, ["test", *teacher_args, "--ckpt_path=last"], log)
        m = metrics(teacher_dir, "cifar10_wrn40_2_teacher")
        record(
            "teacher",
            {
                "net": f"WRN-{a.teacher_depth}-{a.teacher_width}",
                "test_acc": m["test/acc"],
                "seconds": seconds,
                "resumed": resumed,  # seconds: this process's part only
                "command": "lightning-nfk fit " + " ".join(teacher_args),
            },
        )
    print("teacher", results["teacher"], flush=True)

    # -- students -------------------------------------------------------------------------------

    def student(
        mode: str,
        seed: int,
        extra: list[str],
        epochs: int,
        row: str,
        tag: str = a.tag,
        n_iter: int = a.n_iter,
    ) -> None:
        key = f"{row}/{mode}{tag}/seed{seed}"
        if key in results:
            return
        run_dir = out / row / f"{mode}{tag}" / f"seed{seed}"
        args = [
            "--config",
            str(RECIPES / f"cifar10_wrn16_1_{mode}.yaml"),
            *cpu,
            f"--seed_everything={seed}",
            f"--trainer.max_epochs={epochs}",
            milestones(epochs),
            f"--model.teacher.init_args.depth={a.teacher_depth}",
            f"--model.teacher.init_args.widen_factor={a.teacher_width}",
            f"--model.teacher_checkpoint={teacher_ckpt}",
            *data,
            *extra,
        ]
        if mode == "nfkd":
            cache = out / f"nfk_cache_k20_n{n_iter}.pt"  # one per n_iter, shared by seeds
            args += [f"--model.nfk_cache={cache}", f"--model.n_iter={n_iter}"]
        args += a.extra if mode == "nfkd" else []
        resumed = latest_checkpoint(run_dir / "lightning_logs" / f"cifar10_wrn16_1_{mode}")
        seconds = cli(run_dir, ["fit", *args, "--ckpt_path=last"], log)
        cli(run_dir, ["test", *args, "--ckpt_path=last"], log)
        m = metrics(run_dir, f"cifar10_wrn16_1_{mode}")
        record(
            key,
            {
                "mode": mode,
                "seed": seed,
                "test_acc": m["test/acc"],
                "val_acc": m.get("val/acc"),
                "target_r2": m.get("nfkd/target_r2"),
                "target_cos": m.get("nfkd/target_cos"),
                "seconds": seconds,
                "resumed": resumed is not None,  # seconds: this process's part only
                "command": "lightning-nfk fit " + " ".join(args),
            },
        )
        print(key, results[key]["test_acc"], f"{seconds:.0f} s", flush=True)

    for seed in a.seeds:
        for mode in a.modes:
            student(mode, seed, [], a.epochs, "full")
    for name in a.sweep:
        overrides, n_iter = SWEEP[name]
        if n_iter is None:
            n_iter = a.n_iter
        elif a.quick:
            n_iter = min(n_iter, 2)  # quick: minutes
        for seed in a.sweep_seeds:
            student("nfkd", seed, overrides, a.epochs, "full", f"{a.tag}-{name}", n_iter)
    if a.low_label:
        low = [
            f"--data.num_labels={a.low_label}",
            "--data.train_split=labeled",
            "--trainer.check_val_every_n_epoch=5",
        ]
        for seed in [] if a.semi_only else a.low_label_seeds:
            for mode in a.modes:
                student(mode, seed, low, a.low_label_epochs, f"labels{a.low_label}")
        # the same label budget, every training image in the loader: cross-entropy on the
        # labelled ones, the distillation term on all
        semi = [f"--data.num_labels={a.low_label}", "--data.train_split=semi"]
        for seed in a.low_label_seeds if a.semi_epochs else []:
            for mode in a.modes:
                student(mode, seed, semi, a.semi_epochs, f"labels{a.low_label}-semi")

    # -- summary --------------------------------------------------------------------------------
    summary = summarize(results)
    summary["meta"] = common.run_meta("distillation", a.quick)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, out / "distillation.png")
    print(f"teacher {results['teacher']['net']}: {100 * results['teacher']['test_acc']:.2f}")
    for name, row in summary["rows"].items():
        sd = "" if row["sd"] is None else f" +- {row['sd']:.2f}"
        print(f"{name}: {row['mean']:.2f}{sd} (n={row['n']})")


def summarize(results: dict) -> dict:
    """Test accuracy (%) per row (``row/run``): mean, sample sd (None for one seed), seeds,
    the median minutes of its fits."""
    runs: dict[str, list[dict]] = {}
    for key, r in results.items():
        if key != "teacher":
            runs.setdefault(key.rsplit("/", 1)[0], []).append(r)
    rows = {}
    for name, rs in runs.items():
        accs = [100 * r["test_acc"] for r in rs]
        rows[name] = {
            "mean": statistics.mean(accs),
            "sd": statistics.stdev(accs) if len(accs) > 1 else None,
            "n": len(accs),
            "accs": accs,
            "seeds": [r["seed"] for r in rs],
            "minutes": statistics.median(r["seconds"] for r in rs) / 60,
        }
    teacher = {"net": results["teacher"]["net"], "test_acc": 100 * results["teacher"]["test_acc"]}
    return {"teacher": teacher, "rows": rows}


def plot(summary: dict, path: Path) -> None:
    """One panel per row group (the full row, the low-label ones): each run's seeds as
    points, their mean as a bar; the teacher as a line."""
    groups: dict[str, list[str]] = {}
    for name in summary["rows"]:
        groups.setdefault(name.split("/")[0], []).append(name)
    if not groups:  # the teacher alone
        return
    fig, axes = common.figure(1, len(groups), size=(5.0, 3.6))
    for ax, (group, names) in zip(axes[0], groups.items()):
        for i, name in enumerate(names):
            row = summary["rows"][name]
            ax.barh(i, row["mean"], color="0.8")
            ax.plot(row["accs"], [i] * row["n"], "k.", ms=4)
        ax.set_yticks(range(len(names)), [n.split("/", 1)[1] for n in names], fontsize=8)
        accs = [acc for n in names for acc in summary["rows"][n]["accs"]]
        ax.set_xlim(max(0.0, min(accs) - 5), max(*accs, summary["teacher"]["test_acc"]) + 2)
        ax.axvline(summary["teacher"]["test_acc"], color="C0", ls="--", label="teacher")
        ax.set_xlabel("test accuracy, %")
        ax.set_title(group, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
