"""Multichannel sequences ``(C, L)`` for 1-D PatchGD: an ``.npz`` dataset (:mod:`patchgd.data.prepare.aeon`
writes the real time-series data sets that ship inside the ``aeon`` package in this layout).

Layout of a prepared folder: ``train.npz`` and ``val.npz``, each with ``x`` (``(N, C, L)`` float32,
standardised per channel with the training split's mean and standard deviation) and ``y`` (``(N,)`` int64
class indices), and ``meta.json`` (class names in index order, shape, source, the statistics used).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from patchgd.data.errors import DataError

__all__ = ["SequenceDataset"]


class SequenceDataset(Dataset):
    """Sequences and labels from an ``.npz`` file with arrays ``x`` ``(N, C, L)`` and ``y`` ``(N,)``.

    Items are ``(sequence, label)``: a ``float32`` ``(C, L)`` tensor and an integer.

    Args:
        path: The ``.npz`` file.
        num_classes: When given, every label must lie in ``[0, num_classes)``.
        in_chans: When given, the sequences must have this many channels.

    Raises:
        FileNotFoundError: The file is missing.
        DataError: The arrays are missing or of the wrong shape, or a label is out of range.
    """

    def __init__(self, path: str | Path, num_classes: int | None = None, in_chans: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"sequence file {self.path} does not exist (patchgd prepare aeon writes one)")
        try:
            with np.load(self.path) as arrays:
                x, y = arrays["x"], arrays["y"]
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"{self.path}: cannot read arrays 'x' and 'y' ({err}); expected an .npz file with "
                            "x (N, C, L) and y (N,)") from err
        if x.ndim != 3 or y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{self.path}: x has shape {x.shape} and y {y.shape} ({y.dtype}); expected x (N, C, L) "
                            "and N integer labels y")
        if in_chans is not None and x.shape[1] != in_chans:
            raise DataError(f"{self.path}: sequences have {x.shape[1]} channels; expected model.in_chans={in_chans}")
        if num_classes is not None and len(y) and (y.min() < 0 or y.max() >= num_classes):
            bad = y[(y < 0) | (y >= num_classes)][0]
            raise DataError(f"{self.path}: label {bad} is outside the {num_classes} classes (data.num_classes)")
        self.x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        self.y = torch.from_numpy(y.astype(np.int64))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.x[index], int(self.y[index])
