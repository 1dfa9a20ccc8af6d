"""PatchGD with a persistent ``Z`` (``patchgd.fill: cached``): a batch's ``Z`` comes from a
:class:`~patchgd.zstore.ZStore` instead of a full fill with the current weights.

Per image and step (``k`` cells per inner iteration, ``ζ`` inner iterations, ``N`` cells):

* an image seen for the first time, or whose codes predate the current refill period
  (``patchgd.refresh_epochs``), is filled whole, as Algorithm 1 does (``N`` encodes without gradients);
* otherwise its codes are read from the store, and its ``refresh`` oldest cells (not sampled in this step)
  are encoded again without gradients;
* the inner iterations run as Algorithm 1's, and the codes of the cells they encoded (with gradients,
  with the weights of that moment) are written back, detached.

So a step costs ``refresh`` encodes without gradients plus ``kζ`` with, against Algorithm 1's ``N`` plus
``kζ``. The codes a step reads were made by earlier weights: that is the approximation, bounded by
``refresh`` and ``refresh_epochs``. Refreshing every cell every step is Algorithm 1 exactly.

With a frozen encoder (``model.freeze: all``) the store holds what stays fixed: the encoder's features
before the trainable projection to ``s``. They never go stale; each step projects them (the projection
keeps training), and the inner iterations project the sampled cells' stored features instead of encoding
their patches: after the first visit a step costs the projection and the head, as two-stage training does,
and equals Algorithm 1 with the same frozen encoder exactly (a float32 store).

A code belongs to one view of its image: augmentation, which shows another view at every step, is refused
with this fill (see :func:`check_cached_fill`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.features import FeatureFolder
from ..data.lazy import LazyImage, SourceGrid
from ..grid import PatchGrid
from ..model import PatchGDClassifier
from ..zstore import ZStore

__all__ = ["CachedZ"]


class CachedZ:
    """The store-backed fill of :class:`~patchgd.methods.patchgd.PatchGD`.

    Args:
        model: The classifier.
        store: Codes (or, with ``features``, encoder features) of every training image, by data set index.
        refresh: Oldest cells per image and step encoded again without gradients.
        features: The store holds the frozen encoder's features (width :attr:`PatchGDClassifier.feature_dim`).
    """

    def __init__(self, model: PatchGDClassifier, store: ZStore, *, refresh: int = 0, features: bool = False,
                 features_from: FeatureFolder | None = None, names: Sequence[str] | None = None):
        if features_from is not None and (not features or names is None):
            raise ValueError("features_from gives the frozen encoder's features: it needs features=True and the "
                             "images' names")
        self.model, self.store, self.refresh, self.features = model, store, refresh, features
        self.features_from, self.names = features_from, names
        self.valid_from = 0  # codes stamped before this step belong to an earlier refill period
        self._features: torch.Tensor | None = None  # this step's (B, D, cells) features, with ``features``
        # cells encoded without gradients (whole fills, refreshes) and read from feature files, since made
        self.encoded = {"whole": 0, "refreshed": 0, "from_files": 0}

    def begin_epoch(self, epoch: int, steps_per_epoch: int, refresh_epochs: int | None) -> None:
        """Start ``epoch`` (from 1): with ``refresh_epochs`` E, every E-th epoch starts a refill period, in
        which each image is filled whole at its first visit."""
        period = (epoch - 1) // refresh_epochs * refresh_epochs if refresh_epochs else 0
        self.valid_from = period * steps_per_epoch
        self.store.begin_epoch(epoch)

    # --- cells of an image's own grid and of the batch's ------------------------------------------------

    @staticmethod
    def _shape(grid: PatchGrid | SourceGrid, b: int) -> tuple[int, int]:
        return grid.shapes[b] if isinstance(grid, SourceGrid) else (grid.rows, grid.cols)

    @staticmethod
    def _encoded(grid: PatchGrid | SourceGrid, b: int) -> torch.Tensor:
        """Batch-grid cells of image ``b`` that are encoded (all of its own grid, or its tissue)."""
        if isinstance(grid, SourceGrid):
            return grid.sampleable(b)
        return torch.arange(grid.num_cells)

    def _own(self, grid: PatchGrid | SourceGrid, b: int, cells: torch.Tensor) -> torch.Tensor:
        """Own-grid indices of batch-grid ``cells`` of image ``b``."""
        cols = self._shape(grid, b)[1]
        return cells.cpu().div(grid.cols, rounding_mode="floor") * cols + cells.cpu() % grid.cols

    # --- the fill -------------------------------------------------------------------------------------

    def fill(self, grid: PatchGrid | SourceGrid, images, keys: torch.Tensor,
             schedule: Sequence[tuple[torch.Tensor, torch.Tensor]], chunk: int, step: int) -> torch.Tensor:
        """``Z`` ``(B, s, *grid.shape)`` of a batch from the store, its stale images filled whole and its
        oldest cells refreshed (no gradients), those codes written back at ``step``."""
        model, batch, cells = self.model, grid.batch_size, grid.num_cells
        width = model.feature_dim if self.features else model.latent_dim
        keys = keys.cpu().tolist()
        z = torch.zeros(batch, width, cells, device=grid.device)
        encoded = [self._encoded(grid, b) for b in range(batch)]
        stale, fresh = [], []
        for b, key in enumerate(keys):
            stamps = torch.from_numpy(self.store.stamps(key))[self._own(grid, b, encoded[b])]
            # Refreshing every cell is a whole fill: Algorithm 1's, with its chunks and its BatchNorm statistics.
            whole = self.refresh >= len(encoded[b]) or bool((stamps < self.valid_from).any())
            (stale if whole else fresh).append(b)
        with torch.no_grad():
            if stale:
                self._fill_whole(grid, images, stale, z, encoded, keys, chunk, step)
            sampled = [set() for _ in range(batch)]
            for image_idx, cell_idx in schedule:
                for b, c in zip(image_idx.tolist(), cell_idx.tolist()):
                    sampled[b].add(c)
            for b in fresh:
                own = self._own(grid, b, encoded[b])
                z[b][:, encoded[b].to(grid.device)] = self.store.read(keys[b])[own].T.to(grid.device)
            if self.refresh and fresh:
                self._refresh(grid, fresh, sampled, z, encoded, keys, chunk, step)
        return self._latent(grid, z, encoded)

    def _fill_whole(self, grid, images, stale: list[int], z: torch.Tensor, encoded, keys, chunk: int, step: int) -> None:
        """Algorithm 1's fill of the ``stale`` images (all of them: the same fill as Algorithm 1's), stored;
        with ``features_from``, an image's features are read from its file instead, where it has one."""
        if self.features_from is not None:
            stale = [b for b in stale if not self._fill_from_file(grid, b, z, encoded, keys, chunk, step)]
            if not stale:
                return
        if len(stale) == grid.batch_size:
            sub, place = grid, list(range(grid.batch_size))
        else:
            sub = self.model.grid(images[stale] if isinstance(images, torch.Tensor) else [images[b] for b in stale])
            place = stale
        filled = self.model.fill_z(sub, chunk, features=self.features).flatten(2)
        for j, b in enumerate(place):
            rows, cols = self._shape(grid, b)
            own = self._own(grid, b, encoded[b])
            # the image's own cells, as the sub-grid numbers them
            inside = own.div(cols, rounding_mode="floor") * sub.cols + own % cols
            codes = filled[j][:, inside.to(filled.device)]
            z[b][:, encoded[b].to(z.device)] = codes
            self.store.write(torch.full_like(own, keys[b]), own, codes.T, step)
            self.encoded["whole"] += len(own)

    def _fill_from_file(self, grid, b: int, z: torch.Tensor, encoded, keys, chunk: int, step: int) -> bool:
        """Image ``b``'s features from its feature file (False without one); its encoded cells the file lacks
        are encoded, cells the file has beyond them (another tissue mask) left out."""
        found = self.features_from.read(self.names[keys[b]])
        if found is None:
            return False
        item = grid.items[b] if isinstance(grid, SourceGrid) else None
        downsample = item.source.downsample if isinstance(item, LazyImage) else 1.0
        own = self._own(grid, b, encoded[b])
        row_of = {int(c): i for i, c in enumerate(found["cells"](self._shape(grid, b), round(grid.patch_size * downsample)))}
        codes = torch.zeros(len(own), self.model.feature_dim)
        present = [j for j, c in enumerate(own.tolist()) if c in row_of]
        if present:
            rows = [row_of[own[j].item()] for j in present]
            codes[present] = torch.from_numpy(found["features"][rows])
        missing = torch.tensor([j for j in range(len(own)) if j not in set(present)], dtype=torch.long)
        for start in range(0, len(missing), chunk):
            part = missing[start:start + chunk]
            cells = encoded[b][part].to(grid.device)
            codes[part] = self.model.encode_features(grid.patches(cells, torch.full_like(cells, b))).float().cpu()
        z[b][:, encoded[b].to(z.device)] = codes.T.to(z.device, z.dtype)
        self.store.write(torch.full_like(own, keys[b]), own, codes, step)
        self.encoded["from_files"] += len(present)
        self.encoded["whole"] += len(missing)
        return True

    def _refresh(self, grid, fresh: list[int], sampled, z: torch.Tensor, encoded, keys, chunk: int, step: int) -> None:
        """Encode again the ``refresh`` oldest cells of each fresh image that this step does not sample."""
        image_idx, cell_idx = [], []
        for b in fresh:
            candidates = torch.tensor([c for c in encoded[b].tolist() if c not in sampled[b]], dtype=torch.long)
            if not len(candidates):
                continue
            stamps = torch.from_numpy(self.store.stamps(keys[b]))[self._own(grid, b, candidates)]
            oldest = candidates[torch.argsort(stamps, stable=True)[:self.refresh]]
            image_idx.append(torch.full_like(oldest, b))
            cell_idx.append(oldest)
        if not image_idx:
            return
        image_idx, cell_idx = torch.cat(image_idx), torch.cat(cell_idx)
        encode = self.model.encode_features if self.features else self.model.encode
        for start in range(0, len(cell_idx), chunk):
            images_c, cells_c = image_idx[start:start + chunk], cell_idx[start:start + chunk]
            codes = encode(grid.patches(cells_c.to(grid.device), images_c.to(grid.device))).to(z.dtype)
            z[images_c.to(z.device), :, cells_c.to(z.device)] = codes
            own = torch.cat([self._own(grid, b, c[None]) for b, c in zip(images_c.tolist(), cells_c)])
            self.store.write(torch.tensor([keys[b] for b in images_c.tolist()]), own, codes, step)
        self.encoded["refreshed"] += len(cell_idx)

    def _latent(self, grid, z: torch.Tensor, encoded) -> torch.Tensor:
        """``Z`` in the head's space: the features projected (``features``), the background code on
        background cells, 0 on the cells that only pad a smaller image."""
        model = self.model
        if self.features:
            self._features = z
            projected = torch.zeros(grid.batch_size, model.latent_dim, grid.num_cells, device=z.device)
            for b, cells in enumerate(encoded):
                cells = cells.to(z.device)
                projected[b][:, cells] = model.project(z[b][:, cells].T).T.to(projected.dtype)
            z = projected
        if isinstance(grid, SourceGrid):
            image_idx, cell_idx = grid.background_cells()
            if image_idx.numel():
                z[image_idx.to(z.device), :, cell_idx.to(z.device)] = model.background_code(grid).to(z.dtype)
        return z.view(grid.batch_size, model.latent_dim, *grid.shape)

    # --- the inner iterations ----------------------------------------------------------------------------

    def features_of(self, image_idx: torch.Tensor, cell_idx: torch.Tensor) -> torch.Tensor:
        """The stored features of the sampled cells (``features``): what the inner iteration projects."""
        return self._features[image_idx, :, cell_idx]

    def write_back(self, grid, keys: torch.Tensor, image_idx: torch.Tensor, cell_idx: torch.Tensor, z: torch.Tensor,
                   step: int) -> None:
        """Store the codes an inner iteration encoded (detached; with ``features`` there is nothing new)."""
        if self.features:
            return
        codes = z.detach().view(grid.batch_size, self.model.latent_dim, -1)[image_idx, :, cell_idx]
        own = torch.cat([self._own(grid, b, c[None]) for b, c in zip(image_idx.tolist(), cell_idx.cpu())])
        self.store.write(keys.cpu()[image_idx.cpu()], own, codes, step)
