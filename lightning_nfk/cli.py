"""The ``lightning-nfk`` command: LightningCLI over any LightningModule and LightningDataModule.

lightning-nfk fit --config recipes/quickstart.yaml
lightning-nfk fit --config recipes/quickstart.yaml --trainer.strategy=ddp --trainer.devices=2
lightning-nfk fit --config recipes/quickstart.yaml --ckpt_path last    # resume the newest run
lightning-nfk test --config recipes/quickstart.yaml --ckpt_path last   # test it

Each run writes to a folder of its own (see :mod:`lightning_nfk.runs`): the CLI gives the
logger the next free ``version_N`` before anything is built, so that concurrent runs of one
recipe never mix their metrics, configs, plots or checkpoints.
"""

from __future__ import annotations

import csv
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_nfk.runs import (
    RunFolderError,
    claim_new_run,
    latest_checkpoint,
    launch_rank,
    lock_run,
    run_of,
)

# the run number rank zero claimed, for the processes Lightning's `ddp` launcher starts
# (they inherit the environment and parse the same command line)
_RUN_ENV = "LIGHTNING_NFK_RUN_VERSION"


class NFKCLI(LightningCLI):
    """LightningCLI that gives every run its own logger folder (``version_N``, claimed
    atomically) and resolves ``--ckpt_path last`` to the newest run's ``last.ckpt``."""

    _kept_metrics: Path | None = None

    def before_instantiate_classes(self) -> None:
        if self.subcommand is not None:
            self._kept_metrics = assign_run_folder(self.config[self.subcommand], self.subcommand)

    def before_fit(self) -> None:
        restore_metrics(self.trainer, self._kept_metrics)


_KEPT_SUFFIX = ".before-resume"


def restore_metrics(trainer: pl.Trainer, kept: Path | None) -> None:
    """Put a resumed run's ``metrics.csv`` (set aside by :func:`assign_run_folder`) back
    under its logger, which then appends to it: Lightning's CSV logger deletes a
    ``metrics.csv`` it finds when it opens a folder."""
    if kept is None:
        return
    original = kept.with_name(kept.name.removesuffix(_KEPT_SUFFIX))
    for logger in trainer.loggers:
        if (
            isinstance(logger, CSVLogger)
            and Path(logger.log_dir).resolve() == kept.parent.resolve()
        ):
            with warnings.catch_warnings():  # "... will be deleted": not any more
                warnings.filterwarnings("ignore", message="Experiment logs directory")
                writer = logger.experiment  # opened now, with no metrics.csv to delete
            os.replace(kept, original)
            with open(original, newline="") as f:
                writer.metrics_keys = list(csv.DictReader(f).fieldnames or [])
            return
    os.replace(kept, original)


def _run_logger(trainer_config: Any) -> Any | None:
    """The logger's ``init_args`` when the trainer has one logger with ``save_dir``, ``name``
    and ``version`` (CSVLogger, TensorBoardLogger), else None."""
    logger = trainer_config.get("logger")
    if isinstance(logger, list) and len(logger) == 1:
        logger = logger[0]
    args = getattr(logger, "init_args", None) if logger is not None else None
    if args is None or not all(k in args for k in ("save_dir", "name", "version")):
        return None
    return args


def _explicit_dirpath(trainer_config: Any) -> bool:
    """Whether a ModelCheckpoint of the config writes to a fixed ``dirpath``."""
    return any(
        str(getattr(cb, "class_path", "")).endswith("ModelCheckpoint")
        and getattr(cb, "init_args", None) is not None
        and bool(cb.init_args.get("dirpath"))
        for cb in trainer_config.get("callbacks") or []
    )


def assign_run_folder(config: Any, subcommand: str) -> Path | None:
    """Choose the run's folder and checkpoint in the parsed ``config`` (in place):

    * a new ``version_N`` (the next free number, created here) unless the logger names its
      version or ``fit`` resumes a run;
    * ``--ckpt_path last``: the newest ``checkpoints/last.ckpt`` among the recipe's runs;
      ``fit`` continues that run in its folder, ``validate``/``test`` read it and log to a
      new folder; an error when there is none (``fit``: Lightning's warning, a new run);
    * ``fit --ckpt_path <run>/checkpoints/<file>``: continues that run in its folder.

    ``fit`` locks its folder (refused when a live process holds it). Only the launch's rank
    zero creates folders and locks; Lightning's ``ddp`` launcher's processes take its
    number from the environment, torchrun's use the checkpoint folder rank zero broadcasts.

    Returns:
        When ``fit`` continues a run whose folder holds a ``metrics.csv``: that file, moved
        aside until the logger has opened the folder (:func:`restore_metrics`); else None.
    """
    args = _run_logger(config.trainer)
    ckpt = config.get("ckpt_path")
    if args is None or _explicit_dirpath(config.trainer):
        if ckpt == "last" and subcommand != "fit":
            _no_last(subcommand, "the trainer has no single versioned logger")
        return None
    root = Path(args.save_dir or config.trainer.get("default_root_dir") or ".") / str(args.name)
    resume = None
    if ckpt == "last":
        resume = latest_checkpoint(root)
        if resume is None and subcommand != "fit":
            _no_last(subcommand, f"no run under {str(root)!r} has checkpoints/last.ckpt")
        if resume is not None:
            config.ckpt_path = str(resume)
            rank_zero_info(f"--ckpt_path last: {resume}")
    elif subcommand == "fit" and ckpt not in (None, "best", "hpc") and Path(ckpt).is_file():
        resume = Path(ckpt)
    elif subcommand != "fit" and ckpt is None:
        rank_zero_warn(
            f"`lightning-nfk {subcommand}` without --ckpt_path evaluates the model as the config "
            "builds it (untrained): pass --ckpt_path last (the newest run of this recipe) or a "
            "checkpoint file."
        )
    run = run_of(resume) if subcommand == "fit" and resume is not None else None
    if args.version is None and run is not None and run[0].resolve() == root.resolve():
        args.version = run[1]
    rank0 = launch_rank() == 0
    if args.version is None:
        inherited = _inherited_run()
        if not rank0 and inherited is not None:
            args.version = inherited
        elif rank0:
            args.version = claim_new_run(root)
            os.environ[_RUN_ENV] = f"{os.getpid()}:{args.version}"
        # else torchrun's ranks > 0: the checkpoint folder rank zero broadcasts is used
    if subcommand != "fit" or not rank0:
        return None
    folder = f"version_{args.version}" if isinstance(args.version, int) else args.version
    lock_run(root / folder)
    metrics = root / folder / "metrics.csv"
    kept = metrics.with_name(metrics.name + _KEPT_SUFFIX)
    if run is None:
        return None
    if metrics.is_file():
        os.replace(metrics, kept)
    return kept if kept.is_file() else None  # also one an interrupted resume left aside


def _inherited_run() -> int | None:
    """The run number claimed by this process's parent (Lightning's ``ddp`` launcher runs
    the command again in child processes), None otherwise."""
    pid, _, version = os.environ.get(_RUN_ENV, "").partition(":")
    if pid.isdigit() and int(pid) == os.getppid() and version.isdigit():
        return int(version)
    return None


def _no_last(subcommand: str, why: str) -> None:
    raise RunFolderError(
        f"`lightning-nfk {subcommand} --ckpt_path last` found no checkpoint: {why}. Train the "
        "recipe first (`lightning-nfk fit --config ...`), or pass --ckpt_path <file>."
    )


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """The LightningCLI (``args`` defaults to ``sys.argv[1:]``); subcommands fit, validate,
    test; ``run=False`` only parses and instantiates (no subcommand in ``args`` then, and
    no ``config.yaml`` is saved: there is no run folder)."""
    return NFKCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        save_config_callback=SaveConfigCallback if run else None,
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


@dataclass(frozen=True)
class Recipe:
    """A recipe's objects, built as ``lightning-nfk fit --config <path> <overrides>`` builds
    them (see :func:`load_recipe`)."""

    path: Path
    model: pl.LightningModule
    datamodule: pl.LightningDataModule
    trainer: pl.Trainer


# the recipes of a source checkout: <repo>/recipes/*.yaml
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def recipe_path(recipe: str | os.PathLike) -> Path:
    """``recipe`` as a file: a path to a YAML config, or the name of one of the checkout's
    recipes (``"fashion_mnist_gan"`` is ``recipes/fashion_mnist_gan.yaml``). An existing
    file of that name in the working directory comes first.

    Raises:
        FileNotFoundError: naming the recipe and where it was looked for.
    """
    path = Path(recipe)
    if path.is_file():
        return path
    # a bare name (no folder): the checkout's recipe of that name
    named = RECIPES / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and named.is_file():
        return named
    raise FileNotFoundError(
        f"recipe={str(recipe)!r}: no such file, and no recipe of that name in {RECIPES}"
    )


# what ``bare=True`` turns off: everything a script that trains and measures a recipe's
# model itself does not want (files written, callbacks' fits, progress bar and summary)
BARE_TRAINER = (
    "--trainer.logger=false",
    "--trainer.callbacks=[]",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
)


def load_recipe(recipe: str | os.PathLike, *overrides: str, bare: bool = False) -> Recipe:
    """The model, data module and trainer a recipe defines, built by the CLI's own parser
    (``overrides`` are command-line arguments, e.g. ``"--trainer.max_epochs=2"``,
    ``"--data.init_args.train_subset=1000"``), without running anything: what scripts use
    to train or study exactly the model a recipe trains. The recipe's ``seed_everything``
    seeds the process before the model is built, as ``lightning-nfk fit`` does
    (``"--seed_everything=false"`` leaves the seeding to the caller), and the trainer
    applies its process-wide settings as Lightning does (``deterministic: true`` switches
    torch to deterministic algorithms for the whole process). No run folder is claimed and
    no config saved; the recipe's logger writes once a fit logs.

    Args:
        recipe: a YAML path or a recipe's name (see :func:`recipe_path`).
        overrides: CLI arguments applied after the recipe, in order.
        bare: the trainer without the recipe's logger, callbacks, checkpoints, progress bar
            and model summary (:data:`BARE_TRAINER`, applied before ``overrides``).

    Example::

        r = load_recipe("fashion_mnist_gan", "--trainer.max_epochs=1", bare=True)
        r.trainer.fit(r.model, datamodule=r.datamodule)
        energy = r.model.nfk_energy()
    """
    path = recipe_path(recipe)
    args = ["--config", str(path), *(BARE_TRAINER if bare else ()), *overrides]
    with warnings.catch_warnings():  # the calling script's own sys.argv is not the CLI's
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = build_cli(args, run=False)
    return Recipe(path, cli.model, cli.datamodule, cli.trainer)


def main() -> None:
    """Console entry point ``lightning-nfk``."""
    try:
        build_cli()
    except RunFolderError as e:
        sys.exit(f"lightning-nfk: error: {e}")


__all__ = [
    "BARE_TRAINER",
    "NFKCLI",
    "Recipe",
    "assign_run_folder",
    "build_cli",
    "load_recipe",
    "main",
    "recipe_path",
    "restore_metrics",
]


if __name__ == "__main__":
    main()
