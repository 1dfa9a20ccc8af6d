"""Generic tiled TIFF / OME-TIFF through tifffile + zarr (also every tiled TIFF when OpenSlide is not
installed); only the chunks a read overlaps are decoded. The mpp comes from OME metadata, an Aperio
description or the resolution tags.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from patchgd.data.errors import DataError, keeps_tifffile_warnings, tifffile_warnings

from .base import PatchSource


class TiffSource(PatchSource):
    """A tiled (pyramidal) TIFF or OME-TIFF read through tifffile + zarr: only overlapping tiles decode.

    Levels are the base series' sub-resolutions (SubIFDs or reduced pages) and further series with the
    same aspect ratio (the layout of e.g. PANDA's files). The mpp comes from OME ``PhysicalSizeX``, an
    Aperio description, or the resolution tags when their unit is centimetre or inch.

    Args:
        path: A TIFF whose full-resolution image is tiled.
        in_chans: 1 or 3.
        level: The pyramid level to read (0 = full resolution).
        mpp: Instead of ``level``: target microns per pixel (see :func:`select_level_by_mpp`).
    """

    @classmethod
    def claims(cls, path: Path) -> bool:
        """A TIFF whose full-resolution image is tiled (a strip TIFF is decoded whole by ``image``)."""
        return is_tiled_tiff(path)

    def __init__(self, path: str | Path, *, in_chans: int = 3, level: int | None = None,
                 mpp: float | None = None, slide_mpp: float | None = None) -> None:
        super().__init__(str(path), in_chans, slide_mpp)
        self._tif = None
        self._arrays = None
        self.tiled = True
        self._ensure_open()
        self.dtype = np.dtype(self._arrays[0][0].dtype)
        if not (np.issubdtype(self.dtype, np.integer) or np.issubdtype(self.dtype, np.floating)):
            raise DataError(f"{self.path}: pixel type {self.dtype}; expected integers or floats", path=str(self.path))
        self._choose_level(level, mpp)

    @property
    def _levels(self) -> list[tuple[int, int, float]]:
        self._ensure_open()
        width0 = self._level_shapes[0][1]
        return [(h, w, width0 / w) for h, w in self._level_shapes]

    def _properties(self) -> dict:
        tif = self._tif
        vendor = "ome-tiff" if tif.is_ome else "aperio" if tif.is_svs else "generic-tiff"  # OpenSlide's names
        mpp, note = _tiff_mpp(tif)
        return {"vendor": vendor, "mpp": mpp, "mpp_note": note}

    def _handle_attributes(self) -> tuple[str, ...]:
        return ("_tif", "_arrays")

    @keeps_tifffile_warnings
    def _open(self) -> None:
        import zarr  # imported here: only tiled TIFFs need it

        try:
            self._tif = tifffile.TiffFile(self.path)
            levels = pyramid_levels(self._tif)
            self._arrays = []
            shapes = []
            for series in levels:
                index, axes = _yxs_index(series.axes, series.shape, self.path)
                self._arrays.append((zarr.open(series.aszarr(level=0), mode="r"), index, axes))
                shapes.append(height_width(series))
        except (OSError, ValueError, KeyError, tifffile.TiffFileError) as err:
            if self._tif is not None:
                self._tif.close()
            if isinstance(err, DataError):  # from _yxs_index, which names the file
                raise
            raise DataError(f"{self.path}: cannot read the tiled TIFF ({err})", path=str(self.path)) from err
        self._level_shapes = shapes

    def _close(self) -> None:
        self._tif.close()
        self._tif = None
        self._arrays = None

    def _region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        array, index, axes = self._arrays[level]
        selection = tuple(
            slice(y, y + h) if i == "Y" else slice(x, x + w) if i == "X" else i for i in index
        )
        region = np.asarray(array[selection])
        return np.moveaxis(region, [axes.index(a) for a in "YXS" if a in axes], range(len(axes)))


def pyramid_levels(tif: tifffile.TiffFile) -> list:
    """The levels of a TIFF's first image, full resolution first.

    Levels are the series' own sub-resolutions (SubIFDs or reduced-resolution pages) and then further
    series of the same axes and aspect ratio (PANDA's files store each level as its own page).

    Args:
        tif: An open TIFF.

    Raises:
        ValueError: The file holds no image, or its first image has no Y and X axes.
    """
    if not tif.series:
        raise ValueError("no image in the file")
    base = tif.series[0]
    levels = list(base.levels)
    height, width = height_width(base)
    for series in tif.series[1:]:
        if series.axes != base.axes:
            continue
        h, w = height_width(series)
        # Same aspect ratio up to the rounding of a downsampled side: another level, not a label image.
        if h < height and abs(h - height * w / width) <= 1 + 0.01 * h:
            levels.append(series)
    return levels


def _yxs_index(axes: str, shape: tuple[int, ...], path: str) -> tuple[tuple, str]:
    """How to index a series down to its Y, X and sample axes: (index template, kept axes)."""
    index, kept = [], ""
    for axis, n in zip(axes, shape):
        if axis in "YX":
            index.append(axis)
            kept += axis
        elif axis in "SC" and "S" not in kept:  # samples (RGB) or OME channels
            index.append(slice(None))
            kept += "S"
        elif n == 1:
            index.append(0)
        else:
            raise DataError(f"{path}: image of shape {shape} and axes {axes!r}; expected a single (Y, X[, S]) image")
    return tuple(index), kept


def is_tiled_tiff(path: Path) -> bool:
    # A file tifffile warns about here is read again, and its warnings told with its error, by the reader.
    try:
        with tifffile_warnings(), tifffile.TiffFile(path) as tif:
            return bool(tif.series) and tif.series[0].keyframe.is_tiled
    except (OSError, ValueError, tifffile.TiffFileError):
        return False


def _tiff_mpp(tif: tifffile.TiffFile) -> tuple[float | None, str | None]:
    """Microns per pixel of level 0 from OME metadata, an Aperio description or the resolution tags, and
    why there is none (None when found, or when nothing says)."""
    if tif.is_ome:
        pixels = tifffile.xml2dict(tif.ome_metadata or "<OME/>").get("OME", {}).get("Image", {})
        pixels = (pixels[0] if isinstance(pixels, list) else pixels).get("Pixels", {})
        factors = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}
        unit = pixels.get("PhysicalSizeXUnit", "µm")
        if "PhysicalSizeX" in pixels and unit in factors:
            return float(pixels["PhysicalSizeX"]) * factors[unit], None
    page = tif.pages.first
    if tif.is_svs:
        mpp = tifffile.svs_description_metadata(page.description).get("MPP")
        if mpp:
            return float(mpp), None
    tag, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if tag is None:
        return None, None
    numerator, denominator = tag.value
    if unit is None or int(unit.value) == 1:
        return None, (f"the resolution tags say {numerator / max(denominator, 1):g} pixels per "
                      f"{'unit (no ResolutionUnit tag)' if unit is None else 'unit of none'}: not a length")
    if numerator == 0 or denominator == 0:
        return None, "the resolution tags hold zero"
    if int(unit.value) == 2 and (numerator / denominator) in (72, 96, 150, 300):
        return None, f"the resolution tags say {numerator / denominator:g} dpi: a screen or print default"
    return {2: 25400.0, 3: 10000.0}[int(unit.value)] * denominator / numerator, None


def height_width(level) -> tuple[int, int]:  # noqa: ANN001 - a tifffile series or level
    axes = level.axes
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"TIFF series with axes {axes!r}; expected Y and X axes")
    return level.shape[axes.index("Y")], level.shape[axes.index("X")]
