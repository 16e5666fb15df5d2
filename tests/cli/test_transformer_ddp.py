"""The transformer recipes through ``lightning-nfk fit`` on one CPU process and on two
with Lightning's ``ddp`` launcher (gloo), under the watchdog: the same nfk/ figures,
per-block ones included. The recipes' callbacks, schedules (log-spaced steps), plots, progress bars and loggers are kept; only the width, the data and the
schedule's first point are made small, and the weights frozen (lr = 0) so that one and
two processes see the same model."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import yaml

from lightning_nfk.data.text import FORTUNES
from tests.cli.test_recipes import _narrow
from tests.helpers.processes import REPO, TIMINGS, run_cli


def _config(recipe: str, tmp: Path) -> Path:
    config = yaml.safe_load((REPO / "recipes" / f"{recipe}.yaml").read_text())
    _narrow(config["model"]["init_args"])
    config["model"]["init_args"]["optimizer"]["init_args"]["lr"] = 0.0
    trainer = config["trainer"]
    trainer.update(max_epochs=2, limit_train_batches=2, limit_val_batches=1)
    for cb in trainer["callbacks"]:
        init = cb.get("init_args", {})
        if "every_n_train_steps" in init:
            init["every_n_train_steps"] = 1  # log schedule: after steps 1, 2 and 4
        if "probe_size" in init:
            init["probe_size"] = 96
    data = config["data"]
    if "TextDataModule" in data["class_path"]:
        data["init_args"].update(max_documents=301, batch_size=16)
    else:  # CIFAR-10's shape, synthetic
        data.update(
            class_path="tests.helpers.data.RandomImageDataModule",
            init_args={"shape": [3, 32, 32], "num_train": 256, "val_size": 64, "batch_size": 32},
        )
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _figures(tmp: Path, recipe: str, devices: int) -> dict[str, dict[str, float]]:
    """row label (step or epoch) -> the nfk/ scalars of that fit."""
    tmp.mkdir()
    args = ["fit", "--config", str(_config(recipe, tmp)), "--trainer.accelerator=cpu"]
    args += [f"--trainer.devices={devices}"]
    args += ["--trainer.strategy=ddp"] if devices > 1 else []
    run_cli(args, tmp, timeout=300)
    version = tmp / "lightning_logs" / recipe / "version_0"
    with open(version / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("nfk/sigma_1")]
    assert (version / "nfk_spectrum" / "blocks.png").stat().st_size > 0
    return {
        f"{r['epoch']}/{r['step']}": {
            k: float(v) for k, v in r.items() if k.startswith("nfk/") and v and k not in TIMINGS
        }
        for r in rows
    }


@pytest.mark.parametrize(
    "recipe",
    # 40-70 s each: with the slow tests (CI runs them), so that the default run keeps a
    # margin under its 10 minutes
    [
        pytest.param("fortunes_gpt", marks=pytest.mark.slow),
        pytest.param("cifar10_vit", marks=pytest.mark.slow),
        pytest.param("fortunes_hf_gpt2", marks=pytest.mark.slow),
    ],
)
def test_transformer_recipe_on_two_processes_logs_what_one_logs(tmp_path, recipe, monkeypatch):
    if "fortunes" in recipe and not Path(FORTUNES).is_dir():
        pytest.skip("apt-get install fortunes")
    if "hf" in recipe:
        pytest.importorskip("transformers")
    # the CLI's processes import the synthetic image data module from tests.helpers
    path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    one, two = _figures(tmp_path / "one", recipe, 1), _figures(tmp_path / "two", recipe, 2)
    assert sorted(one) == sorted(two) and len(one) >= 2
    for at, figures in one.items():
        blocks = [k for k in figures if k.startswith("nfk/block/")]
        assert blocks, figures
        for key, value in figures.items():
            if key.endswith("/residual"):  # differences of nearly equal numbers: sizes
                assert two[at][key] == pytest.approx(value, rel=1.0, abs=1e-3), (at, key)
            elif key.startswith("nfk/block/"):
                # the blocks' cold sketches: float32 order of the sums only
                assert two[at][key] == pytest.approx(value, rel=2e-4), (at, key)
            elif key in ("nfk/sigma_1", "nfk/explained_variance", "nfk/effective_rank"):
                # within both fits' residual bounds, float32 round-off on top
                bound = figures.get("nfk/residual", 0) + two[at].get("nfk/residual", 0) + 2e-4
                assert two[at][key] == pytest.approx(value, rel=bound), (at, key)
