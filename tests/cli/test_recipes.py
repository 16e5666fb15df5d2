"""Every recipe parses as it is, and runs one fast step on small data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_nfk.cli import build_cli

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
SMALL_CALLBACKS = {
    "NFKSpectrumCallback": {
        "k": 4,
        "oversample": 4,
        "n_iter": 1,
        "probe_size": 64,
        "every_n_epochs": 1,
    },
    "LinearProbeCallback": {
        "max_train": 100,
        "max_val": 50,
        "k": 4,
        "oversample": 4,
        "n_iter": 1,
        "nfk_fit_size": 64,
        "every_n_epochs": 1,
    },
}


def _small(config: dict, tmp_path: Path) -> dict:
    """The recipe on synthetic data of the same image shape, CPU, one short epoch."""
    data = config["data"]["init_args"]
    cifar = "CIFAR10" in config["data"]["class_path"]
    config["data"] = {
        "class_path": "tests.helpers.data.RandomImageDataModule",
        "init_args": {
            "shape": [3, 32, 32] if cifar else [1, 28, 28],
            "num_train": 256,
            "num_test": 64,
            "val_size": 64,
            "batch_size": 32,
            "normalization": data.get("normalization", "standard"),
            "with_index": data.get("with_index", False),
        },
    }
    trainer = config["trainer"]
    trainer.update(
        {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
        }
    )
    trainer["logger"] = {
        "class_path": "pytorch_lightning.loggers.CSVLogger",
        "init_args": {"save_dir": str(tmp_path)},
    }
    for cb in trainer["callbacks"]:
        name = cb["class_path"].rsplit(".", 1)[1]
        if name != "ModelCheckpoint":  # checkpoints: the run's own folder under tmp_path
            cb.setdefault("init_args", {}).update(SMALL_CALLBACKS[name])
    model = config["model"]["init_args"]
    if "nfk_num_samples" in model:
        model["nfk_num_samples"] = 64
    if "teacher" in model:  # distillation: an untrained small teacher, its NFK cached in tmp
        model["teacher_checkpoint"] = None
        model["teacher"]["init_args"]["depth"] = 10
        if "nfk_cache" in model:
            model.update(nfk_cache=str(tmp_path / "nfk.pt"), n_iter=1)
    return config


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_as_is(recipe):
    args = ["--config", str(recipe)]
    config = yaml.safe_load(recipe.read_text())
    if config["trainer"].get("accelerator") == "gpu":
        args.append("--trainer.accelerator=cpu")  # GPU recipes: no GPU on this machine
    if "teacher_checkpoint" in config["model"]["init_args"]:
        args.append("--model.teacher_checkpoint=null")  # the teacher is not trained here
    cli = build_cli(
        args, run=False
    )  # parses and instantiates model, data module, trainer, callbacks
    names = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert "NFKSpectrumCallback" in names and "LinearProbeCallback" in names
    # `--ckpt_path last` needs a last.ckpt in the run's own folder (no fixed `dirpath`, which
    # concurrent runs of the recipe would share)
    (ckpt,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ModelCheckpoint"]
    assert ckpt.save_last and ckpt.dirpath is None
    assert cli.trainer.logger.name == recipe.stem
    assert callable(cli.model.nfk_energy)


# the paper's GAN at its width (a 5.9M-parameter discriminator): over a minute on 2 CPU
# cores, so with the slow tests (which CI runs too)
SLOW_RECIPES = {"cifar10_gan"}


@pytest.mark.parametrize(
    "recipe",
    [pytest.param(r, marks=pytest.mark.slow) if r.stem in SLOW_RECIPES else r for r in RECIPES],
    ids=lambda p: p.stem,
)
def test_recipe_runs_one_small_epoch(recipe, tmp_path):
    config = _small(yaml.safe_load(recipe.read_text()), tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["fit", "--config", str(path)])
    metrics = cli.trainer.callback_metrics
    assert "nfk/sigma_1" in metrics and "probe/acc" in metrics
    # everything the run wrote is in its own folder
    run = tmp_path / "lightning_logs" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "metrics.csv").is_file()


def test_console_entry_points():
    out = subprocess.run(
        [sys.executable, "-m", "lightning_nfk", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "fit" in out.stdout and "validate" in out.stdout and "test" in out.stdout
