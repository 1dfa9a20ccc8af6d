"""How stored pixel values become the model's [0, 1] inputs.

Two kinds of step, kept apart because they belong to different places:

* :func:`~patchgd.normalize.to_unit_range` is a fixed map of the pixel type (an integer dtype's range,
  or ``bit_depth`` bits) or of given bounds (``value_range``). It needs nothing from the image, so it
  runs wherever pixels are scaled: by the model's input step for unsigned integers under the default
  options, else when an image is read (:func:`scale_pixels`).
* :func:`check_pixels` needs the image itself: it refuses values the chosen scaling cannot represent
  (floats outside [0, 1] under ``unit``, integers above ``bit_depth``), naming the file and the range
  found, and computes the per-image percentile stretch. Nothing is clipped without the user asking for
  it (a ``range`` window or a ``percentile`` stretch).

Example:
    >>> import numpy as np
    >>> intensity = Intensity("range", value_range=(0.0, 4000.0))
    >>> scale_pixels(np.array([[0.0, 2000.0, 4000.0]], np.float32), "cells.tif", intensity)
    array([[0. , 0.5, 1. ]], dtype=float32)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from patchgd.data.errors import DataError
from patchgd.normalize import to_unit_range

__all__ = ["Intensity", "check_pixels", "prepare_pixels", "scale_pixels"]

MODES = ("unit", "range", "percentile")


@dataclasses.dataclass(frozen=True)
class Intensity:
    """How an image's values map to [0, 1] (``data.intensity``, ``data.bit_depth`` and their bounds).

    Args:
        mode: ``"unit"``: integers scale by their dtype's range (or ``bit_depth``), floats must already lie
            in [0, 1]. ``"range"``: ``value_range`` ``(low, high)`` maps to [0, 1], values outside are
            clipped (a window, as for CT or microscopy). ``"percentile"``: each image's ``percentiles``
            ``(low, high)`` map to [0, 1], values beyond them clipped.
        bit_depth: Significant bits of integer images (12 for 12-bit data stored in uint16); None uses the
            dtype's range. Values above ``2**bit_depth - 1`` or below 0 are an error.
        value_range: The bounds of ``mode="range"``.
        percentiles: The percentiles of ``mode="percentile"``, in [0, 100].
    """

    mode: str = "unit"
    bit_depth: int | None = None
    value_range: tuple[float, float] | None = None
    percentiles: tuple[float, float] = (1.0, 99.0)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"data.intensity={self.mode!r}; expected one of {', '.join(MODES)}")
        if self.bit_depth is not None and not 1 <= self.bit_depth <= 32:
            raise ValueError(f"data.bit_depth={self.bit_depth}; expected 1 to 32 bits")
        if self.mode == "range":
            if self.value_range is None or len(self.value_range) != 2 or not self.value_range[0] < self.value_range[1]:
                raise ValueError(f"data.intensity: range needs data.intensity_range: [low, high] with low < high; "
                                 f"got {self.value_range}")
        elif self.value_range is not None:
            raise ValueError(f"data.intensity_range={list(self.value_range)} is only used with data.intensity: "
                             f"range, not {self.mode!r}")
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"data.percentiles={list(self.percentiles)}; expected [low, high] with "
                             "0 <= low < high <= 100")

    @classmethod
    def from_config(cls, data) -> Intensity:  # noqa: ANN001 - a DataConfig
        """The intensity options of a :class:`~patchgd.config.DataConfig`."""
        value_range = tuple(data.intensity_range) if data.intensity_range is not None else None
        return cls(data.intensity, data.bit_depth, value_range, tuple(data.percentiles))

    def model_scales(self, dtype) -> bool:  # noqa: ANN001 - a numpy dtype
        """Whether pixels of ``dtype`` travel as they are and the model scales them by the dtype's range
        (unsigned integers under the default options), rather than being scaled when read."""
        return self.mode == "unit" and self.bit_depth is None and np.issubdtype(dtype, np.unsignedinteger)

    @property
    def scaling(self) -> dict:
        """The keyword arguments of :func:`~patchgd.normalize.to_unit_range` (the image-independent part)."""
        return {"bit_depth": self.bit_depth, "value_range": self.value_range if self.mode == "range" else None}


def check_pixels(array: np.ndarray, path: str | Path, intensity: Intensity) -> np.ndarray:
    """Refuse values ``intensity`` cannot represent, and apply the per-image percentile stretch.

    Args:
        array: The pixels as stored (any shape, any numeric or boolean dtype).
        path: The file, named in errors.
        intensity: The options.

    Returns:
        ``array`` itself, or for ``"percentile"`` its stretch to [0, 1] as float32.

    Raises:
        DataError: Naming the file, the range found and what was expected.
    """
    if array.dtype == np.bool_:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(f"{path}: pixel type {array.dtype}; expected integers or floats")
    floating = np.issubdtype(array.dtype, np.floating)
    if floating and not np.isfinite(array).all():
        raise DataError(f"{path}: {np.count_nonzero(~np.isfinite(array))} non-finite pixel value(s) (nan or inf); "
                        "expected finite values")
    low, high = array.min(), array.max()
    if intensity.mode == "percentile":
        p_low, p_high = np.percentile(array, intensity.percentiles)
        if p_high <= p_low:  # a constant image has no contrast to stretch
            return np.zeros(array.shape, np.float32)
        return np.clip((array.astype(np.float32) - p_low) / (p_high - p_low), 0.0, 1.0)
    if not floating and intensity.bit_depth is not None:
        top = 2**intensity.bit_depth - 1
        if low < 0 or high > top:
            raise DataError(f"{path}: pixel values range from {low} to {high}; data.bit_depth={intensity.bit_depth} "
                            f"expects 0 to {top} (raise data.bit_depth, or use data.intensity: range)")
    if floating and intensity.mode == "unit" and (low < 0 or high > 1):
        raise DataError(f"{path}: float pixel values range from {low:.6g} to {high:.6g}; data.intensity: unit "
                        "expects [0, 1] (use data.intensity: range with data.intensity_range: [low, high], "
                        "or data.intensity: percentile)")
    return array


def scale_pixels(array: np.ndarray, path: str | Path, intensity: Intensity) -> np.ndarray:
    """``array`` checked (:func:`check_pixels`) and scaled (:func:`~patchgd.normalize.to_unit_range`) to
    float32 in [0, 1].

    Args:
        array: The pixels as stored.
        path: The file, named in errors.
        intensity: The options.
    """
    checked = np.require(check_pixels(array, path, intensity), requirements="W")  # PIL's arrays are read-only
    return to_unit_range(torch.from_numpy(checked), **intensity.scaling).to(torch.float32).numpy()


def prepare_pixels(array: np.ndarray, path: str | Path, intensity: Intensity) -> np.ndarray:
    """Pixels as they travel to the model: unsigned integers under the default options as they are (the
    model scales them by their dtype's range, on the device); anything else as :func:`scale_pixels` gives it.

    Args:
        array: The pixels as stored.
        path: The file, named in errors.
        intensity: The options.
    """
    return array if intensity.model_scales(array.dtype) else scale_pixels(array, path, intensity)
