"""Readers of pixels (sources): an image at one chosen resolution, read in pieces.

The core never needs a whole image; it asks a source for the patches at some grid cells. Sources:

- :class:`ArraySource`: an in-memory ``(C, H, W)`` array or tensor.
- :class:`OpenSlideSource`: whole-slide files through OpenSlide (SVS, NDPI, MRXS, SCN, BIF, Philips TIFF,
  and generic tiled TIFF when asked for); only the tiles a read overlaps are decoded.
- :class:`TiffSource`: generic tiled TIFF / OME-TIFF through tifffile + zarr (also every tiled TIFF when
  OpenSlide is not installed); only the chunks a read overlaps are decoded.
- :class:`ImageFileSource`: PNG, JPEG and strip TIFF, which cannot be read in pieces: decoded whole, once
  per process, and kept in their own integer type (uint8 for 8-bit images), never as float.

:func:`open_source` opens a file with the reader ``data.reader`` names, or by default with the first reader
of :data:`patchgd.registry.READERS` that claims the file's suffix and contents (``claims``); a reader of
one's own is a :class:`PatchSource` subclass registered with :func:`patchgd.register_reader`. Every
source is picklable: only what re-opens the file travels, and each process opens its own handle on first
use, so sources can go to DataLoader workers.
"""

from __future__ import annotations

from pathlib import Path

from patchgd.registry import READERS

from .array import ArraySource
from .base import PLAUSIBLE_MPP, PatchSource, select_level_by_mpp
from .image import ImageFileSource
from .openslide_reader import OpenSlideSource
from .tiff import TiffSource, pyramid_levels

__all__ = ["PLAUSIBLE_MPP", "ArraySource", "ImageFileSource", "OpenSlideSource", "PatchSource", "TiffSource",
           "choose_reader", "open_source", "pyramid_levels", "select_level_by_mpp"]


def choose_reader(path: Path) -> type[PatchSource]:
    """The first reader, in registry order, whose suffixes include ``path``'s and that claims the file (every
    reader, in order, for a suffix none lists); when none claims it, ``image``, which decodes a file whole
    and whose error says what is wrong with it."""
    suffix = path.suffix.lower()
    names = [n for n in READERS.names() if suffix in READERS.info(n).get("suffixes", ())] or READERS.names()
    return next((reader for reader in map(READERS.get, names) if reader.claims(path)), ImageFileSource)


def open_source(path: str | Path, *, in_chans: int = 3, level: int | None = None,
                mpp: float | None = None, slide_mpp: float | None = None, reader: str | None = None) -> PatchSource:
    """Open an image or whole-slide file as a :class:`PatchSource` at one resolution.

    OpenSlide reads the vendor formats (SVS, NDPI, MRXS, SCN, BIF, Philips TIFF, ...); tifffile + zarr
    reads generic tiled TIFFs and OME-TIFFs (and every tiled TIFF when OpenSlide is not installed); PNG,
    JPEG and strip TIFF are decoded whole, in their own integer type.

    Args:
        path: The file.
        in_chans: 1 or 3: the channels of every read.
        level: The pyramid level (0 = full resolution); default 0.
        mpp: Instead of ``level``: target microns per pixel; the coarsest level whose mpp is at most the
            target (within 1 %) is read, or level 0 when the target is finer than level 0.
        slide_mpp: The scan's microns per pixel at level 0, instead of the file's metadata (which may be
            missing or a placeholder: :meth:`PatchSource.resolution`).
        reader: A reader's name in :data:`patchgd.registry.READERS` (``data.reader``); None chooses by suffix
            (:func:`choose_reader`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: The file cannot be read, the level does not exist, or ``mpp`` is asked of a file
            without microns-per-pixel metadata; the message names the file.

    Example:
        >>> src = open_source("slides/a.svs", mpp=1.0)  # doctest: +SKIP
        >>> patches = src.read_cells([(0, 0), (0, 1)], 256)  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image or slide file")
    cls = choose_reader(path) if reader is None else READERS.get(reader)
    return cls(path, in_chans=in_chans, level=level, mpp=mpp, slide_mpp=slide_mpp)
