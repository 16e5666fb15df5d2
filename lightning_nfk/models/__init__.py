"""Networks (plain torch) and, later, the LightningModules built on them."""

from lightning_nfk.models.networks import (
    MLP,
    ConvVAE,
    DCGANDiscriminator,
    DCGANGenerator,
    LeNet5,
    WideResNet,
)

__all__ = ["MLP", "ConvVAE", "DCGANDiscriminator", "DCGANGenerator", "LeNet5", "WideResNet"]
