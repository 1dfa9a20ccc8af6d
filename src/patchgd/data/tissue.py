"""Tissue masks: which grid cells of a slide hold tissue, from a low-resolution thumbnail.

Stained tissue is coloured and glass is grey-white, so tissue is where the (smoothed) HSV saturation of a
thumbnail is above its Otsu threshold (the approach of CLAM and TRIDENT). A grey image has no saturation;
there tissue is where it is darker than its Otsu threshold.
"""

from __future__ import annotations

import numpy as np
import torch

from patchgd.data.readers import PatchSource

__all__ = ["cell_fractions", "hsv_saturation", "tissue_cells", "tissue_mask", "tissue_pixels"]

# Smoothing before the threshold, in thumbnail pixels: H&E has pale spots (lumen, fat) inside tissue
# that a per-pixel threshold would cut out.
_SMOOTHING_SIGMA = 2.0
_CLOSING_RADIUS = 3
# Specks and holes smaller than this fraction of the thumbnail's area are dust or pale spots, not tissue
# or background.
_MIN_AREA_FRACTION = 1e-4


def tissue_pixels(thumbnail: np.ndarray) -> np.ndarray:
    """The tissue mask of a thumbnail: Otsu threshold on smoothed saturation, closed, specks and holes removed.

    Args:
        thumbnail: ``(h, w, 3)`` RGB or ``(h, w, 1)`` grey uint8 picture.

    Returns:
        A ``(h, w)`` bool array, True on tissue.
    """
    from skimage import filters, morphology

    if thumbnail.shape[2] == 3:
        signal = hsv_saturation(thumbnail)
    else:
        signal = 1.0 - thumbnail[:, :, 0] / 255.0
    signal = filters.gaussian(signal, sigma=_SMOOTHING_SIGMA)
    if signal.max() - signal.min() < 1e-6:  # one colour: blank glass (or one uniform tissue) has no split
        return np.zeros(signal.shape, dtype=bool)
    mask = signal > filters.threshold_otsu(signal)
    mask = morphology.closing(mask, morphology.disk(_CLOSING_RADIUS))
    min_area = max(1, round(_MIN_AREA_FRACTION * mask.size))
    mask = morphology.remove_small_holes(mask, max_size=min_area)
    return morphology.remove_small_objects(mask, max_size=min_area)


def hsv_saturation(rgb: np.ndarray) -> np.ndarray:
    """The S channel of HSV, ``(max - min) / max`` (0 where ``max`` is 0), as ``skimage.color.rgb2hsv``.

    ``rgb2hsv`` also computes hue, which takes seconds on a 2048 px thumbnail; saturation alone is cheap.

    Args:
        rgb: ``(h, w, 3)`` uint8.

    Returns:
        ``(h, w)`` float32 in [0, 1].
    """
    high = rgb.max(axis=2).astype(np.float32)
    low = rgb.min(axis=2).astype(np.float32)
    return np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)


def cell_fractions(pixels: np.ndarray, height: int, width: int, patch_size: int) -> np.ndarray:
    """The tissue fraction of every grid cell: the mean of a thumbnail mask over the cell's footprint.

    Args:
        pixels: ``(h, w)`` bool mask of a thumbnail that covers the whole image.
        height: The image height at the grid's resolution.
        width: The image width at the grid's resolution.
        patch_size: The grid's patch side ``p``.

    Returns:
        ``(ceil(height / p), ceil(width / p))`` float64 fractions in [0, 1]. A cell on the bottom or right
        edge counts only its part inside the image; a cell smaller than a thumbnail pixel gets the
        pixel it falls in.
    """
    h, w = pixels.shape
    ys0, ys1 = _footprints(height, patch_size, h)
    xs0, xs1 = _footprints(width, patch_size, w)
    integral = np.zeros((h + 1, w + 1))
    integral[1:, 1:] = pixels.cumsum(0).cumsum(1)
    total = (integral[ys1][:, xs1] - integral[ys0][:, xs1] - integral[ys1][:, xs0] + integral[ys0][:, xs0])
    area = np.outer(ys1 - ys0, xs1 - xs0)
    return total / area


def tissue_mask(source: PatchSource, patch_size: int, min_fraction: float, *, thumbnail_side: int = 2048
                ) -> torch.Tensor:
    """The grid cells of a source whose tissue fraction is at least ``min_fraction``.

    Args:
        source: The image, at the resolution the grid is laid on.
        patch_size: The grid's patch side ``p``.
        min_fraction: The smallest tissue fraction of a tissue cell (0 keeps every cell).
        thumbnail_side: The long side of the thumbnail the mask is computed on (read from the smallest
            pyramid level at least that large).

    Returns:
        A ``(ceil(H / p), ceil(W / p))`` bool tensor, True on tissue cells.

    Example:
        >>> mask = tissue_mask(open_source("a.svs", level=1), 256, 0.25)  # doctest: +SKIP
    """
    thumbnail = source.thumbnail(thumbnail_side)
    return torch.from_numpy(tissue_cells(thumbnail, source.height, source.width, patch_size, min_fraction))


def tissue_cells(thumbnail: np.ndarray, height: int, width: int, patch_size: int, min_fraction: float
                 ) -> np.ndarray:
    """The tissue cells of a grid from a thumbnail of the whole image (what :func:`tissue_mask` computes).

    Args:
        thumbnail: ``(h, w, 3)`` or ``(h, w, 1)`` uint8 picture of the whole image.
        height: The image height at the grid's resolution.
        width: The image width at the grid's resolution.
        patch_size: The grid's patch side ``p``.
        min_fraction: The smallest tissue fraction of a tissue cell.

    Returns:
        A ``(ceil(height / p), ceil(width / p))`` bool array.
    """
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction={min_fraction}; expected a fraction in [0, 1]")
    return cell_fractions(tissue_pixels(thumbnail), height, width, patch_size) >= min_fraction


def _footprints(size: int, patch_size: int, thumb_size: int) -> tuple[np.ndarray, np.ndarray]:
    """First and past-the-end thumbnail index of every cell along one axis (at least one pixel each)."""
    edges = np.minimum(np.arange(-(-size // patch_size) + 1) * patch_size, size) * (thumb_size / size)
    start = np.minimum(np.floor(edges[:-1]).astype(np.int64), thumb_size - 1)
    stop = np.maximum(np.ceil(edges[1:] - 1e-9).astype(np.int64), start + 1)
    return start, np.minimum(stop, thumb_size)
