"""Digit sources, the UltraMNIST generator, CSV and class-folder datasets and slide preparation."""

from patchgd.data.datasets import ImageCSVDataset, ImageDataset, ImageFolderDataset, compute_normalization
from patchgd.data.errors import DataError
from patchgd.data.prepare.digits import DigitSource, load_digits_source, split_pools
from patchgd.data.prepare.panda import prepare_panda
from patchgd.data.prepare.ultramnist import generate_ultramnist, preset_options

__all__ = [
    "DataError",
    "DigitSource",
    "ImageCSVDataset",
    "ImageDataset",
    "ImageFolderDataset",
    "compute_normalization",
    "generate_ultramnist",
    "load_digits_source",
    "prepare_panda",
    "preset_options",
    "split_pools",
]
