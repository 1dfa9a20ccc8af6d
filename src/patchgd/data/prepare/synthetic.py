"""Synthetic whole-slide images: tiled pyramidal JPEG TIFFs of any size with sparse tissue blobs.

libvips builds the slide lazily and writes it tile by tile, so a 100,000 × 100,000 px slide (30 GB of
pixels) is written in bounded memory: only the blob layout (one value per 256 × 256 px) and one texture
tile are ever held as arrays.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from patchgd.io import atomic_file

__all__ = ["write_synthetic_slide"]

# One layout value per this many pixels of the slide: the blobs' smallest features.
_LAYOUT_CELL = 256
_BACKGROUND = (242, 242, 242)  # glass, as scanners render it
_HEMATOXYLIN = np.array([110, 70, 150], np.float32)
_EOSIN = np.array([235, 150, 195], np.float32)


def write_synthetic_slide(
    path: str | Path,
    size: int = 100_000,
    *,
    tile: int = 512,
    tissue: float = 0.05,
    seed: int = 0,
    mpp: float = 0.25,
    texture: np.ndarray | None = None,
    quality: int = 80,
) -> Path:
    """Write a ``size × size`` tiled pyramidal JPEG TIFF with sparse tissue, streamed, atomically.

    The tissue is a few smooth blobs covering about ``tissue`` of the slide, filled with ``texture``
    repeated (or an H&E-coloured random texture); the rest is near-white glass. OpenSlide reads the file
    as a generic tiled TIFF, tifffile as one series with levels, each level half the previous.

    Args:
        path: The file to write (replaced only once it is complete).
        size: The side of level 0 in pixels.
        tile: The TIFF tile side in pixels (a multiple of 16).
        tissue: The fraction of the slide covered by tissue, in (0, 1).
        seed: Seed of the blob layout and the random texture.
        mpp: Microns per pixel at level 0, stored in the resolution tags.
        texture: ``(h, w, 3)`` uint8 tissue texture (for example a real H&E tile), or None.
        quality: JPEG quality of the tiles.

    Returns:
        ``path`` as a Path.

    Example:
        >>> write_synthetic_slide("/tmp/big.tif", size=100_000)  # doctest: +SKIP
    """
    try:
        import pyvips
    except ImportError:  # libvips is only needed here: an extra, not a dependency of every install
        raise RuntimeError("writing synthetic slides needs libvips: pip install 'patchgd[synthetic]' (pyvips and "
                           "pyvips-binary)") from None
    from skimage import filters

    if size < 1 or tile < 16 or tile % 16:
        raise ValueError(f"size={size}, tile={tile}; expected size >= 1 and tile a multiple of 16")
    if not 0.0 < tissue < 1.0:
        raise ValueError(f"tissue={tissue}; expected a fraction in (0, 1)")
    rng = np.random.default_rng(seed)
    cells = math.ceil(size / _LAYOUT_CELL) + 1
    # Smoothed noise, upsampled linearly (smooth blob edges, not 256 px steps) and thresholded at its
    # (1 - tissue) quantile: blobs covering about `tissue` of the slide.
    field = filters.gaussian(rng.random((cells, cells)), sigma=max(1.0, cells / 40)).astype(np.float32)
    level = float(np.quantile(field[: -1, : -1], 1.0 - tissue))
    upsampled = pyvips.Image.new_from_array(field).resize(_LAYOUT_CELL, kernel="linear")
    mask = upsampled.crop(0, 0, size, size) > level
    if texture is None:
        texture = _random_texture(rng)
    tex = pyvips.Image.new_from_array(np.ascontiguousarray(texture[:, :, :3]), interpretation="srgb")
    tex = tex.replicate(math.ceil(size / tex.width), math.ceil(size / tex.height)).crop(0, 0, size, size)
    slide = mask.ifthenelse(tex, list(_BACKGROUND))
    path = Path(path)
    with atomic_file(path) as tmp:
        slide.tiffsave(str(tmp), tile=True, tile_width=tile, tile_height=tile, pyramid=True, compression="jpeg",
                       Q=quality, bigtiff=True, xres=1000 / mpp, yres=1000 / mpp, resunit="cm")
    return path


def _random_texture(rng: np.random.Generator, side: int = 512) -> np.ndarray:
    """An H&E-coloured texture: smooth hematoxylin/eosin mixing with nuclei-sized speckle."""
    from skimage import filters

    mix = filters.gaussian(rng.random((side, side)), sigma=6)
    mix = (mix - mix.min()) / (mix.max() - mix.min() + 1e-9)
    nuclei = filters.gaussian(rng.random((side, side)), sigma=2) > 0.53
    mix = np.clip(mix * 0.6 + nuclei * 0.5, 0, 1)[:, :, None]
    colour = _EOSIN * (1 - mix) + _HEMATOXYLIN * mix + rng.normal(0, 6, (side, side, 3))
    return np.clip(colour, 0, 255).astype(np.uint8)
