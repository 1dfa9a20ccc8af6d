"""Images read in pieces: a :class:`LazyImage` (a slide's reader, its tissue cells and an augmentation) and
the :class:`SourceGrid` of a batch of them, which reads the patches of the cells asked for, in chunks and
ahead of the backbone, so that no slide is ever held whole.

The geometry (which pixels make a cell, padding, flips and turns) is :mod:`patchgd.grid`'s; this module
asks the readers (:mod:`patchgd.data.readers`) for pixels and the grid for where they go.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from patchgd.data.readers import PatchSource
from patchgd.data.errors import DataError
from patchgd.grid import Orientation, PatchGrid, grid_shape
from patchgd.normalize import to_unit_range

if TYPE_CHECKING:  # an annotation only
    from patchgd.data.colour import ColourJitter

__all__ = ["LazyImage", "SourceGrid", "cell_mask"]


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
        colour: A :class:`~patchgd.data.colour.ColourJitter` with this image's parameters (None: none).
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
            return _raising(reads[j] for j in range(len(reads)))
        return _raising(iter(DataLoader(reads, batch_size=None, num_workers=min(num_workers, len(reads)),
                                        pin_memory=self.device.type == "cuda", prefetch_factor=2)))


def _raising(chunks: Iterator) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The chunks, a chunk that could not be read raised here as the reader's own :class:`DataError`."""
    for images, cells, patches in chunks:
        if isinstance(patches, DataError):
            raise patches
        yield images, cells, patches


class _ChunkReads(Dataset):
    """Chunk ``j`` of a fill: the ``j``-th ``chunk`` of ``(image, cell)`` pairs and their patches, or the
    :class:`DataError` that reading them raised, as a value: a DataLoader worker's exception would reach the
    main process as text alone, and skipping reads the error's fields (file, level, cells)."""

    def __init__(self, grid: SourceGrid, image_idx: torch.Tensor, cell_idx: torch.Tensor, chunk: int):
        self.grid, self.image_idx, self.cell_idx, self.chunk = grid, image_idx.cpu(), cell_idx.cpu(), chunk

    def __len__(self) -> int:
        return math.ceil(len(self.cell_idx) / self.chunk)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | DataError]:
        part = slice(j * self.chunk, (j + 1) * self.chunk)
        images, cells = self.image_idx[part], self.cell_idx[part]
        try:
            return images, cells, self.grid.read(images, cells)
        except DataError as err:
            return images, cells, err


def cell_mask(grid: PatchGrid | SourceGrid) -> torch.Tensor | None:
    """The head's cell mask of ``grid``: None unless it pads images of different sizes to one grid."""
    return grid.cell_mask() if isinstance(grid, SourceGrid) else None
