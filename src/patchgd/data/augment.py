"""Training-time augmentation (``augment.*``), the same for images in memory and slides read in pieces.

* Geometry: flips and quarter turns (:class:`~patchgd.grid.Orientation`). An image in memory is moved
  whole; a :class:`~patchgd.data.lazy.LazyImage` carries its orientation, and its grid moves the cells
  and turns each patch as it is read, so a slide is never read whole.
* Colour: brightness, contrast, saturation, hue and a stain jitter
  (:class:`~patchgd.data.colour.ColourJitter`), drawn once per image and step: an image in memory is
  jittered whole in the loader, a slide's patches on the device as they are read.

Parameters are drawn from torch's global generator in ``Dataset.__getitem__``, so DataLoader workers
draw reproducibly and every epoch draws anew for each image.
"""

from __future__ import annotations

import dataclasses

import torch

from patchgd.data.colour import ColourJitter
from patchgd.data.lazy import LazyImage
from patchgd.grid import Orientation, grid_shape
from patchgd.normalize import to_unit_range

__all__ = ["Augment"]

class Augment:
    """The training transform of ``augment.*``: ``(C, H, W)`` tensors and :class:`~patchgd.data.lazy.LazyImage` s.

    Flips are left-right and up-down, each with probability 1/2; ``rotate90`` turns by a random multiple of
    90 degrees, an image whose grid (in memory: whose pixels) is not square only by 0 or 180, so a batch
    keeps its grid. An image in memory comes back moved (and, with colour jitter, as floats in [0, 1]); a
    LazyImage comes back with its orientation and colour set, for its grid to apply as it reads.

    Args:
        config: An :class:`~patchgd.config.AugmentConfig`.
        patch_size: The grid's cell side (PatchGD), which a LazyImage is turned on; None for whole images.

    Example:
        >>> from patchgd.config import AugmentConfig
        >>> out = Augment(AugmentConfig(flip=True, brightness=0.2), patch_size=None)(torch.rand(3, 8, 8))
        >>> out.shape, out.dtype
        (torch.Size([3, 8, 8]), torch.float32)
    """

    def __init__(self, config, patch_size: int | None):  # noqa: ANN001 - an AugmentConfig
        self.config = config
        self.patch_size = patch_size
        self.colour = any((config.brightness, config.contrast, config.saturation, config.hue, config.hed))

    def orientation(self, height: int, width: int) -> Orientation | None:
        """A flip and turn drawn for an image (a grid) of ``height x width``; None when neither is asked."""
        c = self.config
        if not (c.flip or c.rotate90):
            return None
        flip_h, flip_v = (bool(torch.rand(()) < 0.5), bool(torch.rand(()) < 0.5)) if c.flip else (False, False)
        turns = 0
        if c.rotate90:
            turns = int(torch.randint(4, ())) if height == width else 2 * int(torch.randint(2, ()))
        return Orientation(flip_h, flip_v, turns)

    def __call__(self, image: torch.Tensor | LazyImage) -> torch.Tensor | LazyImage:
        if isinstance(image, LazyImage):
            orientation = self.orientation(*grid_shape(image.source.height, image.source.width, self.patch_size))
            colour = ColourJitter.draw(self.config) if self.colour else None
            return dataclasses.replace(image, orientation=orientation, colour=colour)
        orientation = self.orientation(image.shape[-2], image.shape[-1])
        if orientation is not None:
            image = orientation.apply(image)
        if self.colour:
            image = ColourJitter.draw(self.config).apply(to_unit_range(image))
        return image
