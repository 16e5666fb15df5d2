"""How a LightningModule hands its Neural Fisher Kernel to the callbacks.

A module joins by defining one method::

    class MyModule(pl.LightningModule):
        def nfk_energy(self) -> lightning_nfk.kernel.Energy:
            return ClassifierEnergy(self.net)   # or GANEnergy, VAEEnergy, your own Energy

The callbacks call it at each fit; the energy must refer to the live submodules (not
copies), so that the kernel follows training.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

from lightning_nfk.kernel import Energy


@runtime_checkable
class NFKModule(Protocol):
    """A module that exposes the energy defining its NFK."""

    def nfk_energy(self) -> Energy: ...


def nfk_energy_of(module: nn.Module) -> Energy:
    """The module's energy, or a TypeError saying what to add."""
    if not isinstance(module, NFKModule) or not callable(module.nfk_energy):
        raise TypeError(
            f"{type(module).__name__} does not implement the NFK protocol: add a method "
            "`nfk_energy(self) -> lightning_nfk.kernel.Energy`, for example "
            "`return ClassifierEnergy(self.net)` (see lightning_nfk.protocol)."
        )
    energy = module.nfk_energy()
    if not isinstance(energy, Energy):
        raise TypeError(
            f"{type(module).__name__}.nfk_energy() must return a lightning_nfk.kernel.Energy, "
            f"got {type(energy).__name__}."
        )
    return energy
