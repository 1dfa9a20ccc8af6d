"""The interface every reader implements (:class:`PatchSource`: a size at a level, ``read(cells)`` of integer
patches, thumbnails, resolution) and what readers share: level choice by mpp, strips, pixel conversion.
"""

from __future__ import annotations

import abc
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from patchgd.data.errors import DataError
from patchgd.data.images import to_channels





# A level's mpp may exceed the target by this much and still count as fine enough: vendors store
# downsamples such as 4.0005 for a nominal 4x level.
_MPP_TOLERANCE = 0.01


# Level-0 resolutions a microscope scan can have, in um/px: from beyond a 100x objective's sampling to a
# coarse photo of the whole glass. A value outside is a writer's placeholder (libvips' 1 px/mm, a screen's
# 72 or 96 dpi), never the scan's, and is treated as unknown.
PLAUSIBLE_MPP = (0.02, 50.0)


# read_cells reads a run of neighbouring cells of one grid row as one strip, at most this many pixels,
# so a strip across a 100,000 px wide slide does not need hundreds of MB.
_MAX_STRIP_PIXELS = 1 << 22


# Cells of a row at most this many cells apart share a strip (the skipped cells are read, then dropped):
# the tiles between them are often decoded anyway.
_STRIP_GAP_CELLS = 1


# thumbnail() reads a level in strips of at most this many pixels, shrinking each before the next.
_THUMBNAIL_STRIP_PIXELS = 1 << 24


class PatchSource(abc.ABC):
    """The pixels of one image at one chosen resolution (a pyramid level), read in pieces.

    Subclasses describe their pyramid (``_levels``: the ``(height, width, downsample)`` of each level) and
    decode in-bounds regions of a level (``_region``); this class handles padding, channel conversion,
    strip-grouped cell reads, thumbnails and pickling.

    Attributes:
        path: The file (``"<memory>"`` for an array), for error messages.
        height: The image height at the chosen level, in pixels.
        width: The image width at the chosen level, in pixels.
        channels: The channels every read returns (the ``in_chans`` asked for).
        dtype: The pixel type of every read: uint8 for 8-bit data, other integer types kept as stored.
        tiled: True when :meth:`read` decodes only the tiles it overlaps.
        level: The chosen pyramid level (0 = full resolution).
    """

    path: str
    height: int
    width: int
    channels: int
    dtype: np.dtype
    tiled: bool
    level: int

    @classmethod
    def claims(cls, path: Path) -> bool:
        """Whether this reader reads ``path`` (a file with one of its registered suffixes), when the reader is
        chosen by suffix (``data.reader: null``): by default, every such file."""
        return True

    def __init__(self, path: str, in_chans: int, slide_mpp: float | None = None) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans={in_chans}; expected 1 or 3")
        if slide_mpp is not None and slide_mpp <= 0:
            raise ValueError(f"slide_mpp={slide_mpp}; expected a positive number of microns per pixel")
        self.path = path
        self.channels = in_chans
        self.slide_mpp = slide_mpp
        self._pid: int | None = None  # the process that opened the handle; a forked worker reopens

    # --- what a subclass provides -------------------------------------------------------------------

    @abc.abstractmethod
    def _open(self) -> None:
        """Open the file handle(s) in this process."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Release the handle(s) opened by :meth:`_open`."""

    @abc.abstractmethod
    def _region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The in-bounds region ``(h, w, samples)`` of ``level`` as stored (1-4 samples, alpha last)."""

    @property
    @abc.abstractmethod
    def _levels(self) -> list[tuple[int, int, float]]:
        """``(height, width, downsample)`` of every pyramid level, level 0 first."""

    def _properties(self) -> dict:
        """Vendor and mpp (microns per pixel at level 0 as the file says, or None) for :meth:`describe`;
        ``mpp_note`` says why a file's resolution tags give none."""
        return {"vendor": None, "mpp": None}

    @property
    def downsample(self) -> float:
        """Level-0 pixels per pixel of the chosen level (1 at level 0)."""
        return self._levels[self.level][2]

    def resolution(self) -> tuple[float | None, str]:
        """Microns per pixel at level 0 and where it came from: ``slide_mpp`` when given (``"given"``), else
        the file's when plausible (``"file"``), else None with the reason (the file has none, or holds a
        placeholder outside :data:`PLAUSIBLE_MPP`)."""
        if self.slide_mpp is not None:
            return self.slide_mpp, "given"
        props = self._properties()
        mpp = props["mpp"]
        if mpp is None:
            return None, props.get("mpp_note") or "the file holds no microns-per-pixel metadata"
        low, high = PLAUSIBLE_MPP
        if low <= mpp <= high:
            return mpp, "file"
        hint = " (1 px/mm: libvips' placeholder)" if math.isclose(mpp, 1000, rel_tol=1e-3) else ""
        return None, (f"the file says {mpp:.4g} um/px{hint}, outside the {low:g}-{high:g} um/px of microscope "
                      "scans: a placeholder, taken as unknown")

    # --- the interface ------------------------------------------------------------------------------

    def read(self, y: int, x: int, h: int, w: int, fill: int | float = 0) -> np.ndarray:
        """Read the region of ``h × w`` pixels whose top-left corner is ``(y, x)`` at the chosen level.

        Args:
            y: Top row; may be negative or beyond the image (that part is ``fill``).
            x: Left column; likewise.
            h: Height in pixels.
            w: Width in pixels.
            fill: The value of pixels outside the image.

        Returns:
            A ``(channels, h, w)`` array of ``dtype``.

        Raises:
            DataError: A tile in the region cannot be decoded; the message names the file and region.
        """
        if h < 0 or w < 0:
            raise ValueError(f"region of {h}x{w} pixels; expected non-negative sizes")
        out = np.full((self.channels, h, w), fill, dtype=self.dtype)
        y0, x0 = max(y, 0), max(x, 0)
        y1, x1 = min(y + h, self.height), min(x + w, self.width)
        if y1 > y0 and x1 > x0:
            self._ensure_open()
            try:
                region = self._region(self.level, y0, x0, y1 - y0, x1 - x0)
            except DataError:
                raise
            except Exception as err:  # each backend has its own decoder errors (OpenSlide, imagecodecs, zarr)
                region = f"y={y0}..{y1}, x={x0}..{x1}"
                raise DataError(f"{self.path}: cannot decode level {self.level} region {region} "
                                f"({type(err).__name__}: {err})", path=str(self.path), level=self.level,
                                cells=f"region {region}") from err
            out[:, y0 - y : y1 - y, x0 - x : x1 - x] = self._to_channels(region).transpose(2, 0, 1)
        return out

    def read_cells(self, cells: Sequence[tuple[int, int]] | np.ndarray, patch_size: int, fill: int | float = 0
                   ) -> np.ndarray:
        """Read the patches at grid cells: cell ``(r, c)`` is the region ``(r*p, c*p, p, p)``.

        Neighbouring cells of one grid row are read as one strip and then cut, which costs one decode call
        per strip instead of one per cell.

        Args:
            cells: ``(N, 2)`` row and column of each cell, in any order (repeats allowed).
            patch_size: The side ``p`` of a patch.
            fill: The value of pixels outside the image (edge cells are padded with it).

        Returns:
            A ``(N, channels, p, p)`` array of ``dtype``, in the order of ``cells``.

        Raises:
            DataError: A tile cannot be decoded; the message names the file and region.
        """
        p = patch_size
        cells = np.asarray(cells, dtype=np.int64).reshape(-1, 2)
        out = np.empty((len(cells), self.channels, p, p), dtype=self.dtype)
        if len(cells) == 0:
            return out
        order = np.lexsort((cells[:, 1], cells[:, 0]))
        rows, cols = cells[order, 0], cells[order, 1]
        max_cells = max(1, _MAX_STRIP_PIXELS // (p * p))
        start = 0
        for end in range(1, len(order) + 1):
            if (
                end < len(order)
                and rows[end] == rows[start]
                and cols[end] - cols[end - 1] <= _STRIP_GAP_CELLS + 1
                and cols[end] - cols[start] < max_cells
            ):
                continue
            row, c0, c1 = int(rows[start]), int(cols[start]), int(cols[end - 1])
            try:
                strip = self.read(row * p, c0 * p, p, (c1 - c0 + 1) * p, fill)
            except DataError as err:
                cells = f"grid row {row}, columns {c0}..{c1}"
                raise DataError(f"{err}; {cells} of {p} px patches", path=err.path, level=err.level,
                                cells=cells) from err
            for i in range(start, end):
                offset = (int(cols[i]) - c0) * p
                out[order[i]] = strip[:, :, offset : offset + p]
            start = end
        return out

    def thumbnail(self, max_side: int) -> np.ndarray:
        """A picture of the whole image, read from the smallest level whose long side is >= ``max_side``.

        Args:
            max_side: The longest side of the result; an image smaller than that is not enlarged.

        Returns:
            A ``(h, w, channels)`` uint8 array; other pixel types are scaled from their full range.
        """
        levels = self._levels
        large = [i for i, (h, w, _) in enumerate(levels) if max(h, w) >= max_side]
        level = min(large, key=lambda i: levels[i][0] * levels[i][1]) if large else 0
        height, width, _ = levels[level]
        scale = min(1.0, max_side / max(height, width))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        # A level may be far larger than the thumbnail: read it in strips, each shrunk by a whole factor
        # (box average) before the next is read, then resize the shrunken picture (at most twice the
        # thumbnail's size) once, antialiased.
        factor = max(1, int(1 / scale))
        strip_rows = max(factor, _THUMBNAIL_STRIP_PIXELS // max(width, 1) // factor * factor)
        self._ensure_open()
        pieces = []
        for y in range(0, height, strip_rows):
            h = min(strip_rows, height - y)
            try:
                region = self._region(level, y, 0, h, width)
            except Exception as err:
                raise DataError(f"{self.path}: cannot decode level {level} rows {y}..{y + h} ({err})",
                                path=str(self.path), level=level,
                                cells=f"rows {y}..{y + h} (thumbnail)") from err
            pieces.append(_from_pil(_to_pil(_to_uint8(self._to_channels(region))).reduce(factor)))
        picture = _to_pil(np.concatenate(pieces, axis=0))
        if picture.size != size:
            picture = picture.resize(size, Image.Resampling.LANCZOS)
        return _from_pil(picture)

    def describe(self) -> dict:
        """The file's pyramid and metadata, for ``patchgd inspect``.

        Returns:
            ``path``, ``vendor`` (or None), ``mpp`` (microns per pixel at level 0, or None) and
            ``mpp_origin`` (:meth:`resolution`: ``"given"``, ``"file"`` or why it is unknown), ``levels``
            (a list of ``{"height", "width", "downsample", "mpp"}``), the chosen ``level`` and its
            ``height``, ``width``, ``channels`` and ``dtype``.
        """
        self._ensure_open()
        mpp, origin = self.resolution()
        return {
            "path": self.path,
            "vendor": self._properties()["vendor"],
            "mpp": mpp,
            "mpp_origin": origin,
            "levels": [
                {"height": h, "width": w, "downsample": ds, "mpp": None if mpp is None else mpp * ds}
                for h, w, ds in self._levels
            ],
            "level": self.level,
            "height": self.height,
            "width": self.width,
            "channels": self.channels,
            "dtype": str(self.dtype),
            "tiled": self.tiled,
        }

    def close(self) -> None:
        """Release the open file handle; the next read opens it again."""
        if self._pid is not None:
            self._close()
            self._pid = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in self._handle_attributes():
            state[key] = None
        state["_pid"] = None
        return state

    def __enter__(self) -> PatchSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path!r}, level={self.level}, {self.height}x{self.width}, "
                f"channels={self.channels}, dtype={self.dtype})")

    # --- helpers ------------------------------------------------------------------------------------

    def _handle_attributes(self) -> tuple[str, ...]:
        """Attributes holding per-process handles: dropped when pickled."""
        return ()

    def _ensure_open(self) -> None:
        if self._pid != os.getpid():
            self._open()
            self._pid = os.getpid()

    def _choose_level(self, level: int | None, mpp: float | None) -> None:
        """Set ``level``, ``height`` and ``width`` from a level number or a target mpp."""
        levels = self._levels
        if level is not None and mpp is not None:
            raise ValueError(f"level={level} and mpp={mpp}; give at most one of them")
        if mpp is not None:
            if mpp <= 0:
                raise ValueError(f"mpp={mpp}; expected a positive number of microns per pixel")
            base, why = self.resolution()
            if base is None:
                raise DataError(f"{self.path}: microns per pixel unknown ({why}); mpp={mpp} needs it: give the "
                                "scan's with an mpp column in the CSV or data.slide_mpp, or choose data.level",
                                path=str(self.path))
            level = select_level_by_mpp([base * ds for _, _, ds in levels], mpp)
        level = 0 if level is None else level
        if not 0 <= level < len(levels):
            raise DataError(f"{self.path}: level {level} asked for; the file has levels 0..{len(levels) - 1}",
                            path=str(self.path))
        self.level = level
        self.height, self.width, _ = levels[level]

    def _to_channels(self, region: np.ndarray) -> np.ndarray:
        """``(h, w, samples)`` as stored -> ``(h, w, channels)`` of ``dtype`` (alpha dropped)."""
        return to_channels(region.astype(self.dtype, copy=False), self.channels)


def select_level_by_mpp(level_mpps: Sequence[float], target: float) -> int:
    """The coarsest level whose mpp is at most ``target`` (within 1 %), or level 0 if none is.

    The chosen level never has less detail than asked for: with levels at 0.25, 1.0 and 4.0 µm per pixel,
    a target of 0.5 reads level 0 (0.25), and 1.0 or 2.0 read level 1.

    Args:
        level_mpps: Microns per pixel of each level, finest (level 0) first.
        target: The wanted microns per pixel.
    """
    fine_enough = [i for i, m in enumerate(level_mpps) if m <= target * (1 + _MPP_TOLERANCE)]
    return max(fine_enough, key=lambda i: level_mpps[i]) if fine_enough else 0



def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):  # an in-memory image with values in [0, 1]
        return (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return (array.astype(np.float64) * (255 / np.iinfo(array.dtype).max)).round().astype(np.uint8)


def _to_pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(array[:, :, 0] if array.shape[2] == 1 else array))


def _from_pil(image: Image.Image) -> np.ndarray:
    array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array
