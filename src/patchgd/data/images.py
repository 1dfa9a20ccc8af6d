"""Read an image file (PNG, JPEG or TIFF) into a float ``(C, H, W)`` array with values in [0, 1], scaled
as :mod:`patchgd.data.intensity` says, and check a list of images up front (headers, or a full decode) so
that bad ones fail before training starts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from patchgd.data.errors import DataError, keeps_tifffile_warnings
from patchgd.data.intensity import Intensity, scale_pixels
from patchgd.registry import READERS

IMAGE_EXTENSIONS = READERS.info("image")["suffixes"]  # what is decoded whole
_TIFF_EXTENSIONS = (".tif", ".tiff")
# PIL converts these modes to L/RGB itself; 16-bit and float modes go through numpy to keep their range.
_PIL_CONVERTIBLE = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
# A decompression bomb is an image larger than Pillow's MAX_IMAGE_PIXELS; its message names the limit.
_DECODE_ERRORS = (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, tifffile.TiffFileError)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as PIL's RGB -> L
# What np.asarray gives for the PIL modes that are not converted to L/RGB.
_PIL_DTYPES = {"I;16": np.uint16, "I;16L": np.uint16, "I;16B": np.uint16, "I;16N": np.uint16, "I": np.int32,
               "F": np.float32}


@keeps_tifffile_warnings
def decode_image(path: str | Path, in_chans: int) -> np.ndarray:
    """The pixels of an image file as decoded, whole: tifffile for TIFFs (their first, full-resolution
    image), Pillow otherwise, converting its 8-bit modes to L or RGB; 16-bit and float data keep their type.

    Raises:
        DataError: The file cannot be decoded.
    """
    try:
        if Path(path).suffix.lower() in _TIFF_EXTENSIONS:
            return tifffile.imread(path, key=0)
        with Image.open(path) as image:
            if image.mode in _PIL_CONVERTIBLE:
                image = image.convert("L" if in_chans == 1 else "RGB")
            return np.asarray(image)
    except _DECODE_ERRORS as err:
        raise DataError(f"{path}: cannot decode image ({err})") from err


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
    array = decode_image(path, in_chans)
    _hwc_shape(array.shape, path)
    _check_pixel_type(array.dtype, path)
    return _to_chw(scale_pixels(array, path, intensity or Intensity()), in_chans)


@keeps_tifffile_warnings
def read_image_header(path: str | Path) -> tuple[int, int]:
    """The ``(height, width)`` of an image, from its header only; its channels and pixel type are checked.

    Raises:
        DataError: The header cannot be decoded, or the layout or pixel type is one :func:`read_image`
            refuses.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in _TIFF_EXTENSIONS:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0] if len(tif.pages) else None
                shape, dtype = (page.shape, page.dtype) if page is not None else ((0,), np.uint8)
        else:
            with Image.open(path) as image:
                width, height = image.size
                mode = image.mode
            shape = (height, width)
            dtype = np.uint8 if mode in _PIL_CONVERTIBLE else _PIL_DTYPES.get(mode)
    except _DECODE_ERRORS as err:
        raise DataError(f"{path}: cannot decode image header ({err})") from err
    if dtype is None:
        raise DataError(f"{path}: image mode {mode!r} is not supported; expected 8/16-bit grayscale, RGB(A) "
                        "or float")
    _check_pixel_type(np.dtype(dtype), path)
    return _hwc_shape(shape, path)[:2]


def check_images(paths: Sequence[Path], in_chans: int, *, full: bool = False,
                 intensity: Intensity | None = None) -> list[tuple[int, int]]:
    """Check every image before training: header, layout and pixel type, and optionally the pixels.

    Args:
        paths: The image files.
        in_chans: The channels the images are read with (``full`` decodes with it).
        full: Decode every image whole, which finds corrupt pixel data, non-finite pixels and values
            ``intensity`` refuses too, at the cost of a pass over the data.
        intensity: How a full decode maps values to [0, 1].

    Returns:
        The ``(height, width)`` of each image.

    Raises:
        DataError: Naming the first image that fails, and why.
    """
    return [tuple(read_image(path, in_chans, intensity).shape[1:]) if full else read_image_header(path)
            for path in paths]


def require_one_size(paths: Sequence[Path], sizes: Sequence[tuple[int, int]]) -> None:
    """Raise a DataError naming the first image whose size differs from the first image's.

    Batches stack their images, so a data set read whole at its own resolution needs one size.
    """
    for path, size in zip(paths, sizes):
        if size != sizes[0]:
            raise DataError(
                f"{path}: image is {size[0]}x{size[1]} px but {paths[0]} is {sizes[0][0]}x{sizes[0][1]}; "
                "images in a batch must share a size: set data.image_size to resize every image to a "
                "square, or resize them to one size beforehand")


@keeps_tifffile_warnings
def image_channels(path: str | Path) -> int:
    """1 for a grey image (with or without alpha), 3 for a colour one, from the file's header; a
    whole-slide file (any other extension) is colour.

    Raises:
        DataError: The header cannot be decoded.
    """
    path = Path(path)
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return 3
    try:
        if path.suffix.lower() in _TIFF_EXTENSIONS:
            with tifffile.TiffFile(path) as tif:
                samples = _hwc_shape(tif.pages[0].shape if len(tif.pages) else (0,), path)[2]
        else:
            with Image.open(path) as image:
                samples = len(image.getbands()) if image.mode != "P" else len(image.convert("RGBA").getbands())
    except _DECODE_ERRORS as err:
        raise DataError(f"{path}: cannot decode image header ({err})") from err
    return 1 if samples in (1, 2) else 3  # alpha (the 2nd or 4th sample) is dropped when read


def _hwc_shape(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """``(H, W, C)`` of an array shape, or the DataError for a layout that is no image."""
    if 0 in shape or not shape:
        raise DataError(f"{path}: no image data; expected a non-empty image")
    if len(shape) == 2:
        shape = (*shape, 1)
    elif len(shape) == 3 and shape[0] in (1, 3, 4) and shape[2] > 4:
        shape = (shape[1], shape[2], shape[0])  # a planar TIFF stores channels first
    if len(shape) != 3 or shape[2] not in (1, 2, 3, 4):
        raise DataError(f"{path}: image of shape {shape}; expected (H, W) or (H, W, 1..4 channels)")
    return shape


def to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """``(H, W[, samples])`` pixels as ``(H, W, channels)`` in their own type: the one channel conversion of
    whole images and of regions read from slides alike.

    Two or four samples carry alpha last; it is dropped, as PIL does when converting to L or RGB. RGB becomes
    grey by ITU-R 601 luma (rounded for integer pixels), grey is repeated into RGB.
    """
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape[2] in (2, 4):
        pixels = pixels[:, :, :-1]
    if pixels.shape[2] == 3 and channels == 1:
        luma = pixels.astype(np.float32) @ _LUMA
        if np.issubdtype(pixels.dtype, np.integer):
            luma = np.rint(luma)
        return luma[:, :, None].astype(pixels.dtype)
    if pixels.shape[2] == 1 and channels == 3:
        return np.repeat(pixels, 3, axis=2)
    return pixels


def _to_chw(pixels: np.ndarray, in_chans: int) -> np.ndarray:
    """Scaled ``(H, W[, C])`` pixels (a layout :func:`_hwc_shape` accepted) as ``(in_chans, H, W)`` float32."""
    if pixels.ndim == 3 and pixels.shape[0] in (1, 3, 4) and pixels.shape[2] > 4:
        pixels = pixels.transpose(1, 2, 0)  # a planar TIFF stores channels first
    return np.ascontiguousarray(to_channels(pixels, in_chans).transpose(2, 0, 1), dtype=np.float32)


def _check_pixel_type(dtype: np.dtype, path: Path) -> None:
    # Signed integers and floats of any range are readable: data.intensity says how they scale.
    if not (dtype == np.bool_ or np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise DataError(f"{path}: pixel type {dtype}; expected integers or floats")
