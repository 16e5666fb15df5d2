"""``experiments/distillation.py --quick`` end to end, as a user runs it (a subprocess
that runs the recipes' ``lightning-nfk fit`` / ``test``), on a CIFAR-10-shaped tree of
random PNG images written here (the real CIFAR-10 is not on the test machines): the
teacher, the three row kinds (full, labelled-only, every image) and two of the sweep's
variants, one of them with its own NFK fit; the JSON, the summary and the plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_nfk.data.torchvision_sets import CIFAR10_CLASSES
from tests.helpers.data import write_image_tree

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a teacher, five students and two NFK fits through the CLI: minutes
def test_distillation_quick_run_with_sweep(tmp_path):
    data = tmp_path / "cifar10"
    # quick: 500 training + 250 validation images
    write_image_tree(data / "train", dict.fromkeys(CIFAR10_CLASSES, 75), seed=0)
    write_image_tree(data / "test", dict.fromkeys(CIFAR10_CLASSES, 10), seed=1)
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(REPO / "experiments" / "distillation.py"),
        *("--quick", "--data-dir", str(data), "--out", str(out)),
        *("--modes", "nfkd", "--sweep", "mse", "n_iter10"),
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    expected = {
        "teacher",
        *(f"{row}/nfkd/seed0" for row in ("full", "labels100", "labels100-semi")),
        "full/nfkd-mse/seed0",
        "full/nfkd-n_iter10/seed0",
    }
    assert set(results) == expected
    sweep = results["full/nfkd-n_iter10/seed0"]["command"]
    assert "--model.n_iter=2" in sweep and "nfk_cache_k20_n2.pt" in sweep
    assert "--model.teacher_loss=mse" in results["full/nfkd-mse/seed0"]["command"]
    # the teacher's NFK: one fit per n_iter, shared by the students
    assert sorted(p.name for p in out.glob("nfk_cache_*.pt")) == [
        "nfk_cache_k20_n1.pt",
        "nfk_cache_k20_n2.pt",
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["rows"]) == {k.rsplit("/", 1)[0] for k in expected - {"teacher"}}
    for row in summary["rows"].values():
        assert row["n"] == 1 and row["sd"] is None and 0 <= row["mean"] <= 100
        assert row["minutes"] > 0
    assert summary["meta"]["mode"] == "quick" and summary["meta"]["commit"]
    assert (out / "distillation.png").stat().st_size > 1000
    for r in results.values():
        assert 0 <= r["test_acc"] <= 1
