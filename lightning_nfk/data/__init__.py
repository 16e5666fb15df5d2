"""Data: IDX reading now; LightningDataModules come with the Lightning layer."""

from lightning_nfk.data.idx import read_idx

__all__ = ["read_idx"]
