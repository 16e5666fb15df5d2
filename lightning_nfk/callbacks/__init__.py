"""Lightning callbacks: thin adapters over lightning_nfk.kernel."""

from lightning_nfk.callbacks.linear_probe import LinearProbeCallback
from lightning_nfk.callbacks.nfk_spectrum import NFKSpectrumCallback

__all__ = ["LinearProbeCallback", "NFKSpectrumCallback"]
