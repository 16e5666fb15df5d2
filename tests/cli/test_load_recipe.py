"""load_recipe: a recipe's model, data module and trainer, built as the CLI builds them."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar
from pytorch_lightning.cli import SaveConfigCallback

from lightning_nfk.callbacks import LinearProbeCallback, NFKSpectrumCallback
from lightning_nfk.cli import RECIPES, load_recipe, recipe_path
from lightning_nfk.data import FashionMNISTDataModule
from lightning_nfk.models import ClassifierModule, DCGANGenerator, GANModule, LeNet5


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_a_recipe_by_name_builds_its_objects_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = load_recipe("quickstart", "--trainer.max_epochs=1")
    assert r.path == RECIPES / "quickstart.yaml"
    assert isinstance(r.model, ClassifierModule) and isinstance(r.model.net, LeNet5)
    assert isinstance(r.datamodule, FashionMNISTDataModule)
    assert r.trainer.max_epochs == 1
    kinds = {type(cb) for cb in r.trainer.callbacks}
    assert {NFKSpectrumCallback, LinearProbeCallback, ModelCheckpoint} <= kinds
    assert SaveConfigCallback not in kinds  # it would write config.yaml at the first fit
    assert list(tmp_path.iterdir()) == []  # no run folder claimed


def test_bare_drops_logger_callbacks_and_checkpoints_and_seeds_as_the_recipe(tmp_path):
    r = load_recipe("fashion_mnist_gan", bare=True)
    assert r.trainer.logger is None
    assert not any(
        isinstance(cb, (NFKSpectrumCallback, LinearProbeCallback, ModelCheckpoint))
        for cb in r.trainer.callbacks
    )
    assert isinstance(r.model, GANModule) and r.model.nfk_num_samples == 2048
    # the recipe's seed_everything: 0 before the model is built, as `lightning-nfk fit`
    r2 = load_recipe("quickstart", bare=True)
    pl.seed_everything(0, verbose=False)
    by_hand = ClassifierModule(LeNet5()).state_dict()
    built = r2.model.state_dict()
    assert list(built) == list(by_hand)
    for name, tensor in built.items():
        torch.testing.assert_close(tensor, by_hand[name], rtol=0, atol=0, msg=name)
    # overrides come after what `bare` turns off: they can turn a part back on
    r3 = load_recipe("quickstart", "--trainer.enable_progress_bar=true", bare=True)
    assert isinstance(r3.trainer.progress_bar_callback, ProgressBar)
    assert load_recipe("quickstart", bare=True).trainer.progress_bar_callback is None


def test_overrides_apply_and_seed_false_leaves_the_seeding_to_the_caller():
    overrides = (
        "--model.init_args.generator.init_args.width=32",
        "--model.init_args.discriminator.init_args.width=32",
        "--data.init_args.train_subset=100",
    )

    def first_weight(seed: int, *extra: str) -> torch.Tensor:
        torch.manual_seed(seed)
        r = load_recipe("fashion_mnist_gan", *extra, *overrides, bare=True)
        narrow = DCGANGenerator(latent_dim=64, channels=1, width=32, image_size=28)
        assert _count(r.model.generator) == _count(narrow) < _count(DCGANGenerator())
        assert r.datamodule.train_subset == 100
        return next(r.model.parameters()).detach().clone()

    # the recipe's seed: the same weights whatever the state before
    torch.testing.assert_close(first_weight(1), first_weight(2), rtol=0, atol=0)
    # --seed_everything=false: the caller's random state decides
    a, b = first_weight(1, "--seed_everything=false"), first_weight(2, "--seed_everything=false")
    assert (a - b).abs().max() > 1e-3


def test_recipe_paths_and_a_clear_error(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text((RECIPES / "quickstart.yaml").read_text())
    assert recipe_path(own) == own
    assert recipe_path("quickstart.yaml") == RECIPES / "quickstart.yaml"
    with pytest.raises(FileNotFoundError, match=r"recipe='no_such_recipe': no such file"):
        recipe_path("no_such_recipe")
    with pytest.raises(FileNotFoundError, match=r"recipe='sub/quickstart.yaml'"):
        recipe_path("sub/quickstart.yaml")  # a path with a folder is a path, not a name
