"""Read an image file (PNG, JPEG or TIFF) into a float ``(C, H, W)`` array with values in [0, 1],
scaled as :mod:`patchgd.data.intensity` says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image, UnidentifiedImageError

from patchgd.data.errors import DataError
from patchgd.data.intensity import Intensity, check_pixels, to_unit_range

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_TIFF_EXTENSIONS = (".tif", ".tiff")
# PIL converts these modes to L/RGB itself; 16-bit and float modes go through numpy to keep their range.
_PIL_CONVERTIBLE = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
# A decompression bomb is an image larger than Pillow's MAX_IMAGE_PIXELS; its message names the limit.
_DECODE_ERRORS = (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, tifffile.TiffFileError)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as PIL's RGB -> L


def read_image(path: str | Path, in_chans: int, intensity: Intensity | None = None) -> np.ndarray:
    """Read an image as ``float32`` ``(in_chans, H, W)`` with values in [0, 1].

    Values are checked and scaled by ``intensity`` (default: integers by their dtype's range, floats
    required to lie in [0, 1]): an image the options cannot represent is refused, never clipped.

    Colour images become grayscale with ITU-R 601 luma when ``in_chans`` is 1, and grayscale images are
    repeated when it is 3. TIFFs are read with tifffile (their first, full-resolution image).

    Args:
        path: The image file.
        in_chans: 1 or 3.
        intensity: How values map to [0, 1].

    Raises:
        DataError: The file cannot be decoded, its values do not fit ``intensity``, or its pixel type or
            channel count is not supported.
    """
    path = Path(path)
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans={in_chans}; expected 1 or 3")
    try:
        if path.suffix.lower() in _TIFF_EXTENSIONS:
            array = tifffile.imread(path, key=0)
        else:
            with Image.open(path) as image:
                if image.mode in _PIL_CONVERTIBLE:
                    array = np.asarray(image.convert("L" if in_chans == 1 else "RGB"))
                else:
                    array = np.asarray(image)
    except _DECODE_ERRORS as err:
        raise DataError(f"{path}: cannot decode image ({err})") from err
    if array.size == 0:
        raise DataError(f"{path}: no image data; expected a non-empty image")
    intensity = intensity or Intensity()
    checked = np.require(check_pixels(array, path, intensity), requirements="W")  # PIL's arrays are read-only
    pixels = to_unit_range(torch.from_numpy(checked), **intensity.scaling).numpy()
    return _to_chw(pixels, in_chans, path)


def _to_chw(pixels: np.ndarray, in_chans: int, path: Path) -> np.ndarray:
    shape = pixels.shape
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    elif pixels.ndim == 3 and pixels.shape[0] in (1, 3, 4) and pixels.shape[2] > 4:
        pixels = pixels.transpose(1, 2, 0)  # a planar TIFF stores channels first
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 2, 3, 4):
        raise DataError(f"{path}: image of shape {shape}; expected (H, W) or (H, W, 1..4 channels)")
    # Two or four channels carry alpha last; it is dropped, as PIL does when converting to L or RGB.
    if pixels.shape[2] in (2, 4):
        pixels = pixels[:, :, :-1]
    if pixels.shape[2] == 3 and in_chans == 1:
        pixels = (pixels @ _LUMA)[:, :, None]
    elif pixels.shape[2] == 1 and in_chans == 3:
        pixels = np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)
