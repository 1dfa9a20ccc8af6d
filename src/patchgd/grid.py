"""Patch-grid geometry: padding, row-major cell numbering and patch extraction, for images and sequences.

A sequence ``(B, C, L)`` is the one-row case of an image: its grid is ``1 x n`` cells of ``p`` samples,
cut by the same code, so Algorithms 1 and 2 serve both without a second copy.

This module is the one home of the facts "which pixels make cell ``i``", "how a side that is not a
multiple of the patch size is handled" and "where a cell goes when the image is flipped or turned"
(:class:`Orientation`). Models and methods ask a grid for the patches at some cells and never slice
images themselves, so a grid that reads a slide in pieces (:class:`patchgd.data.lazy.SourceGrid`, built
on this geometry) stands in for an in-memory :class:`PatchGrid`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["PatchGrid", "Orientation", "grid_shape"]


def grid_shape(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Rows and columns of the patch grid covering an ``height x width`` image.

    Args:
        height: Image height in pixels.
        width: Image width in pixels.
        patch_size: Side of a square patch in pixels.

    Returns:
        ``(m, n)`` with ``m = ceil(height / p)`` and ``n = ceil(width / p)``: a partial last row or column
        is kept (and padded), never cropped.

    Example:
        >>> grid_shape(300, 512, 128)
        (3, 4)
    """
    if patch_size <= 0:
        raise ValueError(f"patch_size must be a positive number of pixels, got {patch_size}")
    return math.ceil(height / patch_size), math.ceil(width / patch_size)


class PatchGrid:
    """A batch of images seen as an ``m x n`` grid of ``p x p`` patches per image (or of sequences as a
    ``1 x n`` grid of ``p``-sample chunks).

    Cells are numbered row-major: flat index ``i = r * n + c`` is the patch
    ``image[:, r*p:(r+1)*p, c*p:(c+1)*p]`` (for a sequence, chunk ``i`` is ``sequence[:, i*p:(i+1)*p]``).
    Images whose sides are not multiples of ``p`` are padded at the bottom and right with ``pad_value``
    (sequences at the end; one copy, only when needed). Patches are gathered from a strided view of the
    images, so only the requested patches are ever copied.

    Args:
        images: ``(B, C, H, W)`` images or ``(B, C, L)`` sequences.
        patch_size: Side ``p`` of the square patches (length of the chunks of a sequence).
        pad_value: Fill value for the padding.

    Attributes:
        shape: The grid's shape, ``(m, n)`` for images and ``(n,)`` for sequences: ``Z`` is
            ``(B, s, *shape)``.
        patch_shape: ``(p, p)`` or ``(p,)``: a patch is ``(C, *patch_shape)``.

    Example:
        >>> grid = PatchGrid(torch.zeros(2, 3, 300, 512), 128)
        >>> grid.rows, grid.cols, grid.num_cells
        (3, 4, 12)
        >>> grid.patches(torch.tensor([[0, 11], [5, 6]])).shape
        torch.Size([4, 3, 128, 128])
    """

    def __init__(self, images: torch.Tensor, patch_size: int, pad_value: float = 0.0):
        if images.dim() not in (3, 4):
            raise ValueError(f"images must be a (B, C, H, W) or, for sequences, (B, C, L) tensor; got shape "
                             f"{tuple(images.shape)}")
        sequence = images.dim() == 3
        if sequence:  # a one-row image whose patches are 1 x p
            images = images.unsqueeze(2)
        batch, _, height, width = images.shape
        patch_height = 1 if sequence else patch_size
        self.patch_size = patch_size
        self.rows, self.cols = (1, math.ceil(width / patch_size)) if sequence else grid_shape(height, width, patch_size)
        self.shape = (self.cols,) if sequence else (self.rows, self.cols)
        self.patch_shape = (patch_size,) if sequence else (patch_size, patch_size)
        pad_bottom = self.rows * patch_height - height
        pad_right = self.cols * patch_size - width
        if pad_bottom or pad_right:
            images = F.pad(images, (0, pad_right, 0, pad_bottom), value=pad_value)
        self.batch_size = batch
        self.channels, self.dtype = images.shape[1], images.dtype
        self.device = images.device
        # (B, C, m, n, ph, p) view sharing the image storage.
        self._cells = images.unfold(2, patch_height, patch_height).unfold(3, patch_size, patch_size)
        # The same cells as (B, m, n, C, p, p), still a view: a run of whole grid rows is one strided copy.
        self._rows = self._cells.permute(0, 2, 3, 1, 4, 5)

    @property
    def num_cells(self) -> int:
        """Number of cells ``m * n`` per image."""
        return self.rows * self.cols

    def patches(self, cells: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """Copy out the patches at the given cells.

        Args:
            cells: Flat row-major cell indices, ``(B, k)`` (cells per image) or, with ``images``, ``(N,)``.
            images: Optional ``(N,)`` image index for each cell in a flat ``cells``; then the result holds
                patch ``cells[j]`` of image ``images[j]`` at position ``j``.

        Returns:
            ``(B * k, C, *patch_shape)`` (image-major) or ``(N, C, *patch_shape)`` tensor of patches.
        """
        if images is None:
            images = torch.arange(self.batch_size, device=cells.device).unsqueeze(1).expand_as(cells)
        rows = torch.div(cells, self.cols, rounding_mode="floor")
        cols = cells % self.cols
        # Advanced indices around a slice put the indexed dims first: (..., C, p, p).
        picked = self._cells[images, :, rows, cols]
        return picked.reshape(-1, picked.shape[-3], *self.patch_shape)

    def patch_range(self, start: int, stop: int) -> torch.Tensor:
        """Copy out the patches of a run of flat cells, counted image-major: ``b * m * n + i``.

        The fill's access pattern. Whole grid rows are cut as strided copies of the image rows they
        cover, with no per-patch gather: for small patches several times faster than :meth:`patches`.

        Args:
            start: First flat cell, in ``[0, B * m * n)``.
            stop: One past the last flat cell.

        Returns:
            ``(stop - start, C, *patch_shape)`` tensor of patches, in flat-cell order.

        Example:
            >>> grid = PatchGrid(torch.zeros(2, 3, 300, 512), 128)
            >>> grid.patch_range(10, 15).shape  # image 0 cells 10, 11; image 1 cells 0, 1, 2
            torch.Size([5, 3, 128, 128])
        """
        if not 0 <= start <= stop <= self.batch_size * self.num_cells:
            raise ValueError(f"cell range [{start}, {stop}) is outside the {self.batch_size} x {self.num_cells} "
                             "cells of the grid")
        out = self._rows.new_empty(stop - start, *self._rows.shape[-3:])
        done = 0
        while start + done < stop:
            image, cell = divmod(start + done, self.num_cells)
            row, col = divmod(cell, self.cols)
            left = min(stop - start - done, self.num_cells - cell)  # cells still wanted in this image
            if col or left < self.cols:  # a partial row
                count = min(left, self.cols - col)
                out[done:done + count] = self._rows[image, row, col:col + count]
            else:
                whole_rows = left // self.cols
                count = whole_rows * self.cols
                out[done:done + count].view(whole_rows, self.cols, *out.shape[1:]).copy_(
                    self._rows[image, row:row + whole_rows])
            done += count
        return out.view(out.shape[0], out.shape[1], *self.patch_shape)

@dataclass(frozen=True)
class Orientation:
    """A flip and quarter turn of an image, in this order: ``flip_h`` (left-right), ``flip_v`` (up-down), then
    ``turns`` quarter turns as ``torch.rot90(x, turns, dims=(-2, -1))``.

    On a grid of square cells, turning or flipping the whole image is the same move of the cells plus the
    same turn or flip of every cell's pixels: :meth:`apply` does both, to an image, a stack of patches or a
    grid of cell indices alike, which is how a lazily read slide is augmented without being read whole.

    Example:
        >>> Orientation(flip_h=True, turns=1).apply(torch.arange(6).view(2, 3)).tolist()
        [[0, 3], [1, 4], [2, 5]]
    """

    flip_h: bool = False
    flip_v: bool = False
    turns: int = 0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (``(..., H, W)``) flipped and turned; its last two sides swap under an odd ``turns``."""
        if self.flip_h:
            x = x.flip(-1)
        if self.flip_v:
            x = x.flip(-2)
        return torch.rot90(x, self.turns, dims=(-2, -1)) if self.turns % 4 else x

    def shape(self, height: int, width: int) -> tuple[int, int]:
        """The ``(height, width)`` of an ``height x width`` image after :meth:`apply`."""
        return (width, height) if self.turns % 2 else (height, width)

    def source(self, rows: torch.Tensor, cols: torch.Tensor, height: int, width: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Where positions ``(rows, cols)`` of the moved array come from in the ``height x width`` original:
        :meth:`apply` undone on the indices alone (the last quarter turn first, then the flips)."""
        sides = [(height, width)]
        for _ in range(self.turns % 4):
            sides.append(sides[-1][::-1])
        for _, w in reversed(sides[:-1]):  # rot90 puts original (r, c) of an h x w array at (w - 1 - c, r)
            rows, cols = cols, w - 1 - rows
        if self.flip_v:
            rows = height - 1 - rows
        if self.flip_h:
            cols = width - 1 - cols
        return rows, cols
