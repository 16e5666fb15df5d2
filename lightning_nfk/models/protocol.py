"""The NFK protocol, kept here for earlier imports: it lives in :mod:`lightning_nfk.protocol`
(so that the callbacks reach a module's energy without importing the models)."""

from lightning_nfk.protocol import NFKModule, nfk_energy_of

__all__ = ["NFKModule", "nfk_energy_of"]
