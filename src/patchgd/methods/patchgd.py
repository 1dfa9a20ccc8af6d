"""PatchGD's step: Algorithm 1 of the paper, line for line (:class:`PatchGD`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from ..data.lazy import SourceGrid, cell_mask
from ..grid import PatchGrid
from ..model import PatchGDClassifier
from ..model.fill import Fill, fill_chunk
from .base import Step, classification_loss
from .cached import CachedZ
from .schedule import default_inner_iterations, patches_per_iteration, sample_schedule


class InnerIteration(nn.Module):
    """The forward of one inner iteration as a module of its own, so that DDP can wrap it: encode the
    sampled patches, write their features into their cells of ``Z``, classify ``Z``; returns the logits
    and ``Z`` (returned rather than relied on in place, should a wrapper ever copy its inputs)."""

    def __init__(self, model: PatchGDClassifier):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor, patches: torch.Tensor, image_idx: torch.Tensor, cell_idx: torch.Tensor,
                cell_mask: torch.Tensor | None = None, from_features: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        # ``from_features``: the sampled cells' stored features of a frozen encoder, projected (cached fill).
        codes = self.model.project(patches) if from_features else self.model.encode(patches)
        z.view(z.shape[0], self.model.latent_dim, -1)[image_idx, :, cell_idx] = codes.to(z.dtype)
        return self.model.classify(z, cell_mask), z


class PatchGD(Step):
    """Patch Gradient Descent: one call of :meth:`step` is one iteration of Algorithm 1 on a batch.

    Args:
        model: A :class:`~patchgd.PatchGDClassifier`.
        optimizer: Optimizer over the model's parameters.
        sampling: Fraction of the cells of each image that carries gradients in one inner iteration;
            ``k = ceil(sampling * m * n)``.
        patches_per_step: ``k`` given as an absolute number of cells per image instead (at most ``m * n``),
            so that the gradient-carrying patches, and memory, stay fixed as images grow; then
            ``ζ = ceil(max_sampled * m * n / k)``.
        max_sampled: Fraction of the cells visited per batch; ``ζ = ceil(max_sampled / sampling)``.
        inner_iterations: ``ζ`` given directly (overrides ``max_sampled``).
        grad_accum_steps: ``ε``, inner iterations per optimizer update (default ``ζ``: one update per
            batch). A last, shorter group also updates, its loss scaled by its own length.
        fill_mode: ``"train"`` fills ``Z`` with the backbone in training mode (the paper's code: BatchNorm
            uses batch statistics in fill and inner steps alike), ``"eval"`` in evaluation mode.
        fill_batch_size: Patches per backbone call while filling (default ``B * k``:
            :func:`~patchgd.model.fill.fill_chunk`).
        amp: ``None``, ``"bf16"`` (CPU or CUDA) or ``"fp16"`` (CUDA, with a gradient scaler).
        generator: Random generator for the sampler.
        cache: A :class:`~patchgd.methods.cached.CachedZ`: ``Z`` persists across steps (``patchgd.fill:
            cached``); :meth:`step` then needs each image's data set index (``labels`` of shape ``(B, 2)``:
            class, index). None (the default) is Algorithm 1.

    Example:
        >>> model = PatchGDClassifier("test_resnet", num_classes=10, patch_size=32)
        >>> trainer = PatchGD(model, torch.optim.Adam(model.parameters()), sampling=0.25)
        >>> stats = trainer.step(torch.randn(2, 3, 128, 128), torch.tensor([3, 7]))
    """

    def __init__(self, model: PatchGDClassifier, optimizer: torch.optim.Optimizer, sampling: float = 0.25,
                 max_sampled: float = 1.0, inner_iterations: int | None = None,
                 grad_accum_steps: int | None = None, *, patches_per_step: int | None = None,
                 fill_mode: str = "train", fill_batch_size: int | None = None, amp: str | None = None,
                 generator: torch.Generator | None = None, fill: Callable | None = None,
                 wrap: Callable[[nn.Module], nn.Module] | None = None, cache: CachedZ | None = None):
        super().__init__(model, optimizer, amp, forward_module=InnerIteration(model), wrap=wrap)
        if not 0 < sampling <= 1:
            raise ValueError(f"sampling must be a fraction in (0, 1], got {sampling}")
        if not max_sampled > 0:
            raise ValueError(f"max_sampled must be a positive fraction of the cells, got {max_sampled}")
        for name, value in (("inner_iterations", inner_iterations), ("grad_accum_steps", grad_accum_steps),
                            ("fill_batch_size", fill_batch_size), ("patches_per_step", patches_per_step)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if fill_mode not in ("train", "eval"):
            raise ValueError(f"fill_mode must be 'train' or 'eval', got {fill_mode!r}")
        self.sampling = sampling
        self.patches_per_step = patches_per_step
        self.max_sampled = max_sampled
        self.inner_iterations = inner_iterations
        self.grad_accum_steps = grad_accum_steps
        self.fill_mode = fill_mode
        self.fill_batch_size = fill_batch_size
        self.generator = generator
        self.fill = fill or Fill(model)  # Algorithm 1's fill; the patch-parallel one under torchrun
        self.cache = cache
        self.steps = 0  # steps taken: when a cached code was made (the trainer sets it when a run resumes)

    def schedule_for(self, grid: PatchGrid | SourceGrid,
                     schedule: Sequence[torch.Tensor] | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The cells of each inner iteration as ``(image, cell)`` index pairs, image-major.

        Sampled per image among its sampleable cells (all of them, or the tissue cells of a
        :class:`~patchgd.data.lazy.SourceGrid` under a tissue mask), ``k_i = ceil(sampling * T_i)`` of image
        ``i``'s ``T_i`` sampleable cells per inner iteration; or the given schedule, checked.
        """
        cells = grid.num_cells
        if schedule is None:
            allowed = [grid.sampleable(b) if isinstance(grid, SourceGrid) else torch.arange(cells)
                       for b in range(grid.batch_size)]
            largest = max(len(a) for a in allowed)  # an absolute k sets ζ by the largest image
            fraction = self.sampling if self.patches_per_step is None else \
                patches_per_iteration(self.sampling, largest, self.patches_per_step) / largest
            zeta = self.inner_iterations or default_inner_iterations(fraction, self.max_sampled)
            picks = []  # per image, zeta chunks of its cells
            for cells_b in allowed:
                k = patches_per_iteration(self.sampling, len(cells_b), self.patches_per_step)
                picks.append([cells_b[chunk[0]] for chunk in sample_schedule(1, len(cells_b), k, zeta,
                                                                              self.generator)])
            return [(torch.cat([torch.full_like(p[j], b) for b, p in enumerate(picks)]).to(grid.device),
                     torch.cat([p[j] for p in picks]).to(grid.device)) for j in range(zeta)]
        if self.inner_iterations is not None and len(schedule) != self.inner_iterations:
            raise ValueError(f"schedule has {len(schedule)} entries but inner_iterations={self.inner_iterations}")
        if len(schedule) == 0:
            raise ValueError("schedule is empty: expected one entry per inner iteration")
        checked = []
        for j, idx in enumerate(schedule):
            idx = torch.as_tensor(idx)
            if idx.dtype not in (torch.int64, torch.int32) or idx.dim() not in (1, 2) or \
                    (idx.dim() == 2 and idx.shape[0] != grid.batch_size):
                raise ValueError(f"schedule[{j}] must be an integer tensor of shape (k,) or "
                                 f"({grid.batch_size}, k); got {tuple(idx.shape)} {idx.dtype}")
            idx = idx.long().expand(grid.batch_size, -1)
            k = idx.shape[1]
            if not 1 <= k <= cells:
                raise ValueError(f"schedule[{j}] asks for {k} patches per image but the grid has "
                                 f"{grid.rows}x{grid.cols} = {cells} cells")
            if idx.min() < 0 or idx.max() >= cells:
                bad = idx[(idx < 0) | (idx >= cells)][0].item()
                raise ValueError(f"schedule[{j}] holds cell index {bad}, outside the {grid.rows}x{grid.cols} "
                                 f"grid (expected 0..{cells - 1})")
            if (idx.sort(dim=1).values.diff(dim=1) == 0).any():
                raise ValueError(f"schedule[{j}] repeats a cell within an image; each cell may appear once")
            image_idx = torch.arange(grid.batch_size).repeat_interleave(k)
            cell_idx = idx.reshape(-1).cpu()
            if isinstance(grid, SourceGrid) and not grid.is_encoded(image_idx, cell_idx).all():
                bad = (~grid.is_encoded(image_idx, cell_idx)).nonzero()[0].item()
                raise ValueError(f"schedule[{j}] holds cell {cell_idx[bad].item()} of image {image_idx[bad].item()}, "
                                 "which is background (outside the tissue mask) or beyond the image's own grid")
            checked.append((image_idx.to(grid.device), cell_idx.to(grid.device)))
        return checked

    def step(self, images: torch.Tensor | Sequence, labels: torch.Tensor,
             schedule: Sequence[torch.Tensor] | None = None) -> dict:
        """One iteration of Algorithm 1 on a batch.

        Args:
            images: ``(B, C, H, W)`` images, or one ``(C, H, W)`` tensor or
                :class:`~patchgd.data.lazy.LazyImage` per image (see :meth:`PatchGDClassifier.grid`).
            labels: ``(B,)`` class indices.
            schedule: Optional cells per inner iteration: flat row-major indices, ``(k,)`` (the same cells
                in every image) or ``(B, k)`` per image.

        Returns:
            ``loss`` (mean over inner iterations), ``inner_losses`` (each inner iteration's loss, in
            order), ``fill_time``, ``inner_time``, ``step_time`` in seconds,
            ``inner_iterations``, ``patches_per_image`` (the most cells an image has in the first inner
            iteration, ``k``) and ``optimizer_steps``.
        """
        start = time.perf_counter()
        model = self.model
        keys = None
        if self.cache is not None:
            if labels.dim() != 2 or labels.shape[1] != 2:
                raise ValueError("a cached fill needs each image's data set index: labels of shape (B, 2) (class, "
                                 f"index), got shape {tuple(labels.shape)}")
            labels, keys = labels[:, 0], labels[:, 1]
        images, labels = self.inputs(images, labels)
        grid = model.grid(images)
        schedule = self.schedule_for(grid, schedule)
        mask = cell_mask(grid)
        zeta = len(schedule)
        eps = self.grad_accum_steps or zeta
        model.train()
        self.optimizer.zero_grad(set_to_none=True)

        if self.fill_mode == "eval":
            model.backbone.eval()
        chunk = fill_chunk(grid.batch_size, grid.cols, isinstance(grid, SourceGrid), fill_batch_size=self.fill_batch_size,
                           sampled=len(schedule[0][1]))
        with self.autocast():
            z = self.fill(grid, chunk) if self.cache is None else \
                self.cache.fill(grid, images, keys, schedule, chunk, self.steps)
        model.backbone.train()
        self.sync()
        filled = time.perf_counter()

        from_features = self.cache is not None and self.cache.features
        losses, updates = [], 0
        for j, (image_idx, cell_idx) in enumerate(schedule, start=1):
            group_len = min(eps, zeta - (j - 1) // eps * eps)
            updating = j % eps == 0 or j == zeta
            z = z.detach()  # earlier inner iterations stay in Z as values, not as graph
            inputs = self.cache.features_of(image_idx, cell_idx) if from_features else grid.patches(cell_idx, image_idx)
            with self.gradient_sync(updating):  # under DDP, only the updating iteration all-reduces
                with self.autocast():
                    logits, z = self.forward_module(z, inputs, image_idx, cell_idx, mask, from_features=from_features)
                loss = classification_loss(logits, labels)
                self.backward(loss / group_len)
            losses.append(loss.detach())
            if self.cache is not None:
                self.cache.write_back(grid, keys, image_idx, cell_idx, z, self.steps)
            if updating:
                self.update()
                updates += 1
        self.steps += 1
        self.sync()
        end = time.perf_counter()
        inner_losses = torch.stack(losses).tolist()  # one device sync for all of them
        return {"loss": sum(inner_losses) / zeta, "inner_losses": inner_losses, "fill_time": filled - start,
                "inner_time": end - filled, "step_time": end - start, "inner_iterations": zeta,
                "patches_per_image": int(torch.bincount(schedule[0][0]).max()), "optimizer_steps": updates}
