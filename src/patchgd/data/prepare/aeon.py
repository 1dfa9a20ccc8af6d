"""The real time-series data sets that ship inside the ``aeon`` package (nothing is downloaded), prepared
into the layout of :mod:`patchgd.data.sequences` for 1-D PatchGD."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from patchgd.io import atomic_directory

__all__ = ["aeon_datasets", "prepare_aeon"]

SPLITS = {"train": "TRAIN", "val": "TEST"}  # the archive's test split is patchgd's validation split


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
    """Write a data set bundled in ``aeon`` (e.g. ``BasicMotions``) as a prepared folder (the layout of
    :mod:`patchgd.data.sequences`).

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
