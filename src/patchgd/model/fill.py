"""Algorithm 2 as its own object: a fill owns how a grid of patches becomes ``Z`` (the chunk of patches per
backbone call, reading in pieces with reader workers or cutting images in memory); the classifier keeps
what a patch means (encode, classify, the background code). MONAI's ``PatchInferer`` keeps chunking and
I/O outside the network the same way.

Two strategies fill a training step's ``Z``: :class:`Fill`, Algorithm 1's (every cell, with the current
weights), and :class:`~patchgd.methods.cached.CachedZ`, ``Z`` persisting across steps.

Example:
    >>> from patchgd import PatchGDClassifier
    >>> model = PatchGDClassifier("test_resnet", num_classes=2, patch_size=32, latent_dim=8)
    >>> Fill(model)(torch.randn(2, 3, 64, 96)).shape
    torch.Size([2, 8, 2, 3])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..data.lazy import SourceGrid
from ..grid import PatchGrid

__all__ = ["SOURCE_FILL_CHUNK", "Fill", "fill_chunk"]

# A slide's grid row can hold hundreds of patches: by default its fill reads and encodes at most this many
# at a time, so that the fill's memory does not grow with the slide's width.
SOURCE_FILL_CHUNK = 64


def fill_chunk(batch: int, cols: int, streamed: bool, *, fill_batch_size: int | None = None,
               sampled: int | None = None) -> int:
    """Patches per backbone call of a fill: the one rule.

    ``fill_batch_size`` (``patchgd.fill_batch_size``) when set; else, in a training step, the ``sampled``
    patches (``B * k``) its inner iterations hold anyway, so that a larger image never raises the step's
    peak through the fill; else (evaluation, prediction) one grid row of every image (``batch * cols``, on the
    CPU faster and smaller than larger chunks: benchmarks/RESULTS.md, "inference"), at most
    ``SOURCE_FILL_CHUNK`` when the patches are read in pieces (``streamed``: a slide's row can be thousands).

    Example:
        >>> fill_chunk(2, 300, streamed=True), fill_chunk(2, 300, False), fill_chunk(2, 300, True, sampled=32)
        (64, 600, 32)
    """
    if fill_batch_size:
        return fill_batch_size
    if sampled:
        return sampled
    return min(batch * cols, SOURCE_FILL_CHUNK) if streamed else batch * cols


class Fill:
    """Encode every patch of a grid without gradients into its cell of ``Z`` (Algorithm 2).

    The backbone sees at most one chunk of patches at a time (:func:`fill_chunk`: the model's
    ``fill_batch_size``, else one grid row of every image), whatever the image size, so a fill's memory is
    bounded by the chunk, ``Z`` and the input. A :class:`~patchgd.data.lazy.SourceGrid` is read in pieces:
    only its encoded cells (inside the image, tissue under a mask), chunks read by the model's
    ``fill_workers`` DataLoader workers while the backbone runs; every background cell gets the model's
    background code, and cells that only pad a smaller image to the batch's grid hold 0.

    Args:
        model: The :class:`~patchgd.PatchGDClassifier` whose encoder fills (its ``fill_batch_size`` and
            ``fill_workers`` too).
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def chunk(self, grid: PatchGrid | SourceGrid, sampled: int | None = None) -> int:
        """This fill's patches per backbone call on ``grid`` (``sampled``: a training step's ``B * k``)."""
        return fill_chunk(grid.batch_size, grid.cols, isinstance(grid, SourceGrid),
                          fill_batch_size=self.model.fill_batch_size, sampled=sampled)

    def __call__(self, images: torch.Tensor | Sequence | PatchGrid | SourceGrid, batch_size: int | None = None, *,
                 shard: tuple[int, int] = (0, 1), features: bool = False) -> torch.Tensor:
        """``Z`` of ``images`` (or their grid) as ``(B, width, *grid.shape)``.

        Args:
            images: ``(B, C, H, W)`` images or ``(B, C, L)`` sequences, one item per image, or their grid.
            batch_size: Patches per backbone call (default :meth:`chunk`).
            shard: ``(i, n)``: encode only the chunks ``i, i + n, ...`` and leave the other cells unset
                (:func:`patchgd.distributed.parallel_fill` splits a fill over processes with it); in-memory
                batches only.
            features: The encoder's features before the projection (width ``feature_dim``) instead of the
                codes; background cells then hold 0.
        """
        model = self.model
        grid = images if isinstance(images, (PatchGrid, SourceGrid)) else model.grid(images)
        streamed = isinstance(grid, SourceGrid)
        if streamed and shard[1] != 1:
            raise ValueError("a fill split over processes (patchgd.parallel_fill) needs in-memory images of one "
                             "size; a batch read in pieces (slides) or of mixed sizes fills on each process")
        chunk = batch_size or self.chunk(grid)
        encode, width = (model.encode_features, model.feature_dim) if features else (model.encode, model.latent_dim)
        with torch.no_grad():
            z = self._streamed(grid, chunk, encode, width, not features) if streamed else \
                self._in_memory(grid, chunk, shard, encode, width)
        return z.view(grid.batch_size, width, *grid.shape)

    def _in_memory(self, grid: PatchGrid, chunk: int, shard: tuple[int, int], encode, width: int) -> torch.Tensor:
        """``Z`` as ``(B, width, cells)``: the row-major (image, cell) sequence cut into chunks of ``chunk``
        patches, the chunks ``i, i + n, ...`` of ``shard`` ``(i, n)`` encoded."""
        cells = grid.num_cells
        total = grid.batch_size * cells
        z = torch.empty(grid.batch_size, width, cells, device=grid.device)
        index, shards = shard
        for start in range(index * chunk, total, shards * chunk):
            stop = min(start + chunk, total)
            flat = torch.arange(start, stop, device=grid.device)
            z[flat // cells, :, flat % cells] = encode(grid.patch_range(start, stop)).to(z.dtype)
        return z

    def _streamed(self, grid: SourceGrid, chunk: int, encode, width: int, background: bool) -> torch.Tensor:
        """``Z`` as ``(B, width, cells)`` of a batch read in pieces: the encoded cells streamed in chunks, every
        background cell the background code (with ``background``), padding cells 0."""
        device = grid.device
        z = torch.zeros(grid.batch_size, width, grid.num_cells, device=device)
        image_idx, cell_idx = grid.encoded_cells()
        for image_c, cell_c, patches in grid.stream(image_idx, cell_idx, chunk, self.model.fill_workers):
            z[image_c.to(device), :, cell_c.to(device)] = encode(grid.deliver(image_c, patches)).to(z.dtype)
        image_idx, cell_idx = grid.background_cells()
        if background and image_idx.numel():
            z[image_idx.to(device), :, cell_idx.to(device)] = self.model.background_code(grid).to(z.dtype)
        return z
