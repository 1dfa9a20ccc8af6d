"""Pixel scaling and per-channel normalisation, done by the model on the device.

Images travel from the file to the device in their integer dtype (uint8 for slides and 8-bit images:
a quarter of float32's bytes); the model's first step turns each patch into normalised floats. Because
the statistics are buffers of the model, they are saved in every checkpoint and ``predict`` and
``evaluate`` cannot forget them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["Normalize", "to_unit_range"]


def to_unit_range(pixels: torch.Tensor, bit_depth: int | None = None,
                  value_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Pixels mapped to floats in [0, 1] by a fixed rule of their type: the one home of pixel scaling, used
    by the model's input step (on the device) and by the readers alike.

    With ``value_range`` ``(low, high)``: ``(x - low) / (high - low)``, clipped to [0, 1]. Otherwise
    integers divide by ``2**bit_depth - 1``, or map their dtype's range onto [0, 1] (unsigned: ``x / max``;
    signed: ``(x - min) / (max - min)``), booleans become 0 and 1, and floats (already in the model's input
    range) are returned as they are.

    Args:
        pixels: A tensor of any shape and numeric or boolean dtype.
        bit_depth: Significant bits of integer pixels (12 for 12-bit data stored in uint16); None for the
            dtype's.
        value_range: Bounds mapped to 0 and 1.

    Example:
        >>> to_unit_range(torch.tensor([0, 51, 255], dtype=torch.uint8))
        tensor([0.0000, 0.2000, 1.0000])
        >>> to_unit_range(torch.tensor([-128, 127], dtype=torch.int8))
        tensor([0., 1.])
        >>> to_unit_range(torch.tensor([0, 2048, 4095], dtype=torch.int16), bit_depth=12)
        tensor([0.0000, 0.5001, 1.0000])
    """
    dtype = torch.get_default_dtype()
    if value_range is not None:
        low, high = value_range
        return ((pixels.to(dtype) - low) / (high - low)).clamp_(0.0, 1.0)
    if pixels.dtype.is_floating_point:
        return pixels
    if pixels.dtype == torch.bool:
        return pixels.to(dtype)
    if bit_depth is not None:
        return pixels.to(dtype) / (2**bit_depth - 1)
    info = torch.iinfo(pixels.dtype)
    if info.min == 0:
        return pixels.to(dtype) / info.max
    # Signed: shifted in float64, where every int32 is exact, so -min..max maps onto 0..1 without rounding.
    return (pixels.to(torch.float64) - info.min).div_(info.max - info.min).to(dtype)


def _per_channel(values: Sequence[float] | None, default: float, channels: int, name: str) -> torch.Tensor:
    values = [default] if values is None else [float(v) for v in values]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"{name}={values}; expected 1 or {channels} values (one per channel)")
    return torch.tensor(values).view(channels, 1, 1)


class Normalize(nn.Module):
    """Scale integer pixels to [0, 1] by their dtype's range, then subtract ``mean`` and divide by ``std``.

    Args:
        channels: Image channels ``C`` (without ``mean`` and ``std`` the step is the identity on floats and
            accepts any number of channels).
        mean: Per-channel mean of the [0, 1] pixels (one value is repeated); None for 0.
        std: Per-channel standard deviation (one value is repeated); None for 1.

    Example:
        >>> norm = Normalize(3, mean=[0.5], std=[0.25])
        >>> norm(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))[0, :, 0, 0]
        tensor([2., 2., 2.])
    """

    def __init__(self, channels: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        self.channels = channels
        if mean is None and std is None:
            channels = 1  # broadcasts over any channel count, as a backbone module of its own may expect
        std_t = _per_channel(std, 1.0, channels, "std")
        if (std_t <= 0).any():
            raise ValueError(f"std={list(std)}; expected positive values")
        self.register_buffer("mean", _per_channel(mean, 0.0, channels, "mean"))
        self.register_buffer("std", std_t)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        # The statistics a checkpoint holds are the model's, whatever the config rebuilding it says: a model
        # trained on pretrained weights normalised with the weights' own mean/std, which a rebuild without the
        # weights file cannot know; it takes the saved ones, for one channel or for each.
        for name in ("mean", "std"):
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if saved is not None and saved.shape != current.shape and saved.shape in ((1, 1, 1), (self.channels, 1, 1)):
                setattr(self, name, torch.empty(saved.shape, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` pixels or ``(N, C, L)`` sequences (integer or float) -> normalised floats of the same
        shape."""
        shape = (-1,) + (1,) * (pixels.dim() - 2)  # channels first of (N, C, H, W) patches or (N, C, L) chunks
        return (to_unit_range(pixels) - self.mean.view(shape)) / self.std.view(shape)
