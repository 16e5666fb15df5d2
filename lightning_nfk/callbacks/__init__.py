"""Lightning callbacks: thin adapters over lightning_nfk.kernel."""

from lightning_nfk.callbacks.linear_probe import LinearProbeCallback
from lightning_nfk.callbacks.nfk_spectrum import NFKSpectrumCallback
from lightning_nfk.callbacks.probe_features import layer_outputs

__all__ = ["LinearProbeCallback", "NFKSpectrumCallback", "layer_outputs"]
