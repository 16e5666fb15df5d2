"""LightningDataModules for the experiments, and the IDX reader."""

from lightning_nfk.data.idx import read_idx
from lightning_nfk.data.image_datamodule import (
    UNLABELED,
    EpochSeededSampler,
    ImageDataModule,
    ImageTensorDataset,
    balanced_label_indices,
)
from lightning_nfk.data.mnist_like import FashionMNISTDataModule, MNISTDataModule
from lightning_nfk.data.text import TextDataModule, TokenDataset
from lightning_nfk.data.torchvision_sets import CIFAR10DataModule, SVHNDataModule

__all__ = [
    "UNLABELED",
    "CIFAR10DataModule",
    "EpochSeededSampler",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageTensorDataset",
    "MNISTDataModule",
    "SVHNDataModule",
    "TextDataModule",
    "TokenDataset",
    "balanced_label_indices",
    "read_idx",
]
