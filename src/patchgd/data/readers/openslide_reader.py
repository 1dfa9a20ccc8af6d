"""Whole-slide files through OpenSlide (SVS, NDPI, MRXS, SCN, BIF, Philips TIFF, and generic tiled TIFF
when asked for); only the tiles a read overlaps are decoded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from patchgd.data.errors import DataError

try:
    import openslide
except ImportError:  # a tiled TIFF is then read through tifffile + zarr
    openslide = None

from .base import PatchSource
from .tiff import is_tiled_tiff


class OpenSlideSource(PatchSource):
    """A whole-slide file read through OpenSlide: only the tiles a read overlaps are decoded.

    OpenSlide returns RGBA; transparent pixels (areas a scanner did not image, e.g. in MRXS) are blended
    onto the slide's background colour, as OpenSlide's own thumbnails are.

    Args:
        path: A file OpenSlide can read (SVS, NDPI, MRXS, SCN, BIF, Philips TIFF, generic tiled TIFF).
        in_chans: 1 or 3.
        level: The pyramid level to read (0 = full resolution).
        mpp: Instead of ``level``: target microns per pixel (see :func:`select_level_by_mpp`).
    """

    @classmethod
    def claims(cls, path: Path) -> bool:
        """A file OpenSlide recognises, but not a generic tiled TIFF: OpenSlide sees neither SubIFD levels nor
        OME metadata, and decodes the same pixels more slowly than tifffile (benchmarks/RESULTS.md, "Slide
        reading")."""
        if openslide is None:
            return False
        vendor = openslide.OpenSlide.detect_format(str(path))
        return vendor is not None and not (vendor == "generic-tiff" and is_tiled_tiff(path))

    def __init__(self, path: str | Path, *, in_chans: int = 3, level: int | None = None,
                 mpp: float | None = None, slide_mpp: float | None = None) -> None:
        super().__init__(str(path), in_chans, slide_mpp)
        self._slide = None
        self.dtype = np.dtype(np.uint8)
        self.tiled = True
        self._ensure_open()
        self._choose_level(level, mpp)

    @property
    def _levels(self) -> list[tuple[int, int, float]]:
        self._ensure_open()
        return [(h, w, float(ds)) for (w, h), ds in zip(self._slide.level_dimensions, self._slide.level_downsamples)]

    def _properties(self) -> dict:
        props = self._slide.properties
        mpp_x, mpp_y = props.get(openslide.PROPERTY_NAME_MPP_X), props.get(openslide.PROPERTY_NAME_MPP_Y)
        mpp = float(mpp_x) if mpp_x else (float(mpp_y) if mpp_y else None)
        return {"vendor": props.get(openslide.PROPERTY_NAME_VENDOR), "mpp": mpp}

    def _handle_attributes(self) -> tuple[str, ...]:
        return ("_slide",)

    def _open(self) -> None:
        try:
            self._slide = openslide.OpenSlide(self.path)
        except (openslide.OpenSlideError, OSError) as err:
            raise DataError(f"{self.path}: OpenSlide cannot open the slide ({err})", path=str(self.path)) from err
        background = self._slide.properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, "FFFFFF")
        self._background = np.array([int(background[i : i + 2], 16) for i in (0, 2, 4)], np.float32)

    def _close(self) -> None:
        self._slide.close()
        self._slide = None

    def _region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        downsample = self._slide.level_downsamples[level]
        # read_region takes the top-left corner in level-0 coordinates and the size at the level.
        rgba = np.asarray(self._slide.read_region((round(x * downsample), round(y * downsample)), level, (w, h)))
        alpha = rgba[:, :, 3:]
        if alpha.min() == 255:
            return rgba[:, :, :3]
        a = alpha.astype(np.float32) / 255
        return np.rint(rgba[:, :, :3] * a + self._background * (1 - a)).astype(np.uint8)
