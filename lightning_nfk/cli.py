"""The ``lightning-nfk`` command: LightningCLI over any LightningModule and LightningDataModule.

lightning-nfk fit --config recipes/quickstart.yaml
lightning-nfk fit --config recipes/quickstart.yaml --trainer.strategy=ddp --trainer.devices=2
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """The LightningCLI (``args`` defaults to ``sys.argv[1:]``); subcommands fit, validate,
    test; ``run=False`` only parses and instantiates (no subcommand in ``args`` then)."""
    return LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def main() -> None:
    """Console entry point ``lightning-nfk``."""
    build_cli()


if __name__ == "__main__":
    main()
