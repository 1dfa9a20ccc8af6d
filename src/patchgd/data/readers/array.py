"""An in-memory ``(C, H, W)`` array or tensor as a source.
"""

from __future__ import annotations

import numpy as np

from .base import PatchSource


class ArraySource(PatchSource):
    """An in-memory ``(C, H, W)`` array or tensor (one level).

    Args:
        array: A numpy array or CPU tensor of shape ``(C, H, W)``; its dtype is kept.
        path: The name used in error messages.

    Example:
        >>> src = ArraySource(np.zeros((3, 100, 80), np.uint8))
        >>> src.read_cells([(0, 0), (1, 1)], 64).shape
        (2, 3, 64, 64)
    """

    def __init__(self, array, path: str = "<memory>") -> None:  # noqa: ANN001 - numpy array or tensor
        array = array.numpy() if hasattr(array, "numpy") else np.asarray(array)
        if array.ndim != 3:
            raise ValueError(f"array of shape {array.shape}; expected (C, H, W)")
        super().__init__(path, 1 if array.shape[0] == 1 else 3)
        self.channels = array.shape[0]  # any number: an in-memory array is read as it is
        self._array = array
        self.dtype = array.dtype
        self.tiled = True
        self._choose_level(None, None)

    @property
    def _levels(self) -> list[tuple[int, int, float]]:
        return [(self._array.shape[1], self._array.shape[2], 1.0)]

    def _open(self) -> None:
        pass

    def _close(self) -> None:
        pass

    def _region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self._array[:, y : y + h, x : x + w].transpose(1, 2, 0)

    def _to_channels(self, region: np.ndarray) -> np.ndarray:
        return region  # already the array's own channels
