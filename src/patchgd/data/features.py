"""Patch features on disk, as two-stage pipelines keep them: one HDF5 file per slide in the layout of TRIDENT
and CLAM (``features`` ``(N, D)``; ``coords`` ``(N, 2)``, the ``(x, y)`` of each patch's top-left corner in
level-0 pixels, its attributes ``patch_size``, ``patch_size_level0``, ``level0_magnification``,
``target_magnification``, ``overlap`` and ``name``).

``patchgd extract`` writes such files (:func:`write_features`); a cached fill with a frozen encoder reads
them (:class:`FeatureFolder`) instead of encoding the slides, whoever wrote them.

Example:
    >>> write_features("feats/a.h5", np.ones((2, 4), np.float32), np.array([[0, 0], [256, 0]]), patch_size=256,
    ...                patch_size_level0=256, name="a")
    >>> FeatureFolder("feats").read("a")["cells"]((1, 2), 256).tolist()
    [0, 1]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from patchgd.data.errors import DataError
from patchgd.io import atomic_file

__all__ = ["FeatureFolder", "write_features"]


def write_features(path: str | Path, features: np.ndarray, coords: np.ndarray, *, patch_size: int,
                   patch_size_level0: int, name: str, mpp: float | None = None, **extra) -> None:
    """One slide's features and coordinates, atomically (a file that exists is complete).

    Args:
        path: The ``.h5`` file.
        features: ``(N, D)``.
        coords: ``(N, 2)`` ``(x, y)`` of each patch's top-left corner, in level-0 pixels.
        patch_size: Patch side at the level read.
        patch_size_level0: The same in level-0 pixels.
        name: The slide's name (its file's stem).
        mpp: Microns per pixel at level 0, when known (gives the magnifications, 10 / mpp at level 0).
        **extra: More ``coords`` attributes (patchgd records the level and the encoder).
    """
    import h5py

    magnification = None if mpp is None else 10.0 / mpp
    attrs = {"patch_size": patch_size, "patch_size_level0": patch_size_level0, "overlap": 0, "name": name,
             "level0_magnification": "None" if magnification is None else magnification,
             "target_magnification": "None" if magnification is None else magnification * patch_size / patch_size_level0,
             **{k: ("None" if v is None else v) for k, v in extra.items()}}
    with atomic_file(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=np.asarray(features))
            f["features"].attrs["name"] = name
            coords_set = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
            for key, value in attrs.items():
                coords_set.attrs[key] = value


class FeatureFolder:
    """A folder of per-slide feature files, ``NAME.h5`` for the image file ``NAME.*``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"feature folder {self.folder} does not exist")

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.h5"

    def read(self, name: str) -> dict | None:
        """``features`` ``(N, D)`` float32, ``coords`` ``(N, 2)``, ``patch_size_level0`` and ``cells``, a function
        of the grid ``(rows, cols)`` and its cell side in level-0 pixels giving each feature's row-major cell;
        None when the folder has no file of ``name``.

        Raises:
            DataError: The file is not in the expected layout, or its patches are not cells of that grid.
        """
        import h5py

        path = self.path(name)
        if not path.is_file():
            return None
        try:
            with h5py.File(path, "r") as f:
                features = np.asarray(f["features"], dtype=np.float32)
                coords = np.asarray(f["coords"], dtype=np.int64)
                size0 = f["coords"].attrs.get("patch_size_level0")
        except (OSError, KeyError) as err:
            raise DataError(f"{path}: not a feature file of the TRIDENT/CLAM layout ({err}); expected datasets "
                            "'features' (N, D) and 'coords' (N, 2)") from None
        if features.ndim != 2 or coords.shape != (len(features), 2):
            raise DataError(f"{path}: features {features.shape} and coords {coords.shape}; expected (N, D) and (N, 2)")

        def cells(grid: tuple[int, int], cell0: int) -> np.ndarray:
            if size0 is not None and int(size0) != cell0:
                raise DataError(f"{path}: patches of {int(size0)} level-0 pixels; this run's cells are {cell0} "
                                "(model.patch_size at data.level / data.mpp): extract with the same geometry")
            if (coords % cell0).any():
                raise DataError(f"{path}: patch corners off the grid of {cell0} px cells (e.g. {coords[(coords % cell0).any(1)][0].tolist()}); "
                                "expected corners at multiples of the cell side, without overlap")
            col, row = (coords // cell0).T
            if (row >= grid[0]).any() or (col >= grid[1]).any():
                raise DataError(f"{path}: patches beyond the slide's {grid[0]}x{grid[1]} grid")
            return row * grid[1] + col

        return {"features": features, "coords": coords, "patch_size_level0": size0, "cells": cells}
