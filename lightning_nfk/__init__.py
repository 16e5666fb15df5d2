"""lightning-nfk: the Neural Fisher Kernel (Zhang et al., ICLR 2022) for PyTorch Lightning."""

__version__ = "0.1.0.dev0"
