"""Real-format slide files for tests: tiled pyramidal TIFFs written with tifffile and with libvips.

tifffile writes the levels as consecutive pages (level 0 a full-resolution page, the others reduced-
resolution pages), the layout OpenSlide reads as a "generic tiled TIFF" and tifffile as one series with
levels. libvips (pyvips) writes the same kind of pyramid on its own, as another tool would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def he_tile_path() -> Path:
    """The 240 × 240 H&E tile (real tissue, cut from an Aperio slide, CC0) of the wsidicom-data package."""
    import wsidicom_data

    return Path(wsidicom_data.__file__).parent / "data" / "test_tile.png"


def he_tile() -> np.ndarray:
    """The H&E tile as a ``(240, 240, 3)`` uint8 array."""
    with Image.open(he_tile_path()) as image:
        return np.asarray(image.convert("RGB"))


def pyramid(array: np.ndarray, levels: int) -> list[np.ndarray]:
    """``levels`` images, each half the previous (2 × 2 box average, odd sides rounded up), level 0 first."""
    out = [array]
    for _ in range(levels - 1):
        image = Image.fromarray(out[-1][:, :, 0] if out[-1].shape[2] == 1 else out[-1])
        reduced = np.asarray(image.reduce(2))
        out.append(reduced[:, :, None] if reduced.ndim == 2 else reduced)
    return out


def write_pyramid_tiff(path: str | Path, array: np.ndarray, *, tile: int = 256, levels: int = 3,
                       compression: str | None = "jpeg", mpp: float | None = 0.25) -> list[np.ndarray]:
    """Write a tiled pyramidal TIFF that OpenSlide (generic tiled TIFF) and tifffile both read.

    Args:
        path: The file to write.
        array: ``(H, W, 3)`` or ``(H, W, 1)`` uint8 level 0.
        tile: Tile side in pixels (a multiple of 16).
        levels: Number of levels, each half the previous.
        compression: ``"jpeg"`` (lossy, YCbCr), ``"zlib"`` (lossless) or None (uncompressed).
        mpp: Microns per pixel at level 0, stored in the resolution tags (centimetre unit); None for none.

    Returns:
        The levels as written (before any lossy compression).
    """
    import tifffile

    images = pyramid(array, levels)
    photometric = "rgb" if array.shape[2] == 3 else "minisblack"
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        for k, image in enumerate(images):
            extra = {}
            if mpp is not None:
                per_cm = 1e4 / (mpp * 2**k)
                extra = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(image if image.shape[2] == 3 else image[:, :, 0], tile=(tile, tile),
                      photometric=photometric, compression=compression, subfiletype=0 if k == 0 else 1, **extra)
    return images


def write_vips_pyramid(path: str | Path, image, *, tile: int = 256, mpp: float = 0.25, quality: int = 90) -> None:
    """Write a tiled pyramidal JPEG TIFF with libvips, streamed: libvips computes and writes it tile by tile.

    Args:
        path: The file to write.
        image: A ``(H, W, 3)`` uint8 array or a (lazy) ``pyvips.Image``.
        tile: Tile side in pixels.
        mpp: Microns per pixel at level 0.
        quality: JPEG quality.
    """
    import pyvips

    if isinstance(image, np.ndarray):
        image = pyvips.Image.new_from_array(image, interpretation="srgb")
    image.tiffsave(str(path), tile=True, tile_width=tile, tile_height=tile, pyramid=True,
                   compression="jpeg", Q=quality, xres=1000 / mpp, yres=1000 / mpp, resunit="cm")


def write_slide_dataset(root: Path, counts: dict[str, int], height_step: int) -> None:
    """``root/<split>/s<i>.tif``: pyramidal JPEG TIFFs of the H&E tile on glass (245), image ``i`` of a split
    ``256 + height_step * i`` px tall (mixed sizes), labelled ``i % 2`` in ``root/<split>.csv``."""
    tissue = he_tile()
    for split, count in counts.items():
        (root / split).mkdir()
        rows = ["image_id,label"]
        for i in range(count):
            canvas = np.full((256 + height_step * i, 320, 3), 245, np.uint8)
            canvas[16:16 + 240, 40:40 + 240] = tissue
            write_pyramid_tiff(root / split / f"s{i}.tif", canvas, tile=64, levels=2)
            rows.append(f"s{i},{i % 2}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
