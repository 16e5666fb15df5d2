"""Networks (plain torch), LightningModules, and the NFK protocol that joins them to the callbacks."""

from lightning_nfk.models.classifier import ClassifierModule
from lightning_nfk.models.distillation import NFKDistillationModule
from lightning_nfk.models.distillation_terms import DistillationTerm, KDTerm, NFKDTerm
from lightning_nfk.models.gan import GANModule
from lightning_nfk.models.gan_inversion import GANInversion, invert_gan
from lightning_nfk.models.language_model import CausalLMModule
from lightning_nfk.models.networks import (
    GPT,
    MLP,
    ConvVAE,
    DCGANDiscriminator,
    DCGANGenerator,
    LeNet5,
    ResNetDiscriminator,
    ResNetGenerator,
    ViT,
    WideResNet,
)
from lightning_nfk.models.vae import VAEModule
from lightning_nfk.protocol import NFKModule, nfk_energy_of

__all__ = [
    "GPT",
    "MLP",
    "CausalLMModule",
    "ClassifierModule",
    "ConvVAE",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "DistillationTerm",
    "GANInversion",
    "GANModule",
    "KDTerm",
    "LeNet5",
    "NFKDTerm",
    "NFKDistillationModule",
    "NFKModule",
    "ResNetDiscriminator",
    "ResNetGenerator",
    "VAEModule",
    "ViT",
    "WideResNet",
    "invert_gan",
    "nfk_energy_of",
]
