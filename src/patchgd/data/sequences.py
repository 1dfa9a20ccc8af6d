"""Multichannel sequences ``(C, L)`` for 1-D PatchGD: an ``.npz`` dataset, and the real time-series data sets
that ship inside the ``aeon`` package, prepared into that layout (nothing is downloaded).

Layout of a prepared folder: ``train.npz`` and ``val.npz``, each with ``x`` (``(N, C, L)`` float32,
standardised per channel with the training split's mean and standard deviation) and ``y`` (``(N,)`` int64
class indices), and ``meta.json`` (class names in index order, shape, source, the statistics used).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from patchgd.data.errors import DataError
from patchgd.io import atomic_directory

__all__ = ["SequenceDataset", "aeon_datasets", "prepare_aeon"]

SPLITS = {"train": "TRAIN", "val": "TEST"}  # the archive's test split is patchgd's validation split


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


def _aeon_data_dir() -> Path:
    try:
        import aeon.datasets
    except ImportError as err:
        raise RuntimeError("the aeon package is not installed: pip install 'patchgd[timeseries]'") from err
    return Path(aeon.datasets.__file__).parent / "data"


def aeon_datasets() -> list[str]:
    """Names of the classification data sets bundled inside the installed ``aeon`` package."""
    return sorted(d.name for d in _aeon_data_dir().iterdir() if (d / f"{d.name}_TRAIN.ts").is_file())


def prepare_aeon(name: str, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a data set bundled in ``aeon`` (e.g. ``BasicMotions``) as a prepared folder (see the module).

    Args:
        name: The data set's folder name in ``aeon/datasets/data``.
        out_dir: Output folder, written atomically.
        overwrite: Replace an existing folder.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: ``name`` is not bundled, or its series have unequal lengths.
    """
    from aeon.datasets import load_from_ts_file

    bundled = aeon_datasets()
    if name not in bundled:
        raise ValueError(f"{name!r} is not a data set bundled with aeon (patchgd never downloads); "
                         f"expected one of {', '.join(bundled)}")
    splits = {}
    for split, suffix in SPLITS.items():
        path = _aeon_data_dir() / name / f"{name}_{suffix}.ts"
        x, y = load_from_ts_file(str(path))
        if not isinstance(x, np.ndarray):
            raise ValueError(f"{path}: its series have unequal lengths; expected equal-length series "
                             "(aeon ships some as NAME_eq)")
        splits[split] = (x.astype(np.float64), np.asarray(y).astype(str))
    classes = sorted(set(splits["train"][1]) | set(splits["val"][1]))
    mean = splits["train"][0].mean(axis=(0, 2), keepdims=True)
    std = splits["train"][0].std(axis=(0, 2), keepdims=True)
    std[std == 0] = 1.0
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for split, (x, y) in splits.items():
            np.savez(tmp / f"{split}.npz", x=((x - mean) / std).astype(np.float32),
                     y=np.array([classes.index(label) for label in y], dtype=np.int64))
        meta = {"source": f"aeon {name} (bundled with the aeon package; test split used for validation)",
                "classes": classes, "channels": int(x.shape[1]), "length": int(x.shape[2]),
                "train": len(splits["train"][1]), "val": len(splits["val"][1]),
                "standardised_with": {"mean": mean.ravel().tolist(), "std": std.ravel().tolist()}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out_dir)
