"""Colour and stain jitter of pixels in [0, 1], on any device: brightness, contrast, saturation, hue (as
torchvision's) and a stain jitter in HED space (Tellez et al., 2018: each of haematoxylin, eosin and DAB
scaled by ``1 + U(-hed, hed)`` and shifted by ``U(-hed, hed)``, with scikit-image's stain matrices).

Each acts pixel by pixel, so jittering a whole image equals jittering each of its patches (to float
rounding): :mod:`patchgd.data.augment` jitters an image in memory whole in the loader, and a slide's
patches on the device as they are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["ColourJitter", "hed_jitter"]

_LOG_FLOOR = math.log(1e-6)  # scikit-image's floor of the optical density: log(max(rgb, 1e-6))


def _mix(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``x @ matrix`` over the channel axis (-3) of ``(..., 3, H, W)``: one matrix product over all pixels."""
    return (matrix.T @ x.flatten(-2)).view_as(x)


def hed_jitter(rgb: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``hed2rgb(rgb2hed(rgb) * scale + shift)`` of scikit-image, on ``(..., 3, H, W)`` floats in [0, 1] on
    any device.

    Args:
        rgb: Pixels in [0, 1], channels at axis -3.
        scale: Three factors, for the haematoxylin, eosin and DAB concentrations.
        shift: Three offsets added after the scaling.

    Example:
        >>> import numpy as np
        >>> from skimage.color import hed2rgb, rgb2hed
        >>> pink = torch.tensor([0.8, 0.5, 0.7]).view(3, 1, 1)  # an eosin-stained pixel
        >>> more_eosin = hed_jitter(pink, torch.tensor([1.0, 1.2, 1.0]), torch.zeros(3))
        >>> reference = hed2rgb(rgb2hed(pink.permute(1, 2, 0).double().numpy()) * [1.0, 1.2, 1.0])
        >>> bool(np.allclose(more_eosin.permute(1, 2, 0).numpy(), reference, atol=1e-5))
        True
    """
    from skimage.color import hed_from_rgb, rgb_from_hed

    to_hed = torch.as_tensor(hed_from_rgb, dtype=rgb.dtype, device=rgb.device)
    to_rgb = torch.as_tensor(rgb_from_hed, dtype=rgb.dtype, device=rgb.device)
    scale, shift = scale.to(rgb).view(3, 1, 1), shift.to(rgb).view(3, 1, 1)

    def one(x: torch.Tensor) -> torch.Tensor:
        density = torch.log(x.clamp_min(1e-6)).mul_(1 / _LOG_FLOOR)  # in place: fewer passes over the pixels
        stains = _mix(density, to_hed).clamp_min_(0).mul_(scale).add_(shift)
        return _mix(stains.mul_(_LOG_FLOOR), to_rgb).exp_().clamp_(0, 1)

    if rgb.device.type != "cpu" or rgb.dim() == 3:
        return one(rgb)
    # On the CPU, patch by patch: each pass then stays in the cache (a third faster on 256 px patches).
    out = torch.empty_like(rgb)
    for source, target in zip(rgb.reshape(-1, *rgb.shape[-3:]), out.view(-1, *rgb.shape[-3:])):
        target.copy_(one(source))
    return out


@dataclass(frozen=True)
class ColourJitter:
    """One image's colour jitter, applied in this order to pixels in [0, 1]: brightness (a factor),
    contrast (a factor about mid-grey 0.5: the image's own mean is not known while a slide is read a
    patch at a time), saturation (a factor), hue (a shift in turns, as torchvision's), then the HED
    stain ``scale`` and ``shift`` (None: no stain jitter). Identity values leave a step out."""

    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    hed_scale: torch.Tensor | None = None
    hed_shift: torch.Tensor | None = None

    @classmethod
    def draw(cls, config) -> ColourJitter:  # noqa: ANN001 - an AugmentConfig
        """Parameters drawn from torch's global generator for ``augment.*`` (the config's strengths)."""
        def factor(strength: float) -> float:
            return float(torch.empty(()).uniform_(max(0.0, 1 - strength), 1 + strength)) if strength else 1.0

        hed = config.hed
        return cls(brightness=factor(config.brightness), contrast=factor(config.contrast),
                   saturation=factor(config.saturation),
                   hue=float(torch.empty(()).uniform_(-config.hue, config.hue)) if config.hue else 0.0,
                   hed_scale=torch.empty(3).uniform_(1 - hed, 1 + hed) if hed else None,
                   hed_shift=torch.empty(3).uniform_(-hed, hed) if hed else None)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., C, H, W)`` floats in [0, 1] -> jittered floats in [0, 1]."""
        from torchvision.transforms.v2 import functional as TF

        if self.brightness != 1:
            x = TF.adjust_brightness(x, self.brightness)
        if self.contrast != 1:
            x = ((x - 0.5) * self.contrast + 0.5).clamp(0, 1)
        if self.saturation != 1:
            x = TF.adjust_saturation(x, self.saturation)
        if self.hue:
            x = TF.adjust_hue(x, self.hue)
        if self.hed_scale is not None:
            x = hed_jitter(x, self.hed_scale, self.hed_shift)
        return x
