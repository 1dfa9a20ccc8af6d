"""Patch-grid geometry: padding, row-major cell numbering and patch extraction, for images and sequences.

A sequence ``(B, C, L)`` is the one-row case of an image: its grid is ``1 x n`` cells of ``p`` samples,
cut by the same code, so Algorithms 1 and 2 serve both without a second copy.

This module is the one home of the facts "which pixels make cell ``i``" and "how a side that is not a
multiple of the patch size is handled". Models and methods ask a :class:`PatchGrid` for the patches at
some cells and never slice images themselves, so a lazy, disk-backed grid (:class:`SourceGrid` over
:class:`LazyImage`) stands in for slides; both grids live here, over 400 lines, so that the cell geometry
and the turns of an augmented slide have one home.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .normalize import to_unit_range

if TYPE_CHECKING:  # annotations only: the readers and augmentations build on the grid, not the other way
    from .data.augment import ColourJitter
    from .data.readers import PatchSource

__all__ = ["PatchGrid", "SourceGrid", "LazyImage", "Orientation", "grid_shape", "cell_mask"]


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


@dataclass(eq=False)
class LazyImage:
    """One image read in pieces: a :class:`~patchgd.data.readers.PatchSource` and the tissue cells of its grid,
    seen through an augmentation drawn for one training step.

    The augmented image is the source padded to its grid of ``p``-pixel cells, then flipped and turned by
    ``orientation``, then colour-jittered by ``colour``: the cells move (and swap the grid's sides under a
    quarter turn), each patch is flipped and turned alike, and the colour acts on each patch on the device.

    Attributes:
        source: The pixels, read ``source.read_cells(...)`` a chunk of patches at a time.
        tissue: ``(m, n)`` bool mask over the source's own grid, True where a cell is encoded and sampled;
            None encodes and samples every cell.
        orientation: The flip and turn of the whole image (None: as stored).
        colour: A :class:`~patchgd.data.augment.ColourJitter` with this image's parameters (None: none).
    """

    source: PatchSource
    tissue: torch.Tensor | None = None
    orientation: Orientation | None = None
    colour: ColourJitter | None = None

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the augmented image."""
        height, width = self.source.height, self.source.width
        return self.orientation.shape(height, width) if self.orientation else (height, width)

    def grid_tissue(self) -> torch.Tensor | None:
        """The tissue mask over the augmented image's grid (None: every cell)."""
        if self.tissue is None or self.orientation is None:
            return self.tissue
        return self.orientation.apply(self.tissue)

    def read_cells(self, rows: torch.Tensor, cols: torch.Tensor, patch_size: int, fill: float) -> torch.Tensor:
        """``(N, C, p, p)`` patches at ``(rows, cols)`` of the augmented image's grid (colour not applied)."""
        if self.orientation is None:
            read = self.source.read_cells(np.stack([rows.numpy(), cols.numpy()], axis=1), patch_size, fill=fill)
            return torch.from_numpy(np.ascontiguousarray(read))
        stored = self.orientation.source(rows, cols, *grid_shape(self.source.height, self.source.width, patch_size))
        read = self.source.read_cells(np.stack([stored[0].numpy(), stored[1].numpy()], axis=1), patch_size, fill=fill)
        return self.orientation.apply(torch.from_numpy(read)).contiguous()


def _item_info(item: torch.Tensor | LazyImage) -> tuple[int, int, int, torch.dtype]:
    """``(channels, height, width, dtype)`` of one item of a :class:`SourceGrid`."""
    if isinstance(item, LazyImage):
        src = item.source
        return src.channels, *item.size, torch.from_numpy(np.zeros(0, dtype=src.dtype)).dtype
    if not isinstance(item, torch.Tensor) or item.dim() != 3:
        raise ValueError(f"a batch item must be a (C, H, W) tensor or a LazyImage, got "
                         f"{tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__}")
    return item.shape[0], item.shape[1], item.shape[2], item.dtype


class SourceGrid:
    """A batch of images of any sizes, each with its own ``m_i x n_i`` grid, seen as one ``m x n`` grid.

    The batch grid is the largest grid of the batch (``m = max m_i``, ``n = max n_i``); cell ``i = r * n + c``
    of image ``b`` is the patch at row ``r``, column ``c`` of image ``b``'s own grid, exactly as in
    :class:`PatchGrid`. Cells outside an image's own grid only pad ``Z`` (zero, masked out of the head by
    :meth:`cell_mask`); cells of its grid outside its tissue mask are background (neither sampled nor
    encoded). Pixels come from each image's source a chunk of patches at a time, so no image is ever held
    whole: a :class:`LazyImage` reads only the tiles its patches overlap; a ``(C, H, W)`` tensor is cut as
    by :class:`PatchGrid`.

    Args:
        images: One ``(C, H, W)`` tensor or :class:`LazyImage` per image; all of one channel count and dtype.
        patch_size: Side ``p`` of the square patches.
        pad_value: Pixel value of the padding beyond an image's bottom and right edges.
        device: Where :meth:`patches` delivers patches (the model's device).

    Example:
        >>> grid = SourceGrid([torch.zeros(3, 64, 64, dtype=torch.uint8), torch.zeros(3, 32, 96, dtype=torch.uint8)], 32)
        >>> grid.rows, grid.cols, grid.cell_mask()[1, 0].tolist()
        (2, 3, [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    """

    def __init__(self, images: Sequence[torch.Tensor | LazyImage], patch_size: int, pad_value: float = 0.0,
                 device: torch.device | str = "cpu"):
        if len(images) == 0:
            raise ValueError("a batch needs at least one image")
        infos = [_item_info(item) for item in images]
        if len({(c, d) for c, _, _, d in infos}) > 1:
            found = sorted({f"{c} channels of {d}" for c, _, _, d in infos})
            raise ValueError(f"the images of a batch must share channels and pixel type; found {', '.join(found)}")
        self.items = list(images)
        self.patch_size = patch_size
        self.pad_value = pad_value
        self.device = torch.device(device)
        self.batch_size = len(images)
        self.channels, self.dtype = infos[0][0], infos[0][3]
        self.shapes = [grid_shape(h, w, patch_size) for _, h, w, _ in infos]
        self.rows, self.cols = (max(side) for side in zip(*self.shapes))
        self.shape, self.patch_shape = (self.rows, self.cols), (patch_size, patch_size)
        inside = torch.zeros(self.batch_size, self.rows, self.cols, dtype=torch.bool)
        encoded = inside.clone()
        for b, (item, (m, n)) in enumerate(zip(self.items, self.shapes)):
            inside[b, :m, :n] = True
            tissue = item.grid_tissue() if isinstance(item, LazyImage) else None
            if tissue is not None and tuple(tissue.shape) != (m, n):
                raise ValueError(f"tissue mask of {item.source.path} has shape {tuple(tissue.shape)}; expected "
                                 f"its {m}x{n} grid of {patch_size} px cells")
            encoded[b, :m, :n] = True if tissue is None else tissue.bool()
        self._inside = inside.flatten(1)
        self._encoded = encoded.flatten(1)
        self._colours = {b: item.colour for b, item in enumerate(self.items)
                         if isinstance(item, LazyImage) and item.colour is not None}
        # Tensors are cut by PatchGrid, the one home of in-memory patch geometry and padding.
        self._tensor_grids = {b: PatchGrid(item[None], patch_size, pad_value)
                              for b, item in enumerate(self.items) if isinstance(item, torch.Tensor)}

    @property
    def num_cells(self) -> int:
        """Number of cells ``m * n`` of the batch grid."""
        return self.rows * self.cols

    def encoded_cells(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image, cell)`` index pairs of every cell that is encoded, image-major, cells row-major."""
        image_idx, cell_idx = self._encoded.nonzero(as_tuple=True)
        return image_idx, cell_idx

    def background_cells(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image, cell)`` pairs of the cells inside an image's grid but outside its tissue."""
        image_idx, cell_idx = (self._inside & ~self._encoded).nonzero(as_tuple=True)
        return image_idx, cell_idx

    def sampleable(self, image: int) -> torch.Tensor:
        """Flat cell indices of image ``image`` that may be sampled (its encoded cells), ascending."""
        return self._encoded[image].nonzero().squeeze(1)

    def is_encoded(self, image_idx: torch.Tensor, cell_idx: torch.Tensor) -> torch.Tensor:
        """Whether each ``(image, cell)`` pair is an encoded cell."""
        return self._encoded[image_idx.cpu(), cell_idx.cpu()]

    def cell_mask(self) -> torch.Tensor | None:
        """``(B, 1, m, n)`` float mask of the cells inside each image's grid; None when no image is padded."""
        if bool(self._inside.all()):
            return None
        return self._inside.view(self.batch_size, 1, self.rows, self.cols).to(self.device, torch.get_default_dtype())

    def patches(self, cells: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """The patches at the given cells, as :meth:`PatchGrid.patches`, on :attr:`device`."""
        if images is None:
            images = torch.arange(self.batch_size, device=cells.device).unsqueeze(1).expand_as(cells)
        images = images.reshape(-1)
        return self.deliver(images, self.read(images, cells.reshape(-1)))

    def deliver(self, image_idx: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """``patches`` (of images ``image_idx``, as :meth:`read` gives them) on :attr:`device`, with each
        image's colour jitter applied there: then as floats in [0, 1], which the model's normalisation
        takes as they are."""
        patches = patches.to(self.device, non_blocking=True)
        if not self._colours:
            return patches
        patches = to_unit_range(patches)
        image_idx = image_idx.to(self.device)
        for b, colour in self._colours.items():
            where = (image_idx == b).nonzero().squeeze(1)
            if where.numel() == len(patches):  # a chunk of one image (the common case): no gather
                patches = colour.apply(patches)
            elif where.numel():
                patches[where] = colour.apply(patches[where])
        return patches

    def read(self, image_idx: torch.Tensor, cell_idx: torch.Tensor) -> torch.Tensor:
        """``(N, C, p, p)`` patches of the ``(image, cell)`` pairs, in their order, on the CPU."""
        image_idx, cell_idx = image_idx.cpu(), cell_idx.cpu()
        p = self.patch_size
        pieces, positions = [], []
        for b in image_idx.unique().tolist():
            where = (image_idx == b).nonzero().squeeze(1)
            rows, cols = cell_idx[where].div(self.cols, rounding_mode="floor"), cell_idx[where] % self.cols
            item = self.items[b]
            if isinstance(item, LazyImage):
                pieces.append(item.read_cells(rows, cols, p, self.pad_value))
            else:
                own = self._tensor_grids[b]
                pieces.append(own.patches(rows * own.cols + cols, torch.zeros_like(rows)).cpu())
            positions.append(where)
        # A gather, not an indexed write: index_put has no kernel for uint16 pixels.
        order = torch.cat(positions).argsort()
        return torch.cat(pieces)[order] if len(pieces) > 1 else pieces[0][order]

    def stream(self, image_idx: torch.Tensor, cell_idx: torch.Tensor, chunk: int,
               num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The patches of ``(image, cell)`` pairs, ``chunk`` at a time: ``(images, cells, patches)`` per chunk.

        With ``num_workers > 0`` and a :class:`LazyImage` in the batch, chunks are read by that many
        DataLoader worker processes, two chunks ahead each (into pinned memory on CUDA), so that decoding
        tiles overlaps the backbone; in-memory tensors are cut in this process.
        """
        reads = _ChunkReads(self, image_idx, cell_idx, chunk)
        lazy = any(isinstance(item, LazyImage) for item in self.items)
        if num_workers == 0 or not lazy or len(reads) < 2:
            return (reads[j] for j in range(len(reads)))
        return iter(DataLoader(reads, batch_size=None, num_workers=min(num_workers, len(reads)),
                               pin_memory=self.device.type == "cuda", prefetch_factor=2))


class _ChunkReads(Dataset):
    """Chunk ``j`` of a fill: the ``j``-th ``chunk`` of ``(image, cell)`` pairs and their patches."""

    def __init__(self, grid: SourceGrid, image_idx: torch.Tensor, cell_idx: torch.Tensor, chunk: int):
        self.grid, self.image_idx, self.cell_idx, self.chunk = grid, image_idx.cpu(), cell_idx.cpu(), chunk

    def __len__(self) -> int:
        return math.ceil(len(self.cell_idx) / self.chunk)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        part = slice(j * self.chunk, (j + 1) * self.chunk)
        images, cells = self.image_idx[part], self.cell_idx[part]
        return images, cells, self.grid.read(images, cells)


def cell_mask(grid: PatchGrid | SourceGrid) -> torch.Tensor | None:
    """The head's cell mask of ``grid``: None unless it pads images of different sizes to one grid."""
    return grid.cell_mask() if isinstance(grid, SourceGrid) else None
