"""Every recipe parses as it is, and runs one fast step on small data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_nfk.cli import build_cli
from lightning_nfk.data.text import FORTUNES
from lightning_nfk.models import CausalLMModule

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


# transformer widths for the small runs (the recipes' block prefixes stay valid)
NARROW = {"dim": 32, "heads": 2, "embed_dim": 32, "num_heads": 2, "n_embd": 32, "n_head": 2}


def _extra(recipe: Path) -> str | None:
    """The optional package a recipe's classes come from (None: the core)."""
    text = recipe.read_text()
    return next((m for m in ("timm", "transformers") if f"class_path: {m}." in text), None)


def _narrow(init: dict) -> None:
    """Shrink a transformer's width in place (nested configs included)."""
    for key, value in init.items():
        if key in NARROW:
            init[key] = NARROW[key]
        elif isinstance(value, dict):
            _narrow(value)


def _small(config: dict, tmp_path: Path) -> dict:
    """The recipe on synthetic data of the same image shape (a few hundred documents of
    the text corpus for language models), CPU, one short epoch."""
    data = config["data"]["init_args"]
    cifar = "CIFAR10" in config["data"]["class_path"]
    text = "TextDataModule" in config["data"]["class_path"]
    _narrow(config["model"]["init_args"])
    if text:
        data.update(max_documents=300, batch_size=16)
    else:
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
            init = cb.setdefault("init_args", {})
            for key in ("every_n_train_steps", "schedule", "warm_start"):
                init.pop(key, None)  # the small run fits at its one epoch end
            init.update(SMALL_CALLBACKS[name])
    model = config["model"]["init_args"]
    if "nfk_num_samples" in model:
        model["nfk_num_samples"] = 64
    if "teacher" in model:  # distillation: an untrained small teacher, its NFK cached in tmp
        model["teacher_checkpoint"] = None
        model["teacher"]["init_args"]["depth"] = 10
        if "nfk_cache" in model:
            model.update(nfk_cache=str(tmp_path / "nfk.pt"), n_iter=1)
    return config


def _needs(recipe: Path) -> None:
    """Skip a recipe whose optional extra or corpus is missing."""
    extra = _extra(recipe)
    if extra is not None:
        pytest.importorskip(extra)
    if "fortunes" in recipe.read_text() and not Path(FORTUNES).is_dir():
        pytest.skip("apt-get install fortunes")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_as_is(recipe):
    _needs(recipe)
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
    assert "NFKSpectrumCallback" in names
    # a linear probe needs class labels: every recipe but the language models'
    assert ("LinearProbeCallback" in names) is not isinstance(cli.model, CausalLMModule)
    # `--ckpt_path last` needs a last.ckpt in the run's own folder (no fixed `dirpath`, which
    # concurrent runs of the recipe would share)
    (ckpt,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ModelCheckpoint"]
    assert ckpt.save_last and ckpt.dirpath is None
    assert cli.trainer.logger.name == recipe.stem
    assert callable(cli.model.nfk_energy)


# the paper's GAN at its width (a 5.9M-parameter discriminator) and the WRN-40-2 teacher
# (62 s on the 2-core EPYC): a minute or more each on 2 CPU cores, and the CIFAR-10 VAE
# (20 s) and the GPU recipes of the KD and student-alone WRN-16-1 (10 and 8 s; the
# NFKD one and the Fashion-MNIST distillation recipes stay): with the slow tests, which
# CI runs too
SLOW_RECIPES = {
    "cifar10_gan",
    "cifar10_wrn40_2_teacher",
    "cifar10_vae",
    "cifar10_wrn16_1_kd",
    "cifar10_wrn16_1_student",
}


@pytest.mark.parametrize(
    "recipe",
    [pytest.param(r, marks=pytest.mark.slow) if r.stem in SLOW_RECIPES else r for r in RECIPES],
    ids=lambda p: p.stem,
)
def test_recipe_runs_one_small_epoch(recipe, tmp_path):
    _needs(recipe)
    config = _small(yaml.safe_load(recipe.read_text()), tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["fit", "--config", str(path)])
    metrics = cli.trainer.callback_metrics
    assert "nfk/sigma_1" in metrics
    assert "probe/acc" in metrics or isinstance(cli.model, CausalLMModule)
    for cb in cli.trainer.callbacks:  # the recipes' per-block spectra, logged
        for name in getattr(cb, "blocks", None) or []:
            assert f"nfk/block/{name}/effective_rank" in metrics
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


@pytest.mark.parametrize("name", ["cifar10_gan", "fashion_mnist_afv_gan", "cifar10_afv_gan_cpu"])
def test_the_afv_recipes_keep_afvs_settings(name):
    """What makes the AFV recipes AFV's, beyond the networks: the NFK's statistics from
    1,024 samples drawn in one batch with batch statistics (a sample depends on its batch),
    D's sigmoid, least squares, every training image; the GPU recipe in float32 with the
    paper's 128 components."""
    config = yaml.safe_load((RECIPES[0].parent / f"{name}.yaml").read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert model["nfk_num_samples"] == 1024 <= model["nfk_batch_size"]
    assert (model["nfk_generator_mode"], model["nfk_score"]) == ("train", "sigmoid")
    assert model["loss"] == "lsgan" and model["ema_decay"] == 0.9
    assert data["val_size"] == 0 and data["batch_size"] == 64
    if name == "cifar10_gan":
        assert config["trainer"]["precision"] == "32-true"
        (spectrum,) = [
            cb
            for cb in config["trainer"]["callbacks"]
            if cb["class_path"].endswith("NFKSpectrumCallback")
        ]
        assert spectrum["init_args"]["k"] == 128
