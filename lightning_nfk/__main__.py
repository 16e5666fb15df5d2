"""``python -m lightning_nfk fit --config recipes/quickstart.yaml``."""

from lightning_nfk.cli import main

main()
