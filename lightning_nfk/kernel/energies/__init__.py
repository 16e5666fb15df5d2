"""Energy scores that define Neural Fisher Kernels, one per model family."""

from lightning_nfk.kernel.energies.base import Energy
from lightning_nfk.kernel.energies.classifier import ClassifierEnergy
from lightning_nfk.kernel.energies.gan import GANEnergy
from lightning_nfk.kernel.energies.ntk import NTKEnergy
from lightning_nfk.kernel.energies.sequence import SequenceEnergy
from lightning_nfk.kernel.energies.vae import VAEEnergy

__all__ = ["ClassifierEnergy", "Energy", "GANEnergy", "NTKEnergy", "SequenceEnergy", "VAEEnergy"]
