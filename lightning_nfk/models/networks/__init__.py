"""Plain torch networks used by the modules, recipes and benchmarks."""

from lightning_nfk.models.networks.dcgan import DCGANDiscriminator, DCGANGenerator
from lightning_nfk.models.networks.lenet import LeNet5
from lightning_nfk.models.networks.mlp import MLP
from lightning_nfk.models.networks.resnet_gan import ResNetDiscriminator, ResNetGenerator
from lightning_nfk.models.networks.transformer import GPT, ViT
from lightning_nfk.models.networks.vae import ConvVAE
from lightning_nfk.models.networks.wide_resnet import WideResNet

__all__ = [
    "GPT",
    "MLP",
    "ConvVAE",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "LeNet5",
    "ResNetDiscriminator",
    "ResNetGenerator",
    "ViT",
    "WideResNet",
]
