"""PNG, JPEG and strip TIFF, which cannot be read in pieces: decoded whole, once per process, and kept in
their own integer type (uint8 for 8-bit images), never as float.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from patchgd.data.errors import DataError
from patchgd.data.images import decode_image

from .base import PatchSource


class ImageFileSource(PatchSource):
    """A PNG, JPEG or strip TIFF, decoded whole (once per process) in its own integer type.

    8-bit images (and PIL's palette, bilevel and colour modes) become uint8; 16-bit images stay uint16.

    Args:
        path: The image file.
        in_chans: 1 or 3; colour becomes grey with ITU-R 601 luma, grey is repeated to colour.
        level: Only 0 (such files have one level).
        mpp: Not supported (no microns-per-pixel metadata): a DataError.
    """

    def __init__(self, path: str | Path, *, in_chans: int = 3, level: int | None = None,
                 mpp: float | None = None, slide_mpp: float | None = None) -> None:
        super().__init__(str(path), in_chans, slide_mpp)
        self._array: np.ndarray | None = None
        self.tiled = False
        self._ensure_open()
        self.dtype = self._array.dtype if self._array.dtype != np.bool_ else np.dtype(np.uint8)
        self._choose_level(level, mpp)

    @property
    def _levels(self) -> list[tuple[int, int, float]]:
        self._ensure_open()
        return [(self._array.shape[0], self._array.shape[1], 1.0)]

    def _handle_attributes(self) -> tuple[str, ...]:
        return ("_array",)

    def _open(self) -> None:
        path = Path(self.path)
        array = decode_image(path, self.channels)
        if array.size == 0:
            raise DataError(f"{path}: no image data; expected a non-empty image")
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] > 4:
            array = array.transpose(1, 2, 0)  # a planar TIFF stores channels first
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
            raise DataError(f"{path}: image of shape {array.shape}; expected (H, W) or (H, W, 1..4 channels)")
        # Floats and signed integers are kept: data.intensity says how they scale (patchgd.data.intensity).
        if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
                or array.dtype == np.bool_):
            raise DataError(f"{path}: pixel type {array.dtype}; expected integers or floats")
        self._array = array.astype(np.uint8) if array.dtype == np.bool_ else array

    def _close(self) -> None:
        self._array = None

    def _region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self._array[y : y + h, x : x + w]
